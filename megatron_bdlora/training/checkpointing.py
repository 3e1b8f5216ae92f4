"""CheckpointManager: the one place that saves and loads a run's stateful parts (torchtitan's
CheckpointManager is the model): the adapter (or, --adapter none, the whole model), the
optimizer's Adam moments, the LR scheduler, the data position, the RNG and the train state
(step, skipped steps).

Everything is saved TP- and PP-independently, never as per-rank shards, also with the distributed
optimizer (its DP shards are put together first) and with pipeline stages (each stage's layers
under their global names, put together on rank 0 at save time: checkpoint/stages.py), so a run
resumes at any TP, PP (and DP) size:
an adapter run in checkpoint/adapter_checkpoint.py's format (the adapter and the Adam moments
as global tensors in the adapter's layout); --adapter none in SAVE/hf, an ordinary Hugging Face
checkpoint of the fp32 main weights with the Adam moments (in HF names) and the trainer's state
beside them, written atomically.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_bdlora.adapters import global_adapter_state, local_shards
from megatron_bdlora.adapters.model import model_chunks
from megatron_bdlora.checkpoint.adapter_checkpoint import (
    OPTIMIZER, OPTIMIZER_META, TRAINER_STATE, TRAINER_TENSORS, join_state, load_checkpoint,
    save_checkpoint, split_state,
)
from megatron_bdlora.checkpoint.files import read_json, write_json, write_tensors
from megatron_bdlora.checkpoint.hf_base import save_hf_base
from megatron_bdlora.checkpoint.hf_import import SafetensorsCheckpoint
from megatron_bdlora.checkpoint.hf_mapping import (
    hf_state_from_model, load_base_weights, tensor_reader,
)
from megatron_bdlora.checkpoint.stages import gather_stages
from megatron_bdlora.errors import CheckpointError
from megatron_bdlora.parallel.distributed import all_reduce_flat
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


def _trainable(model) -> list:
    """The trainable parameters of a GPTModel or a pipeline rank's chunks."""
    return [p for chunk in model_chunks(model) for p in chunk.parameters() if p.requires_grad]


def _gather_full(model, optimizer, keys) -> tuple[dict, int]:
    """({key: {trainable parameter: its whole tensor on this TP rank, fp32}}, Adam's step count)
    for keys "param" (the fp32 main parameter) and the Adam moments. Collective over DP with
    the distributed optimizer (its disjoint shards summed together)."""
    from megatron.core import parallel_state as ps

    parts = _main_params(optimizer)
    params = _trainable(model)
    full = {k: {p: torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in params}
            for k in keys}
    step = torch.zeros(1, dtype=torch.float64)
    for p, (opt, main, span) in parts.items():
        start, end = span or (0, p.numel())
        state = opt.state.get(main, {})  # empty before the first update: zero moments
        if "step" in state:
            step[0] = max(float(step[0]), float(state["step"]))
        for k in keys:
            src = main if k == "param" else state.get(k)
            if src is not None:
                full[k][p][start:end] = src.detach().reshape(-1).float()
    if any(span is not None for _, _, span in parts.values()):
        group = ps.get_data_parallel_group()
        all_reduce_flat([full[k][p] for k in keys for p in params], group)
        dist.all_reduce(step, op=dist.ReduceOp.MAX, group=group)
    return {k: {p: t.view(p.shape) for p, t in v.items()} for k, v in full.items()}, int(step[0])


def _set_full(optimizer, local: dict, step: int) -> None:
    """The inverse of _gather_full: `local` {key: {parameter: whole tensor on this TP rank}}."""
    for p, (opt, main, span) in _main_params(optimizer).items():
        def piece(t):
            t = t.to(device=main.device, dtype=main.dtype)
            return (t.reshape(-1)[span[0]:span[1]] if span else t.reshape(main.shape)).clone()

        if "param" in local:
            with torch.no_grad():
                main.copy_(piece(local["param"][p]))
        opt.state[main] = {"step": torch.tensor(float(step)),
                           **{m: piece(local[m][p]) for m in MOMENTS}}


def global_optimizer_state(model, optimizer) -> tuple[dict, dict]:
    """Adam moments as global tensors in the TP- and PP-independent adapter layout (complete on
    rank 0), and their step count. Collective: over DP (the distributed optimizer's shards), TP
    (the adapter gather) and PP (the stages to rank 0)."""
    full, step = _gather_full(model, optimizer, MOMENTS)
    tensors = {}
    for m in MOMENTS:
        state = global_adapter_state(model, lambda p: full[m][p])
        tensors.update({f"{m}/{k}": v for k, v in state.items()})
    return gather_stages(tensors), {"step": step}


def load_optimizer_state(model, optimizer, tensors: dict, meta: dict) -> None:
    """Set the Adam moments from global ones (any TP, PP, DP, distributed optimizer or not)."""
    local = {m: local_shards(model, {k.split("/", 1)[1]: v for k, v in tensors.items()
                                     if k.startswith(m + "/")}) for m in MOMENTS}
    _set_full(optimizer, local, meta["step"])


# ---- --adapter none: the whole model, its fp32 main weights and Adam moments in HF names --------
FULL_DIR = "hf"  # SAVE/hf: a Hugging Face checkpoint that also holds the trainer's state


def full_checkpoint_dir(path: str) -> str | None:
    """The resumable full fine-tuning checkpoint in `path` (a --save dir or its hf/), or None."""
    for d in (os.path.join(path, FULL_DIR), path):
        if os.path.isfile(os.path.join(d, TRAINER_STATE)) and \
                os.path.isfile(os.path.join(d, "config.json")):
            return d
    return None


