"""The fine-tuning job: model + adapter + data + AdamW over TP x DP, checkpoints, eval, logging."""

import contextlib
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_bdlora.adapters import apply_adapters
from megatron_bdlora.adapters.flags import adapter_config
from megatron_bdlora.errors import InputError
from megatron_bdlora.parallel import destroy_distributed, init_distributed, is_main_rank
from megatron_bdlora.parallel.sequence_parallel import allreduce_sequence_parallel_grads
from megatron_bdlora.training.arguments import parse_args, run_config
from megatron_bdlora.training.metrics import MetricsLogger
from megatron_bdlora.training import nonfinite, optim, rng_state


def log0(*a):
    if is_main_rank():
        print(*a, flush=True)


def build(args):
    """Model (with adapter), tokenizer path."""
    from megatron_bdlora.checkpoint.hf_import import load_hf_llama
    from megatron_bdlora.models.llama import build_model
    from megatron_bdlora.models.presets import get_preset

    from megatron_bdlora.models.attention import pin_kernel

    pin_kernel(args.sdpa_backend)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.hf_checkpoint:
        model = load_hf_llama(args.hf_checkpoint, dtype=dtype, recompute=args.recompute_activations,
                              attention_backend=args.attention_backend,
                              sequence_parallel=args.sequence_parallel,
                              transformer_impl=args.transformer_impl)
        tokenizer = args.tokenizer or model.tokenizer_path
    else:
        hf = get_preset(args.model_preset)
        model = build_model(hf, tp=args.tensor_model_parallel_size, dtype=dtype,
                            recompute=args.recompute_activations,
                            attention_backend=args.attention_backend,
                            sequence_parallel=args.sequence_parallel,
                            transformer_impl=args.transformer_impl)
        tokenizer = args.tokenizer
    # --eval-only: load_checkpoint applies the checkpoint's own adapter config (the adapter flags'
    # defaults would otherwise not match it)
    cfg = None if args.eval_only else adapter_config(args, model.hf_config, say=log0)
    if cfg is not None:
        apply_adapters(model, cfg)
        if args.recompute_activations:
            backward_to_embedding(model)
    if torch.cuda.is_available():
        model.cuda()
    return model, tokenizer


def data_iterator(args, tokenizer, path, seed_offset=0):
    from megatron.core import parallel_state as ps

    from megatron_bdlora.data import DataIterator, DistributedBatchSampler, build_dataset

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


def _on_device(batch):
    """(ids, labels) on the device and the loader's host document ids: a micro-batch's mask is
    built only when it runs (`_mask`), so one (b, 1, s, s) mask is alive at a time."""
    from megatron_bdlora.parallel import device

    dev = device()
    return batch["input_ids"].to(dev), batch["labels"].to(dev), batch["document_ids"]


def _mask(document_ids, dev):
    from megatron_bdlora.data import batch_attention_mask

    # None for unpacked rows: the attention layer is causal by itself, no (b, 1, s, s) tensor
    return None if document_ids is None else batch_attention_mask(document_ids, dev)


def _to_device(batch):
    ids, labels, docs = _on_device(batch)
    return ids, labels, _mask(docs, ids.device)


def evaluate(model, it, iters: int) -> dict:
    """Token-weighted mean loss over the first `iters` global batches of `it`'s data (fewer if
    it has fewer; summed over DP ranks): a fresh pass from the start every call, so every
    evaluation sees the same records."""
    from megatron.core import parallel_state as ps

    from megatron_bdlora.models.llama import lm_loss
    from megatron_bdlora.parallel import device

    it.sampler.set_epoch(0)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device())
    with torch.no_grad():
        for _ in range(min(iters, it.sampler.global_batches) * it.sampler.micro_per_global):
            ids, labels, mask = _to_device(next(it))
            loss_sum, n = lm_loss(model, ids, labels, mask, reduction="sum")
            total += torch.stack([loss_sum.double(), n.double()])
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    model.train()
    loss_sum, n = total.tolist()
    loss = loss_sum / max(n, 1)
    return {"loss": loss, "ppl": float(torch.exp(torch.tensor(loss))), "tokens": int(n)}


