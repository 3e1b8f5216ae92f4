"""AdamW on the trainable parameters, the LR schedule, DP gradient sync and TP-aware clipping."""

import math

import torch
import torch.distributed as dist

from megatron_bdlora.parallel.distributed import all_reduce_flat


def lr_at(step: int, args) -> float:
    """Linear warmup to --lr, then cosine / linear decay to --min-lr at --train-iters."""
    if args.lr_warmup_iters and step < args.lr_warmup_iters:
        return args.lr * (step + 1) / args.lr_warmup_iters
    if args.lr_decay_style == "constant":
        return args.lr
    span = max(1, args.train_iters - args.lr_warmup_iters)
    frac = min(1.0, (step - args.lr_warmup_iters) / span)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if args.lr_decay_style == "cosine" else 1 - frac
    return args.min_lr + (args.lr - args.min_lr) * decay


def make_optimizer(params, args) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.weight_decay)


def sync_data_parallel_grads(params) -> None:
    """Sum gradients over the DP group in one flat all-reduce (the loss is already divided by
    the global batch's supervised tokens, so the sum is the global-batch gradient)."""
    from megatron.core import parallel_state as ps

    grads = [p.grad for p in params if p.grad is not None]
    if ps.get_data_parallel_world_size() == 1 or not grads:
        return
    all_reduce_flat(grads, ps.get_data_parallel_group())


def clip_grad_norm(params, max_norm: float) -> float:
    """Global L2 norm (fp32, on the grads' device) over the whole TP-sharded model, replicated
    parameters counted once; clips in place. One host sync, for the returned float."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sq = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for sharded in (True, False):
        group = [p.grad for p in params
                 if p.grad is not None and bool(getattr(p, "tensor_model_parallel", False)) == sharded]
        if group:
            sq += torch.stack(torch._foreach_norm(group, 2, dtype=torch.float32)).square().sum() \
                / (1 if sharded else tp)
    if tp > 1:
        dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
    norm = sq.sqrt()
    if max_norm and max_norm > 0:
        # min(1, max_norm / norm) without a host round trip; a non-finite norm is left to the caller
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
    return float(norm)


MOMENTS = ("exp_avg", "exp_avg_sq")


def global_optimizer_state(model, optimizer) -> tuple[dict, dict]:
    """Adam moments in the TP-independent adapter layout (collective over TP), and metadata."""
    from megatron_bdlora.adapters import global_adapter_state

    tensors = {}
    for moment in MOMENTS:
        state = global_adapter_state(model, lambda p: optimizer.state[p][moment])
        tensors.update({f"{moment}/{k}": v for k, v in state.items()})
    steps = {int(s["step"]) for s in optimizer.state.values()}
    return tensors, {"step": max(steps) if steps else 0}


def load_optimizer_state(model, optimizer, tensors: dict, meta: dict) -> None:
    """Re-slice global Adam moments for this TP size."""
    from megatron_bdlora.adapters import local_shards

    per_moment = {m: local_shards(model, {k.split("/", 1)[1]: v for k, v in tensors.items()
                                          if k.startswith(m + "/")}) for m in MOMENTS}
    for p in per_moment[MOMENTS[0]]:
        # moments on the parameter's device and in its dtype (fp32 adapters under --bf16 too)
        optimizer.state[p] = {"step": torch.tensor(float(meta["step"])),
                              **{m: per_moment[m][p].to(device=p.device, dtype=p.dtype, copy=True)
                                 for m in MOMENTS}}
