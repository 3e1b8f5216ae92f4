"""The fine-tuning job: model + adapter + data on Megatron-Core's engine over TP x PP x DP,
checkpoints, eval, logging."""

import contextlib
import json
import time

import torch
import torch.distributed as dist

from megatron_bdlora.adapters import apply_adapters, trainable_param_count
from megatron_bdlora.adapters.flags import adapter_config
from megatron_bdlora.checkpoint.adapter_checkpoint import load_checkpoint
from megatron_bdlora.checkpoint.hf_import import load_hf_llama_chunks
from megatron_bdlora.data import (
    DataIterator, DistributedBatchSampler, build_dataset, load_tokenizer,
)
from megatron_bdlora.errors import InputError
from megatron_bdlora.models.attention import pin_kernel
from megatron_bdlora.models.llama import build_model_chunks
from megatron_bdlora.models.presets import get_preset
from megatron_bdlora.parallel import destroy_distributed, device, init_distributed, is_main_rank
from megatron_bdlora.training.arguments import (model_config, parse_args, recompute_config,
                                                run_config, virtual_pipeline_size)
from megatron_bdlora.training.checkpointing import CheckpointManager, TrainState
from megatron_bdlora.training.engine import Engine, device_batch, last_stage_broadcast, run_schedule
from megatron_bdlora.training.exit_conditions import ExitConditions, exit_status, stopped_line
from megatron_bdlora.training.metrics import MetricsLogger
from megatron_bdlora.training.throughput import Throughput
from megatron_bdlora.training.timers import Timers


def log0(*a):
    if is_main_rank():
        print(*a, flush=True)


def build(args):
    """This rank's model chunks (with adapter; one per virtual pipeline stage), tokenizer path."""
    pin_kernel(args.sdpa_backend)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    recompute = recompute_config(args)  # Megatron-LM's recompute flags, its meanings
    kw = dict(dtype=dtype, recompute=recompute, attention_backend=args.attention_backend,
              sequence_parallel=args.sequence_parallel, transformer_impl=args.transformer_impl)
    if args.hf_checkpoint:
        chunks = load_hf_llama_chunks(args.hf_checkpoint, **kw)
        tokenizer = args.tokenizer or chunks[0].info.tokenizer_path
    else:
        chunks = build_model_chunks(get_preset(args.model_preset),
                                    tp=args.tensor_model_parallel_size, **kw)
        tokenizer = args.tokenizer
    # --eval-only: load_checkpoint applies the checkpoint's own adapter config (the adapter flags'
    # defaults would otherwise not match it)
    cfg = None if args.eval_only else adapter_config(args, chunks[0].info.hf_config, say=log0)
    if cfg is not None:
        apply_adapters(chunks, cfg)
        if recompute and chunks[0].pre_process:
            backward_to_embedding(chunks[0])
    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda()
    return chunks, tokenizer


def data_iterator(args, tokenizer, path, seed_offset=0):
    from megatron.core import parallel_state as ps

    def make():
        return build_dataset(path, tokenizer, args.seq_length, pack_sequences=args.pack_sequences,
                             prompt_template=args.prompt_template, cache_dir=args.data_cache_dir)

    if is_main_rank():  # tokenise once; the other ranks read the cache
        rows = make()
    dist.barrier()
    if not is_main_rank():
        rows = make()
    sampler = DistributedBatchSampler(
        len(rows), args.micro_batch_size, dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(), global_batch_size=args.global_batch_size,
        seed=args.seed + seed_offset)
    return DataIterator(rows, sampler), rows.stats


