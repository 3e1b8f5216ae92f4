"""tools/benchmark_vs_peft.py --smoke runs, writes the JSON the issue specifies, and its first-step
losses are the trainer's (ours) and transformers' (PEFT) losses on the same batch."""

import json
import os
import subprocess
import sys

import pytest

from tests.dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference_losses():
    """The smoke config's batch through the trainer's own loss (models/llama.lm_loss) on the
    benchmark's base, and through transformers' LlamaForCausalLM built the same way. LoRA's B
    starts at zero, so the first step's loss is the base's for every method."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bdlora.benchmarks.shared_base import build_models
    from megatron_bdlora.benchmarks.timing import adapter_configs
    from megatron_bdlora.benchmarks.training import random_batch
    from megatron_bdlora.benchmarks.vs_peft import VsPeftConfig
    from megatron_bdlora.models.llama import lm_loss

    cfg = VsPeftConfig.smoke()
    hf = cfg.hf()
    ids, labels = random_batch(cfg, hf, 0)
    base = build_models(hf, {"base": adapter_configs(hf, cfg.lora_rank, cfg.bd_rank,
                                                     cfg.bd_nblocks)["base"]}, seed=cfg.seed)["base"]
    with torch.no_grad():
        ours = lm_loss(base, ids, labels)[0].item()
        torch.manual_seed(cfg.seed)
        logits = LlamaForCausalLM(LlamaConfig(**hf))(input_ids=ids).logits
        mask = labels != -100
        theirs = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask]).item()
    return ours, theirs


def test_vs_peft_smoke(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark_vs_peft.py"), "--smoke",
                           "--json", str(out), "--png", str(tmp_path / "r.png")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["hidden"] == 64 and result["config"]["dtype"] == "fp32"
    assert "Engine.step" in result["config"]["step"]  # ours runs the trainer's own step
    assert set(result["results"]) == {"lora", "bdlora"}
    ((ours, theirs),) = run_distributed(_reference_losses, 1, 1)
    assert result["base"]["first_step_loss"] == pytest.approx(ours, abs=1e-5)
    for kind, r in result["results"].items():
        for key in ("speedup_vs_peft", "overhead_vs_base"):
            assert r[key]["p10"] > 0, (kind, key, r[key])
        assert 1 < r["flop_ratio"] < r["overhead_bound"] < 2
        assert r["ours"]["trainable_params"] == r["peft"]["trainable_params"] == r["adapter"]["params"]
        assert r["ours"]["first_step_loss"] == pytest.approx(ours, abs=1e-5), kind
        assert r["peft"]["first_step_loss"] == pytest.approx(theirs, abs=1e-5), kind
    assert (tmp_path / "r.png").stat().st_size > 0
    assert "ours/PEFT" in proc.stdout
