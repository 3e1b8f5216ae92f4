"""Measured training step: forward + backward + (DP gradient all-reduce) + AdamW step.

Methods base / replicated / slora / bd on one randomly initialised Llama shape, all in the same
processes, repetitions interleaved round-robin. `base` is the frozen model with no adapter: its
step is forward + backward down to the embedding output (made to require grad, as it is for
every method here, so each method runs the same backward through the base) and no optimizer
work. With world size = TP x DP, each DP replica gets its own batch and the adapter gradients
are summed over the DP group in one flat all-reduce (one bucket, as Megatron's DDP does),
then averaged. With `sequence_parallel` (TP > 1) every model runs Megatron's sequence
parallelism and the step also runs the trainer's SP gradient reduction (nothing is issued: the
norms are frozen). Per method: step time median and p10/p90, tokens/s (all DP replicas),
collectives of one step per phase (forward, backward, sp_grads, grad_sync, optimizer), paired
ratios to base and bd.
"""

from dataclasses import asdict, dataclass

import torch

from megatron_bdlora.benchmarks.timing import (METHODS, adapter_configs, bar_chart, build_models,
                                               collective_calls, collective_columns,
                                               interleaved_times, llama_shape, paired_ratio,
                                               run_environment, spread_ms, summary_ms)
from megatron_bdlora.parallel.sequence_parallel import allreduce_sequence_parallel_grads


@dataclass
class TrainingConfig:
    hidden: int = 1024
    ffn: int = 2816
    layers: int = 4
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 8192
    batch: int = 2              # sequences per DP replica per step
    seq_len: int = 256
    steps: int = 3              # timed steps per method per repetition
    reps: int = 4
    warmup: int = 1
    lora_rank: int = 16
    bd_rank: int | None = None  # None: parameter-matched to lora_rank
    bd_nblocks: int | None = None  # None: the TP size
    lr: float = 1e-4
    seed: int = 0
    sequence_parallel: bool = False

    @classmethod
    def smoke(cls) -> "TrainingConfig":
        return cls(hidden=128, ffn=256, layers=2, heads=8, kv_heads=4, vocab=512, batch=2,
                   seq_len=32, steps=1, reps=2, warmup=1, lora_rank=8)


def _embedding_output_requires_grad(model) -> None:
    """The backward must reach the first layer even with a frozen base (docs/design.md §3)."""
    model.embedding.register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_(True))