def evaluate(chunks, it, iters: int) -> dict:
    """Token-weighted mean loss over the first `iters` global batches of `it`'s data (fewer if
    it has fewer; summed over DP ranks), through Megatron's schedule forward only (pipeline
    stages pass activations; the last stage's loss reaches every rank): a fresh pass from the
    start every call, so every evaluation sees the same records."""
    from megatron.core import parallel_state as ps

    it.sampler.set_epoch(0)
    for chunk in chunks:
        chunk.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device())
    with torch.no_grad():
        for _ in range(min(iters, it.sampler.global_batches)):
            batches = [device_batch(next(it)) for _ in range(it.sampler.micro_per_global)]
            total += run_schedule(chunks, batches, forward_only=True)
    total = last_stage_broadcast(total)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    for chunk in chunks:
        chunk.train()
    loss_sum, n = total.tolist()
    loss = loss_sum / max(n, 1)
    return {"loss": loss, "ppl": float(torch.exp(torch.tensor(loss))), "tokens": int(n)}


def backward_to_embedding(model) -> None:
    """The embedding output requires grad, so the backward runs down to the first layer even
    with a frozen base (with recompute the checkpointed block's input must require grad, or the
    recomputed adapters receive no gradient at all)."""
    model.embedding.register_forward_hook(lambda m, i, o: o.requires_grad_(True))


