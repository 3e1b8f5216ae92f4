"""TE's TP collectives (transformer_engine/pytorch/distributed.py): (output, work handle)."""

import torch
import torch.distributed as dist

from transformer_engine.pytorch.stubs import NotMirrored


def _world(group):
    return dist.get_world_size(group)


def gather_along_first_dim(inp, process_group, async_op=False, quantizer=None):
    if _world(process_group) == 1:
        return inp, None
    out = torch.empty((_world(process_group) * inp.shape[0],) + inp.shape[1:], dtype=inp.dtype,
                      device=inp.device)
    dist.all_gather_into_tensor(out, inp.contiguous(), group=process_group)
    return out, None


def reduce_scatter_along_first_dim(inp, tp_group, async_op=False):
    if _world(tp_group) == 1:
        return inp, None
    out = torch.empty((inp.shape[0] // _world(tp_group),) + inp.shape[1:], dtype=inp.dtype,
                      device=inp.device)
    dist.reduce_scatter_tensor(out, inp.contiguous(), group=tp_group)
    return out, None


def allreduce(inp, tp_group=None, async_op=False):
    if _world(tp_group) == 1:
        return inp, None
    dist.all_reduce(inp, group=tp_group)  # in place, as TE's
    return inp, None


class CudaRNGStatesTracker(NotMirrored):
    pass
