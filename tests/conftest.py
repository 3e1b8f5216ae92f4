"""Fixtures several test files share: the tiny HF Llama, a saved tiny base with its tokenizer, the
demo data, and the launcher / torchrun tools run as subprocesses the way a user runs them. Plain helpers (also
used inside spawned ranks) are in tests/helpers.py, the rank launcher in tests/dist_utils.py."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from examples.run_commands import LAUNCHER, ROOT, clean_env, make_demo_data
from megatron_bdlora.parallel.distributed import free_port
from tests.helpers import save_tiny_base
from tests.reference import tiny_hf


@pytest.fixture(scope="session")
def tiny_llama():
    """(hf config dict, fp32 state dict, eval-mode transformers model) of the tiny preset; read
    only (a test that changes the model builds its own with tests.reference.tiny_hf)."""
    return tiny_hf()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A directory holding a random tiny transformers Llama and a tiny tokenizer (read only)."""
    path = str(tmp_path_factory.mktemp("tiny_base"))
    save_tiny_base(path)
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """examples/make_demo_data.py's records and tiny tokenizer, made once (read only: `work`
    copies them)."""
    d = tmp_path_factory.mktemp("demo")
    make_demo_data(d)
    return d / "data"


@pytest.fixture(scope="module")
def work(tmp_path_factory, demo_data, request):
    """A fresh directory per test file holding the demo data as `data/` (the launcher tests'
    working directory: their relative paths, runs and caches land here)."""
    d = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    shutil.copytree(demo_data, d / "data")
    return d


@pytest.fixture(scope="session")
def launch():
    """launch(args, cwd, nproc=1, check=True, timeout=300): pretrain_scripts/finetune_llama.sh
    in a clean environment on `nproc` local ranks; the CompletedProcess (check: its output tail
    in the failure when it exits non-zero)."""
    def run(args, cwd, nproc=1, check=True, timeout=300):
        r = subprocess.run(["bash", LAUNCHER, *map(str, args)], cwd=cwd, env=clean_env(NPROC=nproc),
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"launcher failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                                 f"{r.stderr[-5000:]}")
        return r
    return run


@pytest.fixture(scope="session")
def together():
    """together(*calls): the calls (functions of no arguments) at the same time, in threads;
    their results in order. For independent launches, tools and rank worlds (run_distributed
    serves concurrent calls): one alone leaves a core idle for long stretches (a pre-flight, a
    one-rank run, start-ups)."""
    def run(*calls):
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(call) for call in calls]
            return [f.result() for f in futures]
    return run


@pytest.fixture(scope="session")
def torchrun_tool(tmp_path_factory):
    """torchrun_tool(script, nproc, *args): tools/<script> --smoke on `nproc` torchrun ranks in a
    fresh directory, checked to exit 0 and to draw its PNG; returns the JSON it wrote."""
    def run(script, nproc, *args, timeout=120):
        d = tmp_path_factory.mktemp("tool")
        out, png = d / "out.json", d / "out.png"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), os.path.join(ROOT, "tools", script), "--smoke",
               "--json", str(out), "--png", str(png), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=d,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert os.path.getsize(png) > 0
        return json.loads(out.read_text())
    return run
