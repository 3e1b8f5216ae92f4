"""Measured training step: the trainer's own train_step (training/trainer.py) per method.

Methods base / replicated / slora / bd on one randomly initialised Llama shape, all in the same
processes, repetitions interleaved round-robin. `base` is the frozen model with no adapter: its
step is forward + backward down to the embedding output (made to require grad, as it is for
every method here, so each method runs the same backward through the base) and no optimizer
work. The step is the one train() runs (training/engine.py, Megatron-Core's engine): forward
and backward through its schedule, the loss over the global batch's supervised tokens, its DDP
gradient reduce over DP with the SP norm-grad reduction and the token count's DP all-reduce
(grad_sync), its global grad norm (one scalar all-reduce when there are gradients), clipping,
the non-finite check and Adam (optimizer). With world size = TP x DP each DP replica gets its
own batch. Per method: step time median and p10/p90, tokens/s (all DP replicas), collectives
of one step per phase (forward, backward, grad_sync, optimizer), paired ratios to base and bd.
"""

from dataclasses import asdict, dataclass

import torch

from megatron_bdlora.adapters import adapter_params
from megatron_bdlora.adapters.strategies import strategy_of
from megatron_bdlora.benchmarks.shared_base import build_models
from megatron_bdlora.benchmarks.timing import (METHODS, adapter_configs, bar_chart,
                                               collective_calls, collective_columns,
                                               interleaved_times, llama_shape, paired_ratio,
                                               run_environment, spread_ms, summary_ms)
from megatron_bdlora.parallel import count_collectives, device, tp_rank_size
from megatron_bdlora.training.arguments import build_parser
from megatron_bdlora.training.engine import Engine, no_phase
from megatron_bdlora.training.trainer import backward_to_embedding


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


class TrainerStep:
    """The trainer's own step, training/engine.Engine.step (Megatron-Core's schedule, DDP,
    optimizer and scheduler: loss over the global batch's supervised tokens, DP reduce,
    clipping, non-finite check, Adam), with the trainer's default flags but --lr, a constant
    schedule and `flags`, on the caller's batch.
    The embedding output requires grad, so even the frozen base runs its backward."""

    def __init__(self, model, lr: float, flags=()):
        self.model = model
        model.train()
        backward_to_embedding(model)
        self.args = build_parser().parse_args(["--lr", str(lr), "--lr-decay-style", "constant",
                                               *flags])
        self.engine = Engine(model, self.args)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps = 0

    def step(self, ids, labels, counts=None):
        """One step on (ids, labels) as one micro-batch; `counts` (count_collectives) gets each
        part of the step as a phase. Returns the engine's StepResult."""
        phase = counts.phase if counts is not None else no_phase
        result = self.engine.step([(ids, labels, None)], self.steps, phase)
        self.steps += 1
        return result

    def grads(self) -> dict:
        """{parameter: its gradient of the last step (after DP reduce and clipping)}."""
        return {p: p.main_grad for p in self.params}

    @staticmethod
    def loss(result) -> float:
        """The step's loss over the global batch (summed over DP), as the trainer logs it."""
        return result.global_loss()[0]


def random_batch(cfg, hf: dict, dp_rank: int):
    """(ids, labels): cfg.batch x cfg.seq_len token ids over the model's vocabulary (hf's)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + dp_rank + 1)
    ids = torch.randint(2, hf["vocab_size"], (cfg.batch, cfg.seq_len), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, labels


def run_training(cfg: TrainingConfig) -> dict:
    """Run on every rank; TP from Megatron's parallel state, DP = world / TP."""
    from megatron.core import parallel_state as ps

    tp = tp_rank_size()[1]
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    nblocks = cfg.bd_nblocks or tp
    hf = llama_shape(cfg.hidden, cfg.ffn, cfg.layers, cfg.heads, cfg.kv_heads, cfg.vocab)
    configs = adapter_configs(hf, cfg.lora_rank, cfg.bd_rank, nblocks)
    models = build_models(hf, configs, seed=cfg.seed, sequence_parallel=cfg.sequence_parallel)
    trainers = {m: TrainerStep(model, cfg.lr) for m, model in models.items()}
    ids, labels = (t.to(device()) for t in random_batch(cfg, hf, dp_rank))

    collectives, losses = {}, {}
    for m in METHODS:  # one counted step each (also the first warm-up step)
        with count_collectives() as counts:
            losses[m] = TrainerStep.loss(trainers[m].step(ids, labels, counts))
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
                "nblocks": acfg.nblocks if strategy_of(acfg).has_blocks else None, "layout": acfg.layout,
                "params": adapter_params(hf, acfg)},
            "first_step_loss": losses[m], "steps_timed": s["n"],
        }
    bd_c, base_c = collectives["bd"], collectives["base"]
    # the model's own (TP) collectives; grad_sync carries the trained parameters over DP and the
    # optimizer's grad norm exists only where something trains (not the frozen base)
    results["bd"]["tp_collectives_equal_base"] = all(
        bd_c.get(ph, {}) == base_c.get(ph, {}) for ph in ("forward", "backward"))
    config = {**asdict(cfg), "tp": tp, "dp": dp, "bd_nblocks": nblocks, "bd_rank": configs["bd"].rank,
              **run_environment(), "tokens_per_step": tokens, "model": hf,
              "step": "the trainer's Engine.step (Megatron-Core): forward + backward through its "
                      "schedule, DDP grad reduce over DP with the token count (DP>1), clipping "
                      f"to {trainers['bd'].args.clip_grad} (global norm: one all-reduce), "
                      "non-finite check, Adam on the trainable parameters",
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