def backward_to_embedding(model) -> None:
    """The embedding output requires grad, so the backward runs down to the first layer even
    with a frozen base (with recompute the checkpointed block's input must require grad, or the
    recomputed adapters receive no gradient at all)."""
    model.embedding.register_forward_hook(lambda m, i, o: o.requires_grad_(True))


def no_phase(name):
    return contextlib.nullcontext()


def accumulate_gradients(model, params, batches, phase=no_phase) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one global batch, summed over micro-batches and DP ranks: backward of each
    micro-batch's summed token loss / the supervised tokens of the whole global batch (counted
    first: one small DP all-reduce), so a micro-batch weighs by its tokens as in one big batch.
    Returns (this rank's summed loss, the global token count), on the device: no host sync."""
    from megatron.core import parallel_state as ps

    from megatron_bdlora.models.llama import lm_loss

    with phase("tokens"):
        tokens = torch.stack([(labels != -100).sum() for _, labels, _ in batches]).sum()
        dist.all_reduce(tokens, group=ps.get_data_parallel_group())
    denom = tokens.clamp(min=1).float()
    loss_sum = torch.zeros((), dtype=torch.float32, device=tokens.device)
    for ids, labels, docs in batches:  # docs: host document ids (or None: unpacked rows)
        with phase("forward"):
            loss, _ = lm_loss(model, ids, labels, _mask(docs, ids.device), reduction="sum")
        with phase("backward"):
            (loss / denom).backward()
        loss_sum += loss.detach()
    with phase("sp_grads"):
        allreduce_sequence_parallel_grads(model)  # norm grads under SP; nothing when frozen
    with phase("grad_sync"):
        optim.sync_data_parallel_grads(params)
    return loss_sum, tokens


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's summed token loss (device)
    tokens: torch.Tensor    # supervised tokens of the global batch (device)
    lr: float
    grad_norm: float
    skipped: bool


def train_step(model, params, optimizer, batches, step: int, args, phase=no_phase) -> StepResult:
    """One iteration of train() (the benchmarks run this same function): the LR of `step`, the
    global batch's gradients, clipping, the non-finite check (may raise NonFiniteError), AdamW.
    `optimizer` None: nothing trains (the benchmarks' frozen-base reference); `phase(name)` is a
    context manager around each part (collective counting)."""
    lr = optim.lr_at(step, args)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
    loss_sum, tokens = accumulate_gradients(model, params, batches, phase)
    with phase("clip"):
        grad_norm = optim.clip_grad_norm(params, args.clip_grad)
    skip = nonfinite.skip_step(step + 1, grad_norm, args)  # or stops the run, naming the step
    with phase("optimizer"):
        if optimizer is not None and not skip:
            optimizer.step()
    return StepResult(loss_sum, tokens, lr, grad_norm, skip)


def save(args, model, optimizer, step, train_it, config) -> None:
    from megatron_bdlora.checkpoint.adapter_checkpoint import save_checkpoint

    if getattr(model, "adapter_config", None) is None:
        from megatron_bdlora.checkpoint.hf_base import save_hf_base

        save_hf_base(model, os.path.join(args.save, "hf"), tokenizer=config.get("tokenizer_path"))
        return
    tensors, meta = optim.global_optimizer_state(model, optimizer)
    extra = {"step": step, "data": train_it.state_dict(), "rng": rng_state.capture()}
    save_checkpoint(args.save, model, extra_state=extra, run_config=config, step=step,
                    optimizer_tensors=tensors, optimizer_meta=meta, keep_last=args.keep_last)


def train(args) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_bdlora.checkpoint.adapter_checkpoint import load_checkpoint

    init_distributed(args.tensor_model_parallel_size, seed=args.seed,
                     timeout_minutes=args.distributed_timeout_minutes)
    from megatron_bdlora.data import load_tokenizer

    model, tokenizer_path = build(args)
    if not tokenizer_path:
        raise InputError("no tokenizer: the checkpoint has none; pass --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_path)
    config = run_config(args)
    config["tokenizer_path"] = tokenizer_path
    if args.eval_only:
        load_checkpoint(args.load, model, load_optimizer=False)
        it, _ = data_iterator(args, tokenizer, args.eval_data_path or args.data_path, 1)
        result = evaluate(model, it, args.eval_iters)
        log0(json.dumps(result))
        return result

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.make_optimizer(params, args)
    train_it, stats = data_iterator(args, tokenizer, args.data_path)
    log0(f"data: {stats.summary()}")
    eval_it = data_iterator(args, tokenizer, args.eval_data_path, 1)[0] if args.eval_data_path else None
    step = 0
    if args.load:
        state = load_checkpoint(args.load, model)
        step = state.step
        if state.optimizer_tensors is not None:
            optim.load_optimizer_state(model, optimizer, state.optimizer_tensors,
                                       state.optimizer_meta)
        extra = state.extra_state or {}
        if "data" in extra:  # a training checkpoint; an imported adapter (step 0) has neither
            train_it.load_state_dict(extra["data"])
            rng_state.restore(extra["rng"], seed=args.seed + step, say=log0)
            log0(f"resumed from {state.dir} at step {step}")
        else:
            log0(f"starting from the adapter in {state.dir} (no data position or RNG state)")
    n_trainable = sum(p.numel() for p in params)
    log0(f"trainable parameters on rank 0: {n_trainable:,}; TP={ps.get_tensor_model_parallel_world_size()}"
         f" DP={ps.get_data_parallel_world_size()}")
    micro_steps = args.global_batch_size // (args.micro_batch_size * ps.get_data_parallel_world_size())
    logger = MetricsLogger(args, config, args.train_iters, step)
    last = {}
    if eval_it is not None and step == 0:  # the starting point, for before/after comparisons
        logger.log(0, {"eval_loss": evaluate(model, eval_it, args.eval_iters)["loss"]})
    model.train()
    skipped_steps = 0
    while step < args.train_iters:
        t0 = time.time()
        batches = [_on_device(next(train_it)) for _ in range(micro_steps)]
        r = train_step(model, params, optimizer, batches, step, args)
        skipped_steps += r.skipped
        step += 1
        dist.all_reduce(r.loss_sum, group=ps.get_data_parallel_group())
        n_tokens = int(r.tokens)  # with the loss: this step's one host sync for logging
        dt = time.time() - t0
        last = {"loss": float(r.loss_sum) / max(n_tokens, 1), "lr": r.lr, "grad_norm": r.grad_norm,
                "tokens_per_s": n_tokens / dt}
        if torch.cuda.is_available():
            last["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if skipped_steps:
            last["skipped_steps"] = skipped_steps
        logger.advance()
        logger.log(step, last, show=step % args.log_interval == 0 or step == 1)
        if eval_it is not None and args.eval_interval and step % args.eval_interval == 0:
            ev = evaluate(model, eval_it, args.eval_iters)
            last["eval_loss"] = ev["loss"]
            logger.log(step, {"eval_loss": ev["loss"], "eval_ppl": ev["ppl"]})
        stop = args.exit_after_iters is not None and step >= args.exit_after_iters
        if args.save and (step % args.save_interval == 0 or step == args.train_iters or stop):
            save(args, model, optimizer, step, train_it, config)
        if stop:
            break
    if eval_it is not None:
        last["eval"] = evaluate(model, eval_it, args.eval_iters)
    logger.close()
    log0(f"done: step {step}, loss {last.get('loss', float('nan')):.4f}")
    return {"step": step, **last}


def main(argv=None):
    """One rank: flags, then train; input errors are one line and every rank exits 2
    (launch/rank.py); rank 0 holds the --save directory's lock while it trains."""
    from megatron_bdlora.launch.rank import run_rank

    return run_rank(_main, argv)


def _main(argv):
    from megatron_bdlora.checkpoint.save_lock import SaveLock
    from megatron_bdlora.launch import rank
    from megatron_bdlora.launch.preflight import resolve_checkpoint_flags

    args = parse_args(argv)
    resolve_checkpoint_flags(args, say=log0 if int(os.environ.get("RANK", "0")) == 0 else None)
    rank.watch_save_dir(args.save)
    lock = None
    if args.save and not args.eval_only and int(os.environ.get("RANK", "0")) == 0:
        lock = SaveLock(args.save).acquire()
        rank.on_exit(lock.release)
    result = train(args)
    if lock is not None:
        lock.release()
    destroy_distributed()
    return result
