"""The trainer's GPU-facing semantics, checked on CPU (gloo, real Megatron-Core, TP=1 x DP=2):

- token-normalised loss: DP=2 x 2 micro-batches gives the gradient of one batch of 4 (the sum of
  token losses / all supervised tokens), with uneven loss masks; the clipped norm is that
  gradient's norm;
- evaluation sees the same records every call: the first --eval-iters global batches (each
  record once when the set is smaller);
- full recompute (--recompute-granularity full) and selective (--recompute-activations, Megatron's
  meaning) with adapters (frozen base): the loss and every adapter gradient equal the plain run's;
- the RNG state (CPU generator + Megatron's tracker) round-trips through a checkpoint.
"""

import os

import torch

from tests.dist_utils import run_distributed

SEQ, MICRO = 16, 2


def _args(tmp, *extra):
    from megatron_bdlora.training.arguments import parse_args

    data = os.path.join(tmp, "unused.jsonl")
    open(data, "a").close()
    return parse_args(["--model-preset", "tiny", "--adapter", "bdlora", "--lora-rank", 4,
                       "--bd-nblocks", 2, "--data-path", data, "--seq-length", SEQ,
                       "--micro-batch-size", MICRO, "--global-batch-size", 2 * MICRO * 2, *extra],
                      world_size=2)


def _randomise_b(model):
    """B starts at zero (then A gets no gradient): give every factor a fixed random value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _batches(n, vocab, seed=0):
    """n micro-batches with very uneven numbers of supervised tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        ids = torch.randint(0, vocab, (MICRO, SEQ), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, : [1, 13, 6, 15][k % 4]] = -100  # 15, 3, 10 and 1 targets per row
        out.append((ids, labels, None))
    return out


def _grads(params):
    return [p.grad.detach().clone() for p in params]


def _rank(tmp):
    from megatron.core import parallel_state as ps

    from megatron_bdlora.models.llama import lm_loss
    from megatron_bdlora.parallel.cpu_compat import seed_model_parallel
    from megatron_bdlora.training import rng_state, trainer
    from megatron_bdlora.training.engine import Engine

    dp_rank = ps.get_data_parallel_rank()
    out = {}

    # ---- token-normalised loss over DP x accumulation ----
    args = _args(tmp, "--clip-grad", "1e-3")  # clips: every grad scaled to norm 1e-3
    (model,), _ = trainer.build(args)  # one model chunk (PP=1)
    _randomise_b(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = _batches(4, model.info.hf_config["vocab_size"])
    total = sum(int((lab != -100).sum()) for _, lab, _ in batches)
    for ids, labels, mask in batches:  # one batch of 4, by definition, no collectives
        loss, _ = lm_loss(model, ids, labels, mask, reduction="sum")
        (loss / total).backward()
    ref = _grads(params)
    model.zero_grad(set_to_none=True)
    for ids, labels, mask in batches:  # the old per-micro-batch mean, for contrast
        loss, _ = lm_loss(model, ids, labels, mask)
        (loss / 4).backward()
    mean_of_means = _grads(params)
    model.zero_grad(set_to_none=True)
    # the trainer's step (Megatron-Core's engine): DP-reduced, token-normalised, clipped grads
    result = Engine(model, args).step(batches[2 * dp_rank: 2 * dp_rank + 2], 0)
    norm = result.grad_norm
    clipped = _grads(params)
    got = [g * (norm + 1e-6) / 1e-3 for g in clipped]  # undo the clipping coefficient
    out["dp"] = {"ref": ref, "got": got, "mean_of_means": mean_of_means,
                 "tokens": result.global_loss()[1], "total": total, "norm": norm,
                 "clipped": float(torch.cat([g.reshape(-1) for g in clipped]).norm())}

    # ---- fixed eval data ----
    import datasets

    from megatron_bdlora.data import DataIterator, DistributedBatchSampler, build_dataset

    g = torch.Generator().manual_seed(3)
    records = {"input_ids": [torch.randint(0, model.info.hf_config["vocab_size"], (SEQ,), generator=g).tolist()
                             for _ in range(24)],
               # 1 to SEQ - 1 targets per record (uneven masks)
               "loss_mask": [[0] * (i % (SEQ - 1) + 1) + [1] * (SEQ - 1 - i % (SEQ - 1)) for i in range(24)]}
    rows = build_dataset(datasets.Dataset.from_dict(records), None, SEQ,
                         cache_dir=os.path.join(tmp, f"cache-{dp_rank}"))
    assert len(rows) == 24
    sampler = DistributedBatchSampler(len(rows), MICRO, dp_rank=dp_rank, dp_size=2,
                                      global_batch_size=8, seed=5)
    it = DataIterator(rows, sampler)
    first = trainer.evaluate([model], it, 1)
    next(it)  # training-style consumption in between must not move the eval window
    second = trainer.evaluate([model], it, 1)
    chosen = sampler._order(0)[:8].tolist()  # the first global batch, all DP ranks
    ids = torch.stack([rows[i]["input_ids"] for i in chosen])
    labels = torch.stack([rows[i]["labels"] for i in chosen])
    with torch.no_grad():
        s, n = lm_loss(model, ids, labels, reduction="sum")
    whole = trainer.evaluate([model], it, 100)  # more than the set holds: each record once
    out["eval"] = {"first": first, "second": second, "ref_loss": float(s / n), "ref_tokens": int(n),
                   "whole": whole["tokens"], "all_tokens": sum(int((rows[i]["labels"] != -100).sum()) for i in range(len(rows)))}

    # ---- recompute with adapters vs plain ----
    res = {}
    full = ["--recompute-granularity", "full", "--recompute-method", "uniform",
            "--recompute-num-layers", 1]
    for tag, extra in (("plain", []), ("full", full), ("selective", ["--recompute-activations"])):
        seed_model_parallel(1234)  # the same random base for both
        (m,), _ = trainer.build(_args(tmp, *extra))
        _randomise_b(m)
        ids, labels, _ = batches[1]
        loss, _ = lm_loss(m, ids, labels)
        loss.backward()
        res[tag] = {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in m.named_parameters()
                                                  if p.requires_grad}}
    out["recompute"] = res

    # ---- RNG state round trip through a checkpoint ----
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint, save_checkpoint

    def draws():
        with get_cuda_rng_tracker().fork():
            tracked = torch.rand(4)
        return torch.cat([torch.rand(4), tracked])

    root = os.path.join(tmp, "rng")
    save_checkpoint(root, model, extra_state={"step": 1, "rng": rng_state.capture()})
    expected = draws()
    rng_state.restore(AdapterCheckpoint(root).extra_state()["rng"], seed=0, say=None)
    out["rng"] = {"expected": expected, "again": draws()}
    return out