def _save_full(model, optimizer, out_dir: str, extra: dict, tokenizer) -> None:
    """SAVE/hf: the fp32 main weights as an ordinary HF checkpoint (TP- and PP-independent,
    atomic), with the Adam moments in HF names and the trainer's state beside them."""
    full, step = _gather_full(model, optimizer, ("param",) + MOMENTS)
    hf = model_chunks(model)[0].info.hf_config
    moments = {f"{m}/{k}": v for m in MOMENTS
               for k, v in hf_state_from_model(model, hf, full[m].__getitem__).items()}

    def write_state(tmp):
        state_tensors = {}
        state = split_state(extra, "", state_tensors)
        write_tensors(os.path.join(tmp, TRAINER_TENSORS), state_tensors)
        write_json(os.path.join(tmp, TRAINER_STATE), state)
        write_tensors(os.path.join(tmp, OPTIMIZER), moments)
        write_json(os.path.join(tmp, OPTIMIZER_META), {"step": step})

    save_hf_base(model, out_dir, tokenizer=tokenizer, tensor_of=full["param"].__getitem__,
                 write_extra=write_state)


def _load_full(model, optimizer, ckpt_dir: str) -> dict:
    """Weights, fp32 main weights and Adam moments from `_save_full`'s directory at this TP and
    PP (each stage reads its own layers); returns the trainer's state."""
    from safetensors.torch import load_file

    hf = model_chunks(model)[0].info.hf_config
    local = {k: {p: torch.empty(p.shape, dtype=torch.float32) for p in _trainable(model)}
             for k in ("param",) + MOMENTS}
    fix = "it is not a complete --adapter none checkpoint; save it again"
    with SafetensorsCheckpoint(ckpt_dir) as weights:
        load_base_weights(model, weights.read, hf)
        load_base_weights(model, weights.read, hf, local["param"].__getitem__)
    moments = load_file(os.path.join(ckpt_dir, OPTIMIZER))
    for m in MOMENTS:
        read = tensor_reader({k.split("/", 1)[1]: v for k, v in moments.items()
                              if k.startswith(m + "/")})
        load_base_weights(model, read, hf, local[m].__getitem__)
    _set_full(optimizer, local, read_json(os.path.join(ckpt_dir, OPTIMIZER_META), fix)["step"])
    return join_state(read_json(os.path.join(ckpt_dir, TRAINER_STATE), fix),
                       load_file(os.path.join(ckpt_dir, TRAINER_TENSORS)))


class CheckpointManager:
    """Saves and loads the stateful parts of a run: the engine's model adapter, optimizer and
    scheduler, the training data iterator's position, the RNG and the TrainState."""

    def __init__(self, args, engine, data, train_state: TrainState, run_config: dict, say=print):
        self.args, self.engine, self.data, self.train_state = args, engine, data, train_state
        self.run_config = run_config
        self.say = say

    def _extra(self) -> dict:
        return {**self.train_state.state_dict(), "data": self.data.state_dict(),
                "rng": rng_state.capture(), "scheduler": self.engine.scheduler.state_dict()}

    def save(self) -> str | None:
        """Save at the current step into --save (collective: every rank calls it). --adapter
        none: the whole model and its state in SAVE/hf (a Hugging Face checkpoint)."""
        model, step = self.engine.chunks, self.train_state.step
        if self.engine.model.info.adapter_config is None:
            out = os.path.join(self.args.save, FULL_DIR)
            _save_full(model, self.engine.optimizer, out, self._extra(),
                       self.run_config.get("tokenizer_path"))
            return out

        tensors, meta = global_optimizer_state(model, self.engine.optimizer)
        return save_checkpoint(self.args.save, model, extra_state=self._extra(),
                               run_config=self.run_config, step=step, optimizer_tensors=tensors,
                               optimizer_meta=meta, keep_last=self.args.keep_last)

    def load(self, path: str) -> None:
        """Resume from `path` (--load): every part a training checkpoint holds; an imported
        adapter (step 0) has the adapter alone."""
        engine = self.engine
        if engine.model.info.adapter_config is None:
            where = full_checkpoint_dir(path)
            if where is None:
                raise CheckpointError(f"{path} holds no --adapter none checkpoint (hf/ with "
                                      "trainer_state.json); pass the --save dir of such a run")
            extra, step = _load_full(engine.chunks, engine.optimizer, where), None
        else:
            state = load_checkpoint(path, engine.chunks)
            engine.optimizer.reload_model_params()  # main parameters from the loaded weights
            if state.optimizer_tensors is not None:
                load_optimizer_state(engine.chunks, engine.optimizer, state.optimizer_tensors,
                                     state.optimizer_meta)
            extra, step, where = state.extra_state or {}, state.step, state.dir
            if "data" not in extra:
                self.say(f"starting from the adapter in {where} (no data position or RNG state)")
                return
        self.train_state.load_state_dict({"step": step, **extra} if step is not None else extra)
        step = self.train_state.step
        if "scheduler" in extra:
            engine.scheduler.load_state_dict(extra["scheduler"])
        else:  # a checkpoint from before the engine: the schedule follows the step
            engine.scheduler.step(increment=step)
        self.data.load_state_dict(extra["data"])
        rng_state.restore(extra["rng"], seed=self.args.seed + step, say=self.say)
        self.say(f"resumed from {where} at step {step}")
