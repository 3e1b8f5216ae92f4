"""The code Megatron-Core / torch switch on only with CUDA, made the path the CPU tests run
(design §5, issue 17), checked here on CPU:

- the TransformerConfig does not depend on CUDA: every fusion off, CPU (seeded, sliced)
  initialisation on, with `torch.cuda.is_available()` faked True;
- preset bases are the same at TP=1, 2 and 4; `--attention-backend local` with packing honours
  each document's mask; every SDPA kernel CPU has matches `local`; a bf16 forward + backward
  raises no warning; one packed micro-batch mask is alive at a time;
- a CPU-saved RNG state restored into a tracker of another device kind reseeds it (one line);
- more local ranks than GPUs, `--adapter none --bf16`: one line; a collective failure's message
  appears in full on rank 0.
"""

import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch

from tests.dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_does_not_consult_cuda(monkeypatch):
    from megatron_bdlora.models.llama import transformer_config
    from megatron_bdlora.models.presets import get_preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = transformer_config(get_preset("tiny"), dtype=torch.bfloat16)
    for fusion in ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
                   "apply_rope_fusion", "gradient_accumulation_fusion", "persist_layer_norm"):
        assert getattr(cfg, fusion) is False, fusion
    assert cfg.use_cpu_initialization is True


def _packed(vocab, s=24, split=10):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (1, s), generator=g)
    docs = torch.zeros(1, s, dtype=torch.long)
    docs[:, split:] = 1
    return ids, docs


def _rank(tmp):
    from megatron.core import parallel_state as ps

    from megatron_bdlora.data.packing import attention_mask_from_document_ids
    from megatron_bdlora.models import attention
    from megatron_bdlora.models.llama import build_model, forward_logits, gather_logits
    from megatron_bdlora.models.presets import get_preset
    from megatron_bdlora.parallel import init_distributed
    from megatron_bdlora.parallel.cpu_compat import seed_model_parallel

    hf = get_preset("tiny")
    out = {"logits": {}}
    ids, docs = _packed(hf["vocab_size"])
    for tp in (1, 2, 4):  # the same seed, a different TP size: the same base
        init_distributed(tp, seed=1234)
        with torch.no_grad():
            out["logits"][tp] = gather_logits(forward_logits(build_model(hf, tp), ids), hf["vocab_size"])
    init_distributed(1, seed=1234)  # TP=1 x DP=4 from here

    # packing with Megatron's local attention: the second document alone gives the same logits
    models = {}
    for backend in ("local", "sdpa"):
        seed_model_parallel(1234)
        models[backend] = build_model(hf, 1, attention_backend=backend).eval()
    mask = attention_mask_from_document_ids(docs)
    with torch.no_grad():
        packed = forward_logits(models["local"], ids, mask)
        alone = forward_logits(models["local"], ids[:, 10:])
        ref = {"causal": forward_logits(models["local"], ids), "masked": packed}
        kernels = {}
        for kernel in ("flash", "efficient", "cudnn", "math"):
            attention.pin_kernel(kernel)
            try:
                kernels[kernel] = {"causal": forward_logits(models["sdpa"], ids),
                                   "masked": forward_logits(models["sdpa"], ids, mask)}
            except RuntimeError as e:  # a kernel this CPU build lacks
                assert "No viable backend" in str(e), e
        attention.pin_kernel("auto")
    out["pack"] = {"packed": packed[:, 10:], "alone": alone, "first": packed[:, :10]}
    out["kernels"] = {"ref": ref, "got": kernels}

    # bf16 step of the trainer's engine on the trainer's model: no warning
    from megatron_bdlora.training import trainer
    from megatron_bdlora.training.arguments import parse_args
    from megatron_bdlora.training.engine import Engine

    data = os.path.join(tmp, "unused.jsonl")
    open(data, "a").close()
    args = parse_args(["--model-preset", "tiny", "--adapter", "lora", "--lora-rank", 4, "--bf16",
                       "--data-path", data, "--seq-length", 24, "--micro-batch-size", 1,
                       "--global-batch-size", 8, "--attention-backend", "local"], world_size=4)
    (model,), _ = trainer.build(args)  # one model chunk (PP=1)
    engine = Engine(model, args)
    params = [p for p in model.parameters() if p.requires_grad]
    norms = {str(m.weight.dtype) for m in model.modules() if isinstance(m, torch.nn.RMSNorm)}
    with warnings.catch_warnings():
        # UserWarning (torch: "Mismatch dtype", ...); Megatron-Core warns of its own API deprecations
        warnings.simplefilter("error", UserWarning)
        # two packed micro-batches: each one's mask is built in the loop and gone after it
        import megatron_bdlora.training.engine as engine_mod  # the name the engine calls

        built, alive_at_build = [], []
        real = engine_mod.batch_attention_mask

        def counting(document_ids, dev=None):
            alive_at_build.append(sum(r() is not None for r in built))
            m = real(document_ids, dev)
            built.append(weakref.ref(m))
            return m

        engine_mod.batch_attention_mask = counting
        try:
            labels = ids.roll(-1, 1)
            result = engine.step([(ids, labels, docs)] * 2, 0)
        finally:
            engine_mod.batch_attention_mask = real
    out["bf16"] = {"norms": norms, "loss": float(result.loss_sum),
                   "grads": all(p.grad is not None and p.grad.dtype == torch.float32 for p in params),
                   "alive_at_build": alive_at_build, "alive_after": sum(r() is not None for r in built)}

    # RNG: a CPU-saved state restored where the tracker is CUDA's (and the reverse) is reseeded
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_bdlora.training import rng_state

    def tracked():
        with get_cuda_rng_tracker().fork():
            return torch.rand(4)

    state = rng_state.capture()
    lines = []
    for saved_on in ("cuda", "cpu"):  # a GPU checkpoint here; a CPU one "on a GPU" (kind faked)
        fake = {**state, "device": saved_on}
        if saved_on == "cpu":
            rng_state.device_kind = lambda: "cuda"
        rng_state.restore(fake, seed=77, say=lines.append)
        out.setdefault("reseeded", []).append(tracked())
    seed_model_parallel(77)
    out["rng"] = {"lines": lines, "fresh": tracked(), "dp_rank": ps.get_data_parallel_rank()}
    return out