def test_gpu_readiness_semantics(tmp_path):
    results = run_distributed(_rank, 2, 1, str(tmp_path))
    for r in results:
        dp = r["dp"]
        assert dp["tokens"] == dp["total"] == 2 * (15 + 3 + 10 + 1)
        for got, ref in zip(dp["got"], dp["ref"]):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
        # uneven masks: the per-micro-batch mean is a different gradient (the test can fail)
        diff = max(float((a - b).abs().max() / b.abs().max())
                   for a, b in zip(dp["mean_of_means"], dp["ref"]))
        assert diff > 1e-2, diff
        full = torch.cat([g.reshape(-1) for g in dp["ref"]]).norm()
        assert abs(dp["norm"] - float(full)) <= 1e-5 * float(full)
        assert abs(dp["clipped"] - 1e-3) < 1e-6

        ev = r["eval"]
        assert ev["first"] == ev["second"]
        assert ev["first"]["tokens"] == ev["ref_tokens"]
        assert abs(ev["first"]["loss"] - ev["ref_loss"]) <= 1e-5 * ev["ref_loss"]
        assert ev["whole"] == ev["all_tokens"]

        plain = r["recompute"]["plain"]
        for rec in (r["recompute"]["full"], r["recompute"]["selective"]):
            assert abs(plain["loss"] - rec["loss"]) <= 1e-6 * abs(plain["loss"])
            assert plain["grads"].keys() == rec["grads"].keys() and len(plain["grads"]) > 0
            for name, g in plain["grads"].items():
                assert g.abs().sum() > 0, name
                torch.testing.assert_close(rec["grads"][name], g, rtol=1e-5, atol=1e-7)

        assert torch.equal(r["rng"]["expected"], r["rng"]["again"])
    # DP ranks hold the same (synced) gradient
    for a, b in zip(results[0]["dp"]["got"], results[1]["dp"]["got"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_memory_model_attention_and_sequence_parallel():
    """Local attention keeps 6*b*(heads/t)*s^2 bytes of scores per layer (~0.8 GB for the 8B
    recipe's micro-batch at seq 4096), flash O(s); SP splits activations; the recipes use both."""
    import yaml

    from megatron_bdlora.analytic import memory_model as mm
    from megatron_bdlora.analytic.cost_model import make_adapter
    from megatron_bdlora.models.presets import get_preset

    hf, cfg = get_preset("llama3.1-8b"), make_adapter("bd", 64, nblocks=8)
    kw = dict(tp=8, micro_batch=2, seq=4096, adapter=cfg)
    sdpa, local = mm.estimate(hf, **kw), mm.estimate(hf, attention="local", **kw)
    per_layer = 6 * 2 * 32 // 8 * 4096 ** 2
    assert local["attention_scores_per_layer"] == per_layer and 0.75e9 < per_layer < 0.85e9
    assert local["activations_no_recompute"] - sdpa["activations_no_recompute"] == \
        hf["num_hidden_layers"] * (per_layer - sdpa["attention_scores_per_layer"])
    # with recompute only one layer's scores are alive
    rec = mm.estimate(hf, attention="local", recompute=True, **kw)
    assert rec["activations_full_recompute"] < sdpa["activations_no_recompute"]
    sp = mm.estimate(hf, sequence_parallel=True, **kw)
    assert sp["activations_no_recompute"] < 0.75 * sdpa["activations_no_recompute"]
    assert sp["activations_full_recompute"] < sdpa["activations_full_recompute"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("llama3.1-8b_bdlora_a100.yaml", "llama3.1-70b_bdlora_a100.yaml"):
        with open(os.path.join(root, "examples", "recipes", name)) as f:
            recipe = yaml.safe_load(f)
        assert recipe["attention-backend"] == "sdpa" and recipe["sequence-parallel"] is True
