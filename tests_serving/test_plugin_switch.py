"""The plugin's switch and pin, in fresh interpreters: off, vLLM is untouched; on, its LoRA class
list starts with the BD layers and the LoRA config's hash (vLLM's compile-cache key) differs;
another vLLM version or switch value is refused in one line."""

import os
import subprocess
import sys

import pytest

PROBE = """
import vllm, os
from megatron_bdlora.serving import vllm_plugin
vllm.__version__ = os.environ.get("FAKE_VLLM_VERSION", vllm.__version__)
vllm_plugin.register()
from vllm.config.lora import LoRAConfig
from vllm.lora import utils
print(utils._all_lora_classes[0].__name__, LoRAConfig(max_lora_rank=16).compute_hash())
"""


def probe(**env):
    r = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=300)
    return r.returncode, r.stdout.strip().splitlines()[-1:] , r.stderr.strip().splitlines()[-1:]


def test_switch_pin_and_hash():
    rc_off, off, _ = probe(MEGATRON_BDLORA_VLLM="0")
    rc_on, on, _ = probe(MEGATRON_BDLORA_VLLM="1")
    assert rc_off == rc_on == 0
    (cls_off, hash_off), (cls_on, hash_on) = off[0].split(), on[0].split()
    assert cls_off == "VocabParallelEmbeddingWithLoRA" and cls_on == "BDMergedQKVParallelLinearWithLoRA"
    assert hash_off != hash_on
    rc, _, err = probe(MEGATRON_BDLORA_VLLM="1", FAKE_VLLM_VERSION="0.31.0")
    assert rc and "MEGATRON_BDLORA_VLLM=1 needs vLLM 0.32.0 or 0.33.0" in err[0] and "0.31.0" in err[0]
    rc, _, err = probe(MEGATRON_BDLORA_VLLM="yes")
    assert rc and "MEGATRON_BDLORA_VLLM='yes': use 1" in err[0]


@pytest.mark.parametrize("n", [1, 2])
def test_block_shards_add_up(n):
    """Summed over the ranks, the local products are the full block-diagonal ΔW (the BD layers'
    arithmetic without an engine)."""
    import torch

    from megatron_bdlora.adapters.strategies import COLUMN, ROW, STRATEGIES

    bd = STRATEGIES["bd"]

    gen = torch.Generator().manual_seed(n)
    r, nb, out, inp = 8, 4, 16, 12
    a, b_packed = torch.randn(r, inp, generator=gen), torch.randn(out, r // nb, generator=gen)
    full = torch.block_diag(*b_packed.chunk(nb, 0)) @ a  # column: (out, in)
    t = 2 * n if nb % (2 * n) == 0 else 2
    rows = [(lambda ab: ab[1] @ ab[0])(bd.rank_slice(COLUMN, a, b_packed, nb, t, i)) for i in range(t)]
    torch.testing.assert_close(torch.cat(rows), full)
    a_packed, b = torch.randn(r, inp // nb, generator=gen), torch.randn(out, r, generator=gen)
    full = b @ torch.block_diag(*a_packed.chunk(nb, 0))  # row: (out, in)
    parts = [bd.rank_slice(ROW, a_packed, b, nb, t, i) for i in range(t)]
    x = torch.randn(3, inp, generator=gen)
    got = sum(xi @ ai.T @ bi.T for xi, (ai, bi) in zip(x.chunk(t, 1), parts))
    torch.testing.assert_close(got, x @ full.T)
