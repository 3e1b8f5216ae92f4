"""vLLM BD build at any rank (`export --format vllm --max-lora-rank R`): the packed bd/ adapter is
zero-padded per block from r/N to R/N ranks with alpha rescaled, so every block's s·B_j·A_j, and
the whole dense expansion, is unchanged; R defaults to the smallest allowed vLLM rank >= r that N
divides. Single process: no TP needed (exports never build a model).
"""

import json
import math
import os

import pytest
import torch

from tests.helpers import peft_records, save_peft

from megatron_bdlora.adapters import AdapterConfig
from megatron_bdlora.checkpoint.export import (
    dense_deltas, expected_global_shapes, hf_factors, pad_bd_rank, vllm_max_lora_rank,
)
from megatron_bdlora.errors import CheckpointError
from megatron_bdlora.models.presets import get_preset

ROW = ("o_proj", "down_proj")


def _blocks(a, b, n, proj):
    """Per-block products B_j A_j of PEFT-packed factors (rank blocks of r/N)."""
    if proj in ROW:  # A packed (r, in/N): block j = rows j, input chunk j
        return [b.chunk(n, 1)[j] @ a.chunk(n, 0)[j] for j in range(n)]
    return [b.chunk(n, 0)[j] @ a.chunk(n, 0)[j] for j in range(n)]  # B packed (out, r/N)


@pytest.mark.parametrize("kw, rank", [
    (dict(rank=6, nblocks=2, alpha=16.0), 8),
    (dict(rank=4, nblocks=4, alpha=3.0, rslora=True, layout="fused"), 16),
    (dict(rank=8, nblocks=2, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj")), 32),
])
def test_padding_keeps_every_block(kw, rank):
    hf = get_preset("tiny")
    cfg = AdapterConfig(method="bdlora", **kw)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=gen) for k, s in expected_global_shapes(hf, cfg).items()}
    padded, pcfg = pad_bd_rank(tensors, cfg, rank)
    assert pcfg.rank == rank and math.isclose(pcfg.scale, cfg.scale, rel_tol=1e-12)
    assert {k: tuple(v.shape) for k, v in padded.items()} == expected_global_shapes(hf, pcfg)
    before, after = hf_factors(tensors, cfg, hf, packed=True), hf_factors(padded, pcfg, hf, packed=True)
    n = cfg.nblocks
    for name, (a, b) in before.items():
        pa, pb = after[name]
        proj = name.rsplit(".", 1)[-1]
        for j, (x, y) in enumerate(zip(_blocks(a, b, n, proj), _blocks(pa, pb, n, proj))):
            torch.testing.assert_close(pcfg.scale * y, cfg.scale * x, rtol=1e-6, atol=1e-6,
                                       msg=f"{name} block {j}")
        # the padded ranks hold zeros only: the original factors sit at the start of each block
        k, pk = cfg.rank // n, rank // n
        pb_blocks = pb.unflatten(1, (n, pk)) if proj in ROW else pb.unflatten(0, (n, -1))
        assert torch.count_nonzero(pb_blocks[..., k:]) == 0, name
    d0, d1 = dense_deltas(tensors, cfg, hf), dense_deltas(padded, pcfg, hf)
    for k in d0:
        torch.testing.assert_close(d1[k], d0[k], rtol=1e-5, atol=1e-6)


def test_default_rank_and_errors():
    def cfg(r, n=1):
        return AdapterConfig(method="bdlora" if n > 1 else "lora", rank=r, nblocks=n)

    assert [vllm_max_lora_rank(cfg(r, n)) for r, n in ((6, 2), (8, 1), (5, 1), (24, 8), (1, 1), (320, 64))] \
        == [8, 8, 8, 32, 1, 320]
    assert vllm_max_lora_rank(cfg(6, 2), 64) == 64
    for c, requested, needle in ((cfg(9, 3), None, "divisible by its 3 blocks"),
                                 (cfg(600), None, "rank 600 exceeds vLLM's largest --max-lora-rank 512"),
                                 (cfg(32, 2), 16, "rank r=32 is above --max-lora-rank 16"),
                                 (cfg(6, 2), 12, "not one of vLLM's allowed ranks"),
                                 (cfg(128, 128), 320, "not divisible by the adapter's 128 blocks")):
        with pytest.raises(CheckpointError, match=needle):
            vllm_max_lora_rank(c, requested)


def test_vllm_export_padded_bd_serves_like_the_original(tmp_path, tiny_base):
    """A PEFT BD adapter at r=6, N=2 -> import -> vllm export: bd/ is r=8 (default) or 16, and
    PEFT computes the same logits from it as from the original adapter."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from megatron_bdlora.checkpoint.export import export
    from megatron_bdlora.checkpoint.peft_import import import_peft

    base, orig, ck = tiny_base, str(tmp_path / "peft"), str(tmp_path / "ck")
    ref, _ = save_peft(base, orig, dict(r=6, lora_alpha=5, use_rslora=True, nblocks=2,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"]), seed=7)
    import_peft(orig, base, ck)
    for requested, rank in ((None, 8), (16, 16)):
        out = str(tmp_path / f"vllm{rank}")
        msgs = export(ck, "vllm", out, max_lora_rank=requested)
        assert any(f"--max-lora-rank {rank}" in m for m in msgs), msgs
        cfg = json.load(open(os.path.join(out, "bd", "adapter_config.json")))
        assert cfg["r"] == rank and cfg["use_bdlora"]["nblocks"] == 2 and cfg["use_rslora"]
        assert math.isclose(cfg["lora_alpha"], 5 * math.sqrt(rank / 6), rel_tol=1e-12)
        readme = open(os.path.join(out, "README.md")).read()
        assert f"--max-lora-rank {rank} --tensor-parallel-size 2 --block-diagonal-sharded-loras" in readme
        assert "Stock vLLM refuses `bd/`" in readme and "zero-padded" in readme
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          os.path.join(out, "bd")).eval()
        with torch.no_grad():
            got = model(peft_records()).logits
        d = (got - ref).abs().max().item()
        assert d <= 1e-5 * max(1.0, ref.abs().max().item()), (rank, d)
        print(f"[vllm padding] r=6 -> R={rank}: max |PEFT(bd/) - PEFT(original)| = {d:.2e}")
    with pytest.raises(CheckpointError, match="--max-lora-rank is for --format vllm"):
        export(ck, "hf-peft", str(tmp_path / "x"), max_lora_rank=8)
    assert not os.path.exists(tmp_path / "x")