class Trainer:
    """A fine-tuning run (torchtitan's Trainer is the model): the model with its adapter, the
    data, Megatron-Core's engine (training/engine.py), the TrainState and the CheckpointManager
    that saves and loads them. `run()` trains; each step ends in `checkpoint_or_stop`, the one
    place that decides whether to save and whether to stop."""

    def __init__(self, args):
        from megatron.core import parallel_state as ps

        self.args = args
        # first: a signal while the model loads is recorded too (and acted on after step 1)
        self.exit = ExitConditions(args)
        self.timers = Timers(args.timing_log_level)
        self.stop_reason = self.last_checkpoint = None
        hf, _ = model_config(args)
        init_distributed(args.tensor_model_parallel_size, seed=args.seed,
                         timeout_minutes=args.distributed_timeout_minutes,
                         pipeline_parallel_size=args.pipeline_model_parallel_size,
                         virtual_pipeline_size=virtual_pipeline_size(args, hf["num_hidden_layers"]))
        # this rank's model chunks (one per virtual pipeline stage); `model`: the first, which
        # answers for all (hf_config, adapter_config)
        self.chunks, tokenizer_path = build(args)
        self.model = self.chunks[0]
        if not tokenizer_path:
            raise InputError("no tokenizer: the checkpoint has none; pass --tokenizer DIR")
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.config = run_config(args)
        self.config["tokenizer_path"] = tokenizer_path
        self.state = TrainState()
        if args.eval_only:
            return
        self.engine = Engine(self.chunks, args)
        self.train_it, stats = data_iterator(args, self.tokenizer, args.data_path)
        log0(f"data: {stats.summary()}")
        self.eval_it = (data_iterator(args, self.tokenizer, args.eval_data_path, 1)[0]
                        if args.eval_data_path else None)
        self.checkpointer = CheckpointManager(args, self.engine, self.train_it, self.state,
                                              self.config, say=log0)
        if args.load:
            self.checkpointer.load(args.load)
        self.dp = ps.get_data_parallel_world_size()
        self.micro_steps = args.global_batch_size // (args.micro_batch_size * self.dp)
        log0(f"trainable parameters on rank 0: {trainable_param_count(self.chunks):,}; "
             f"TP={ps.get_tensor_model_parallel_world_size()} "
             f"PP={ps.get_pipeline_model_parallel_world_size()} DP={self.dp}")
        self.throughput = Throughput(
            self.model.info.hf_config, self.model.info.adapter_config,
            args.global_batch_size, args.seq_length, dist.get_world_size(), args.bf16,
        ) if args.log_throughput else None

    def evaluate_only(self) -> dict:
        """--eval-only: the checkpoint's adapter (its own config) on the eval records."""
        args = self.args
        load_checkpoint(args.load, self.chunks, load_optimizer=False)
        it, _ = data_iterator(args, self.tokenizer, args.eval_data_path or args.data_path, 1)
        result = evaluate(self.chunks, it, args.eval_iters)
        log0(json.dumps(result))
        return result

    def train_step(self) -> dict:
        """One optimizer step on the next global batch; its metrics."""
        t0 = time.time()
        with self.timers("data"):
            batches = [device_batch(next(self.train_it)) for _ in range(self.micro_steps)]
        r = self.engine.step(batches, self.state.step, phase=self._timed_phase)
        self.state.step += 1
        self.state.skipped_steps += r.skipped
        loss, n_tokens = r.global_loss()  # this step's one host sync for logging
        dt = time.time() - t0
        metrics = {"loss": loss, "lr": r.lr, "grad_norm": r.grad_norm, "tokens_per_s": n_tokens / dt}
        if self.throughput is not None:
            metrics.update(self.throughput.metrics(dt))
        metrics.update(self.timers.collect())  # --timing-log-level: this step's phases (ms)
        if torch.cuda.is_available():
            metrics["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.state.skipped_steps:
            metrics["skipped_steps"] = self.state.skipped_steps
        return metrics

    def _timed_phase(self, name):
        """The engine's phases as --timing-log-level timers: its "backward" part is the whole
        forward-backward schedule, "optimizer" the grad norm, clipping and Adam."""
        timer = {"backward": "forward-backward", "optimizer": "optimizer"}.get(name)
        return self.timers(timer) if timer else contextlib.nullcontext()

    def checkpoint_or_stop(self) -> bool:
        """The one place per step that decides to save (every --save-interval steps, at the
        last step, when stopping) and to stop (--train-iters, or an exit condition: a signal,
        --exit-duration-in-mins, --exit-interval, --exit-after-iters; training/exit_conditions.py,
        the same answer on every rank). Saves; returns whether to stop."""
        args, step = self.args, self.state.step
        reason = self.exit.should_stop(step) if step < args.train_iters else None
        stop = step >= args.train_iters or reason is not None
        if args.save and (stop or step % args.save_interval == 0):
            with self.timers("save"):
                self.last_checkpoint = self.checkpointer.save()
        self.stop_reason = reason
        return stop

    def run(self) -> dict:
        if self.args.eval_only:
            return self.evaluate_only()
        args = self.args
        logger = MetricsLogger(args, self.config, args.train_iters, self.state.step)
        last = {}
        if self.eval_it is not None and self.state.step == 0:  # for before/after comparisons
            logger.log(0, {"eval_loss": evaluate(self.chunks, self.eval_it, args.eval_iters)["loss"]})
        for chunk in self.chunks:
            chunk.train()
        stop = self.state.step >= args.train_iters
        while not stop:
            last = self.train_step()
            step = self.state.step
            logger.advance()
            logger.log(step, last, show=step % args.log_interval == 0 or step == 1)
            if self.eval_it is not None and args.eval_interval and step % args.eval_interval == 0:
                with self.timers("eval"):  # in the next step's record (--timing-log-level 2)
                    ev = evaluate(self.chunks, self.eval_it, args.eval_iters)
                last["eval_loss"] = ev["loss"]
                logger.log(step, {"eval_loss": ev["loss"], "eval_ppl": ev["ppl"]})
            stop = self.checkpoint_or_stop()
        # the signal handler stays until the rank exits: a late signal (the launcher's or Slurm's
        # second one) during the final save or teardown changes nothing
        if self.stop_reason is not None:  # stopped early: the step is saved (with --save)
            return self._stopped(logger, last)
        if self.eval_it is not None:
            last["eval"] = evaluate(self.chunks, self.eval_it, args.eval_iters)
        logger.close()
        log0(f"done: step {self.state.step}, loss {last.get('loss', float('nan')):.4f}")
        return {"step": self.state.step, **last}

    def _stopped(self, logger, last: dict) -> dict:
        """The record, the line and the exit status of a run that stopped before --train-iters
        (launch/rank.py exits with that status)."""
        step, reason, saved = self.state.step, self.stop_reason, bool(self.args.save)
        logger.log(step, {"exit": reason, "checkpoint": self.last_checkpoint}, show=False)
        logger.close()
        log0(stopped_line(reason, step, self.last_checkpoint if saved else None))
        return {"step": step, **last, "exit": reason, "exit_status": exit_status(reason, saved)}


def train(args) -> dict:
    return Trainer(args).run()
