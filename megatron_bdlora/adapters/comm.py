"""The TP collectives of an adapted layer.

`column_input` / `row_output` are the base layer's own collectives (with or without sequence
parallelism), issued once for base and LoRA together: AdapterLinear turns the base's off
(ColumnParallelLinear: disable_grad_reduce, allreduce_dgrad and sequence_parallel off, so it
multiplies its input as given; RowParallelLinear: explicit_expert_comm, so it returns its
partial sum). BD-LoRA issues nothing else.

The rest are the LoRA baselines' extras. Megatron-Core's own mappings assume the tensor
downstream of a gather is used identically on every rank; S-LoRA's is not (each rank multiplies
it by a different B shard), so the backward of its all-gather is a reduce-scatter and the
backward of its all-reduce is an all-reduce. A replicated factor's gradient is a partial sum
over TP ranks with or without SP (each rank sees its own B / input shard), so it is all-reduced.
"""

import torch
import torch.distributed as dist


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


class _AllGatherLastDim(torch.autograd.Function):
    """Forward: all-gather along the last dim. Backward: reduce-scatter along it."""

    @staticmethod
    def forward(ctx, x):
        group = _tp_group()
        t = dist.get_world_size(group)
        xt = x.movedim(-1, 0).contiguous()
        out = torch.empty((t * xt.shape[0],) + xt.shape[1:], dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, xt, group=group)
        return out.movedim(0, -1)

    @staticmethod
    def backward(ctx, grad):
        group = _tp_group()
        t = dist.get_world_size(group)
        gt = grad.movedim(-1, 0).contiguous()
        out = torch.empty((gt.shape[0] // t,) + gt.shape[1:], dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, gt, group=group)
        return out.movedim(0, -1)


class _AllReduceBoth(torch.autograd.Function):
    """Forward: all-reduce a partial sum. Backward: all-reduce the partial gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, group=_tp_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=_tp_group())
        return grad


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; all-reduce the gradient (a factor replicated over TP ranks)."""

    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=_tp_group())
        return grad


def column_input(x, sequence_parallel: bool):
    """A column layer's input, shared by the base and the LoRA branch: one all-gather of the
    sequence under SP (backward: one reduce-scatter of the summed input gradients), otherwise
    Megatron's copy (backward: one all-reduce)."""
    from megatron.core import tensor_parallel as mtp

    if sequence_parallel:
        return mtp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
    return mtp.copy_to_tensor_model_parallel_region(x)


def row_output(partial, sequence_parallel: bool):
    """A row layer's base + LoRA partial sums, reduced once: reduce-scatter along the sequence
    under SP, all-reduce otherwise."""
    from megatron.core import tensor_parallel as mtp

    if sequence_parallel:
        return mtp.reduce_scatter_to_sequence_parallel_region(partial)
    return mtp.reduce_from_tensor_model_parallel_region(partial)


def all_gather_last_dim(x):
    return _AllGatherLastDim.apply(x) if dist.get_world_size(_tp_group()) > 1 else x


def all_reduce_fwd_bwd(x):
    return _AllReduceBoth.apply(x) if dist.get_world_size(_tp_group()) > 1 else x


def replicated_factor(w):
    return _AllReduceGrad.apply(w) if dist.get_world_size(_tp_group()) > 1 else w
