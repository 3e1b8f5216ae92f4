"""--bf16: base weights bf16; adapter weights, their gradients and Adam state fp32; loss and grad
norm fp32; checkpoints fp32, exports in the base's dtype; a 20-step run lands within 2% of the fp32 run (tiny preset, 1 rank)."""

import os

import pytest
import torch

from tests.dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_bdlora.data.synthetic import write_demo_data

    d = tmp_path_factory.mktemp("bf16")
    return write_demo_data(str(d), 0, 200, 32, 32, "shift")


def _flags(data, save, bf16):
    return ["--model-preset", "tiny", "--tokenizer", data["tokenizer"], "--adapter", "bdlora",
            "--lora-rank", 8, "--bd-nblocks", 2, "--data-path", data["train"], "--seq-length", 32,
            "--micro-batch-size", 8, "--global-batch-size", 16, "--train-iters", 20, "--lr", 2e-2,
            "--lr-warmup-iters", 2, "--log-interval", 100, "--save", save, "--save-interval", 20,
            *(["--bf16"] if bf16 else [])]


def _runs(data, root):
    """Rank 0 of one process: fp32 then bf16 (20 steps each); dtypes seen inside the bf16 run."""
    import torch

    from megatron_bdlora.adapters import adapter_modules
    from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint
    from megatron_bdlora.training import trainer
    from megatron_bdlora.training.arguments import parse_args
    from megatron_bdlora.training.engine import Engine

    out = {}
    for bf16 in (False, True):
        save = os.path.join(root, "bf16" if bf16 else "fp32")
        res = trainer.train(parse_args(_flags(data, save, bf16)))
        ck = AdapterCheckpoint(save)
        out["bf16" if bf16 else "fp32"] = {
            "loss": res["loss"], "first": _first_loss(save),
            "ckpt_dtypes": {str(t.dtype) for t in ck.tensors.values()},
            "opt_dtypes": {str(t.dtype) for t in ck.optimizer_state()[0].values()}}

    # One step by hand on the bf16 model: what lives in which dtype.
    args = parse_args(_flags(data, os.path.join(root, "x"), True))
    (model,), _ = trainer.build(args)  # one model chunk (PP=1)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = Engine(model, args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.info.hf_config["vocab_size"], (2, 16), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :4] = -100
    result = engine.step([(ids, labels, None)], 0)
    loss, norm = result.loss_sum, result.grad_norm
    opt = engine.optimizer.chained_optimizers[0].optimizer  # the torch Adam inside Megatron's
    layer = next(m for m in adapter_modules(model).values())
    out["step"] = {
        "base": str(layer.base.weight.dtype), "loss": str(loss.dtype), "norm": type(norm).__name__,
        "params": {str(p.dtype) for p in params}, "grads": {str(p.grad.dtype) for p in params},
        "adam": {str(v.dtype) for s in opt.state.values() for k, v in s.items() if k != "step"},
        "n_params": len(params)}
    return out


def _first_loss(save):
    import json

    with open(os.path.join(save, "metrics.jsonl")) as f:
        return next(r["loss"] for r in map(json.loads, f) if "loss" in r)


def test_bf16_matches_fp32_and_keeps_fp32_adapters(data, tmp_path):
    out = run_distributed(_runs, 1, 1, data, str(tmp_path))[0]
    fp32, bf16, step = out["fp32"], out["bf16"], out["step"]
    # it learned (so the comparison means something), and bf16 lands within 2% of fp32
    assert fp32["loss"] < fp32["first"] - 0.3, fp32
    assert abs(bf16["loss"] - fp32["loss"]) <= 0.02 * fp32["loss"], (bf16, fp32)
    assert bf16["loss"] < bf16["first"] - 0.3, bf16
    # base in bf16; every adapter param, grad and Adam moment fp32; loss and grad norm fp32
    assert step["base"] == "torch.bfloat16"
    assert step["n_params"] > 0 and step["params"] == step["grads"] == step["adam"] == {"torch.float32"}
    assert step["loss"] == "torch.float32" and step["norm"] == "float"
    # checkpoints keep fp32 adapters and moments
    assert bf16["ckpt_dtypes"] == bf16["opt_dtypes"] == {"torch.float32"}
    # exports default to the dtype the run held the base in; --dtype overrides
    assert _exported_dtypes(tmp_path / "bf16", tmp_path / "e1") == {torch.bfloat16}
    assert _exported_dtypes(tmp_path / "fp32", tmp_path / "e2") == {torch.float32}
    assert _exported_dtypes(tmp_path / "bf16", tmp_path / "e3", torch.float32) == {torch.float32}


def _exported_dtypes(ckpt, out, dtype=None):
    from safetensors.torch import load_file

    from megatron_bdlora.checkpoint.export import export

    export(str(ckpt), "hf-peft", str(out), dtype=dtype)
    return {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()}
