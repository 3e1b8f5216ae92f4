"""CheckpointManager: the one place that saves and loads a run's stateful parts (torchtitan's
CheckpointManager is the model): the adapter, the optimizer's Adam moments, the LR scheduler,
the data position, the RNG and the train state (step, skipped steps).

Everything is saved TP-independently (checkpoint/adapter_checkpoint.py's format): the adapter
and the Adam moments as global tensors in the adapter's layout, never per-rank shards, also
with the distributed optimizer (its DP shards are put together first), so a run resumes at any
TP (and DP) size the adapter allows.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_bdlora.training import rng_state

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    """The trainer's own counters: optimizer steps taken and those skipped (--skip-nonfinite)."""
    step: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


def _main_params(optimizer) -> dict:
    """{trainable model parameter: (torch optimizer, its main parameter, (start, end) of the
    flattened model parameter the main parameter holds, or None for all of it)}. With the
    distributed optimizer a rank holds a DP shard of some parameters only."""
    out = {}
    for o in optimizer.chained_optimizers:
        if hasattr(o, "model_param_group_index_map"):  # DistributedOptimizer
            for p, (group, order) in o.model_param_group_index_map.items():
                r = o._get_model_param_range_map(p)["param"]
                out[p] = (o.optimizer, o.optimizer.param_groups[group]["params"][order],
                          (r.start, r.end))
            continue
        # fp32 copies of 16-bit parameters (--bf16 full fine-tuning); fp32 ones are their own
        model_of = {m: p for ps_, ms in zip(getattr(o, "float16_groups", []),
                                            getattr(o, "fp32_from_float16_groups", []))
                    for p, m in zip(ps_, ms)}
        for group in o.optimizer.param_groups:
            for main in group["params"]:
                out[model_of.get(main, main)] = (o.optimizer, main, None)
    return out


def global_optimizer_state(model, optimizer) -> tuple[dict, dict]:
    """Adam moments as global tensors in the TP-independent adapter layout, and their step
    count. Collective: over DP (the distributed optimizer's shards) and TP (the adapter gather)."""
    from megatron.core import parallel_state as ps

    from megatron_bdlora.adapters import global_adapter_state

    parts = _main_params(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    full = {m: {p: torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in params}
            for m in MOMENTS}
    step = torch.zeros(1, dtype=torch.float64)
    for p, (opt, main, span) in parts.items():
        state = opt.state.get(main, {})
        if "step" not in state:  # no update yet (a first step skipped): zero moments
            continue
        step[0] = max(float(step[0]), float(state["step"]))
        for m in MOMENTS:
            start, end = span or (0, p.numel())
            full[m][p][start:end] = state[m].reshape(-1).float()
    if any(span is not None for _, _, span in parts.values()):
        from megatron_bdlora.parallel.distributed import all_reduce_flat

        group = ps.get_data_parallel_group()
        all_reduce_flat([full[m][p] for m in MOMENTS for p in params], group)  # disjoint shards
        dist.all_reduce(step, op=dist.ReduceOp.MAX, group=group)
    tensors = {}
    for m in MOMENTS:
        state = global_adapter_state(model, lambda p: full[m][p].view(p.shape))
        tensors.update({f"{m}/{k}": v for k, v in state.items()})
    return tensors, {"step": int(step[0])}


def load_optimizer_state(model, optimizer, tensors: dict, meta: dict) -> None:
    """Set the Adam moments from global ones (any TP, DP, distributed optimizer or not)."""
    from megatron_bdlora.adapters import local_shards

    per_moment = {m: local_shards(model, {k.split("/", 1)[1]: v for k, v in tensors.items()
                                          if k.startswith(m + "/")}) for m in MOMENTS}
    for p, (opt, main, span) in _main_params(optimizer).items():
        def piece(t):
            t = t.to(device=main.device, dtype=main.dtype)
            return (t.reshape(-1)[span[0]:span[1]] if span else t.reshape(main.shape)).clone()

        opt.state[main] = {"step": torch.tensor(float(meta["step"])),
                           **{m: piece(per_moment[m][p]) for m in MOMENTS}}


class CheckpointManager:
    """Saves and loads the stateful parts of a run: the engine's model adapter, optimizer and
    scheduler, the training data iterator's position, the RNG and the TrainState."""

    def __init__(self, args, engine, data, train_state: TrainState, run_config: dict, say=print):
        self.args, self.engine, self.data, self.train_state = args, engine, data, train_state
        self.run_config = run_config
        self.say = say

    def save(self) -> str | None:
        """Save at the current step into --save (collective: every rank calls it). --adapter
        none: the full model as a Hugging Face checkpoint in SAVE/hf."""
        model, step = self.engine.model, self.train_state.step
        if getattr(model, "adapter_config", None) is None:
            from megatron_bdlora.checkpoint.hf_base import save_hf_base

            save_hf_base(model, os.path.join(self.args.save, "hf"),
                         tokenizer=self.run_config.get("tokenizer_path"))
            return None
        from megatron_bdlora.checkpoint.adapter_checkpoint import save_checkpoint

        tensors, meta = global_optimizer_state(model, self.engine.optimizer)
        extra = {**self.train_state.state_dict(), "data": self.data.state_dict(),
                 "rng": rng_state.capture(), "scheduler": self.engine.scheduler.state_dict()}
        return save_checkpoint(self.args.save, model, extra_state=extra, run_config=self.run_config,
                               step=step, optimizer_tensors=tensors, optimizer_meta=meta,
                               keep_last=self.args.keep_last)

    def load(self, path: str) -> None:
        """Resume from `path` (--load): every part a training checkpoint holds; an imported
        adapter (step 0) has the adapter alone."""
        from megatron_bdlora.checkpoint.adapter_checkpoint import load_checkpoint

        engine = self.engine
        state = load_checkpoint(path, engine.model)
        engine.optimizer.reload_model_params()  # main parameters from the loaded weights
        if state.optimizer_tensors is not None:
            load_optimizer_state(engine.model, engine.optimizer, state.optimizer_tensors,
                                 state.optimizer_meta)
        extra = state.extra_state or {}
        if "data" not in extra:
            self.say(f"starting from the adapter in {state.dir} (no data position or RNG state)")
            return
        self.train_state.load_state_dict({"step": state.step, **extra})
        if "scheduler" in extra:
            engine.scheduler.load_state_dict(extra["scheduler"])
        else:  # a checkpoint from before the engine: the schedule follows the step
            engine.scheduler.step(increment=state.step)
        self.data.load_state_dict(extra["data"])
        rng_state.restore(extra["rng"], seed=self.args.seed + state.step, say=self.say)
        self.say(f"resumed from {state.dir} at step {state.step}")