class _Trainer:
    def __init__(self, model, lr: float):
        from megatron.core import parallel_state as ps

        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr) if self.params else None
        self.dp_group = ps.get_data_parallel_group()
        self.dp = ps.get_data_parallel_world_size()

    def step(self, ids, labels, counts=None):
        import contextlib

        from megatron_bdlora.models.llama import lm_loss

        phase = counts.phase if counts is not None else (lambda name: contextlib.nullcontext())
        with phase("forward"):
            loss, _ = lm_loss(self.model, ids, labels)
        with phase("backward"):
            loss.backward()
        with phase("sp_grads"):
            allreduce_sequence_parallel_grads(self.model)
        with phase("grad_sync"):
            self._sync_grads()
        with phase("optimizer"):
            if self.opt is not None:
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def _sync_grads(self):
        import torch.distributed as dist

        if self.dp == 1 or not self.params:
            return
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        flat /= self.dp
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _batch(cfg, dp_rank: int):
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + dp_rank + 1)
    ids = torch.randint(2, cfg.vocab, (cfg.batch, cfg.seq_len), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, labels


def run_training(cfg: TrainingConfig) -> dict:
    """Run on every rank; TP from Megatron's parallel state, DP = world / TP."""
    from megatron.core import parallel_state as ps

    from megatron_bdlora.adapters import adapter_params
    from megatron_bdlora.parallel import count_collectives, device, tp_rank_size

    tp = tp_rank_size()[1]
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    nblocks = cfg.bd_nblocks or tp
    hf = llama_shape(cfg.hidden, cfg.ffn, cfg.layers, cfg.heads, cfg.kv_heads, cfg.vocab)
    configs = adapter_configs(hf, cfg.lora_rank, cfg.bd_rank, nblocks)
    models = build_models(hf, configs, seed=cfg.seed, sequence_parallel=cfg.sequence_parallel)
    trainers = {}
    for m, model in models.items():
        model.train()
        _embedding_output_requires_grad(model)
        trainers[m] = _Trainer(model, cfg.lr)
    ids, labels = (t.to(device()) for t in _batch(cfg, dp_rank))

    collectives, losses = {}, {}
    for m in METHODS:  # one counted step each (also the first warm-up step)
        with count_collectives() as counts:
            losses[m] = trainers[m].step(ids, labels, counts).item()
        collectives[m] = counts.as_dict()

    times = interleaved_times({m: (lambda t=trainers[m]: t.step(ids, labels)) for m in METHODS},
                              cfg.steps, cfg.reps, cfg.warmup)

    tokens = cfg.batch * cfg.seq_len * dp
    results = {}
    for m in METHODS:
        s = summary_ms(times[m])
        per_step = {}
        for ops in collectives[m].values():
            for op, v in ops.items():
                e = per_step.setdefault(op, {"calls": 0, "bytes": 0})
                e["calls"] += v["calls"]
                e["bytes"] += v["bytes"]
        acfg = configs[m]
        results[m] = {
            "step_ms_median": s["median"], "step_ms_p10": s["p10"], "step_ms_p90": s["p90"],
            "tokens_per_s": tokens / (s["median"] / 1e3),
            "collectives_per_step": dict(sorted(per_step.items())),
            "collectives_per_phase": collectives[m],
            "step_ratio_to_base": paired_ratio(times[m], times["base"]),
            "step_ratio_to_bd": paired_ratio(times[m], times["bd"]),
            "trainable_params_this_rank": sum(p.numel() for p in trainers[m].params),
            "adapter": None if acfg is None else {
                "strategy": acfg.strategy, "rank": acfg.rank,
                "nblocks": acfg.nblocks if acfg.strategy == "bd" else None, "layout": acfg.layout,
                "params": adapter_params(hf, acfg)},
            "first_step_loss": losses[m], "steps_timed": s["n"],
        }
    bd_c, base_c = collectives["bd"], collectives["base"]
    results["bd"]["tp_collectives_equal_base"] = all(
        bd_c.get(ph, {}) == base_c.get(ph, {})
        for ph in ("forward", "backward", "sp_grads", "optimizer"))
    config = {**asdict(cfg), "tp": tp, "dp": dp, "bd_nblocks": nblocks, "bd_rank": configs["bd"].rank,
              **run_environment(), "tokens_per_step": tokens, "model": hf,
              "step": "forward + backward + DP grad all-reduce (flat, DP>1) + AdamW on trainable params",
              "timing": "methods interleaved step by step (rotating order); step time = slowest "
                        "rank; ratios paired per step (same repetition and step index)"}
    return {"config": config, "results": results}


def plot(result: dict, path: str) -> None:
    r, c = result["results"], result["config"]
    sp = " (SP)" if c["sequence_parallel"] else ""
    bar_chart(path, f"training step, TP={c['tp']}{sp} x DP={c['dp']}, {c['tokens_per_step']} tokens/step, "
                    f"LoRA r={c['lora_rank']} / BD r={c['bd_rank']} N={c['bd_nblocks']}", [
        ("step, ms (median, p10-p90)", {m: spread_ms(v, "step") for m, v in r.items()}),
        ("tokens/s", {m: (v["tokens_per_s"],) * 3 for m, v in r.items()}),
        ("collective calls per step",
         {m: collective_calls(v["collectives_per_step"]) for m, v in r.items()}),
    ])


def format_table(result: dict) -> str:
    r = result["results"]
    coll_head, coll = collective_columns(r, "collectives_per_step")
    head = (f"{'method':<11}{'step ms':>10}{'p10-p90':>17}{'x base':>8}{'x bd':>8}{'tokens/s':>10}  "
            + coll_head)
    lines = [head, "-" * len(head)]
    for m, v in r.items():
        lines.append(f"{m:<11}{v['step_ms_median']:>10.1f}{v['step_ms_p10']:>8.1f}-{v['step_ms_p90']:<8.1f}"
                     f"{v['step_ratio_to_base']['median']:>8.3f}{v['step_ratio_to_bd']['median']:>8.3f}"
                     f"{v['tokens_per_s']:>10.1f}  {coll[m]}")
    return "\n".join(lines)