def test_cuda_switches_on_cpu(tmp_path):
    results = run_distributed(_rank, 4, 1, str(tmp_path))
    for r in results:
        base = r["logits"][1]
        for tp in (2, 4):
            torch.testing.assert_close(r["logits"][tp], base, rtol=1e-5, atol=1e-5)
        p = r["pack"]
        torch.testing.assert_close(p["packed"], p["alone"], rtol=1e-5, atol=1e-5)
        assert (p["packed"] - base[:, 10:]).abs().max() > 1e-3  # attending doc 1 would differ

        got, ref = r["kernels"]["got"], r["kernels"]["ref"]
        assert {"flash", "math"} <= set(got), sorted(got)
        for kernel, logits in got.items():
            for kind in ("causal", "masked"):
                torch.testing.assert_close(logits[kind], ref[kind], rtol=1e-4, atol=1e-4)

        b = r["bf16"]
        assert b["norms"] == {"torch.bfloat16"} and b["grads"] and b["loss"] > 0
        assert b["alive_at_build"] == [0, 0] and b["alive_after"] == 0

        rng = r["rng"]
        assert len(rng["lines"]) == 2 and all("reseeded from 77" in line for line in rng["lines"])
        assert "saved on cpu" in rng["lines"][1] and "on cuda" in rng["lines"][1]
        for draws in r["reseeded"]:
            assert torch.equal(draws, rng["fresh"])


def test_more_local_ranks_than_gpus(monkeypatch):
    from megatron_bdlora.errors import InputError
    from megatron_bdlora.parallel.distributed import check_local_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_local_devices()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(InputError, match=r"^4 ranks per node but 2 visible GPU\(s\)") as e:
        check_local_devices()
    assert "\n" not in str(e.value)


COLLECTIVE = """
import torch, torch.distributed as dist
from megatron_bdlora.launch.rank import run_rank
run_rank(lambda: dist.all_reduce(torch.ones(1)))
"""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_collective_failure_printed_on_rank0(rank):
    env = {**os.environ, "RANK": rank, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", COLLECTIVE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert "Default process group has not been initialized" in err
    if rank == "0":  # in full: the traceback
        assert "Traceback" in err and len(err.splitlines()) > 3, err
    else:
        assert len(err.splitlines()) == 1 and "rank 1: a collective failed" in err, err


def test_gpu_smoke_cpu_mode(tmp_path):
    """tools/gpu_smoke.sh's stages in DEVICE=cpu mode against this venv (no WHEELS: nothing is
    installed); every stage passes but TE's and memory's (no CUDA allocator: the estimate only),
    and the JSON file holds each stage's figures."""
    import json
    import re

    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "STEPS": "4"}
    env.pop("WHEELS", None)
    proc = subprocess.run([os.path.join(ROOT, "tools", "gpu_smoke.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_smoke.json").read_text())
    stages = {s["stage"]: s for s in result["stages"]}
    status = {name: s["status"] for name, s in stages.items()}
    passing = ("install", "nccl", "train", "resume", "engine", "eval", "export", "sdpa", "cpu_ckpt",
               "vs_peft")
    assert status == {**{s: "PASS" for s in passing}, "te": "SKIP", "memory": "SKIP"}, status
    assert re.search(r"\b[1-9]\d* adapter tensors bit-exact", (tmp_path / "resume.log").read_text())
    assert "PASS cpu_ckpt: saved on cpu, resumed on cpu, tracker restored" in proc.stdout

    perf = stages["vs_peft"]["result"]
    assert perf["config"]["preset"] == "tiny"
    for kind in ("lora", "bdlora"):
        assert all(perf[kind][who]["tokens_per_s"] > 0 for who in ("ours", "peft")), perf
        assert re.search(rf"{kind} ours \d+ tok/s, PEFT \d+ tok/s", proc.stdout), proc.stdout
    mem = stages["memory"]["result"]
    assert mem["measured"] == "skipped on cpu" and mem["predicted_bytes"] > 0, mem
    assert mem["config"]["preset"] == "tiny" and mem["config"]["bd_nblocks"] == 4, mem
