"""Fixtures of the serving tests (`make test-serving` in .venv-serve; `make test` never collects
them): one base, the adapters and their references per session, and one BD engine per TP size
shared by the tests that only send requests."""

import pytest

from tests_serving.helpers import (
    ADAPTERS, OTHER_BASE, REFUSED, engine, greedy, save_adapter, save_base,
)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    return save_base(str(tmp_path_factory.mktemp("base")))


@pytest.fixture(scope="session")
def adapters(base_dir, tmp_path_factory):
    """{name: dir} of ADAPTERS and REFUSED (the wrong-base one trained on OTHER_BASE)."""
    root = tmp_path_factory.mktemp("adapters")
    other = save_base(str(root / "other_base"), OTHER_BASE)
    out = {}
    for name, (kw, seed) in ADAPTERS.items():
        out[name] = save_adapter(base_dir, str(root / name), kw, seed)
    for seed, (name, (kw, _)) in enumerate(REFUSED.items(), start=10):
        out[name] = save_adapter(other if name == "bd_other_base" else base_dir, str(root / name), kw, seed)
    return out


@pytest.fixture(scope="session")
def references(base_dir, adapters):
    """{adapter name: greedy tokens per prompt} from transformers + PEFT."""
    return {name: greedy(base_dir, adapters[name]) for name in ADAPTERS}


@pytest.fixture(scope="session")
def bd_tp1(base_dir):
    with engine(base_dir, 1) as llm:
        yield llm


@pytest.fixture(scope="session")
def bd_tp2(base_dir):
    with engine(base_dir, 2) as llm:
        yield llm
