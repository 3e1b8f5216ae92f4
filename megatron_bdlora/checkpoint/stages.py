"""Checkpoints across pipeline stages: one set of files whatever the PP layout.

Each stage (and virtual stage chunk) holds its own layers under their global names (a layer is
`decoder.layers.<global index>` in every file), the embedding on the first stage, the final norm
and the LM head on the last. A save puts the stages' tensors together on the writing rank (global
rank 0) with point-to-point sends over its pipeline group, at save time only; a load reads the
names of its own layers from the files, so any PP layout loads any checkpoint.
"""

import torch
import torch.distributed as dist

from megatron_bdlora.parallel import device


def gather_stages(tensors: dict) -> dict:
    """{name: tensor} of every pipeline stage together on global rank 0 (on CPU); other ranks
    get their own `tensors` back. Only the ranks of rank 0's pipeline group communicate."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return tensors
    group = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    if 0 not in ranks:  # another pipeline's copy: its tensors are the same as rank 0's group's
        return tensors
    writer, me = ranks.index(0), ranks.index(dist.get_rank())
    layouts = [None] * len(ranks) if me == writer else None
    dist.gather_object({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, layouts,
                       group_dst=writer, group=group)
    dev = device()
    if me != writer:
        for name in sorted(tensors):
            dist.send(tensors[name].detach().to(dev).contiguous(), group_dst=writer, group=group)
        return tensors
    out = {k: v.detach().cpu() for k, v in tensors.items()}
    for stage, layout in enumerate(layouts):
        if stage == writer:
            continue
        for name in sorted(layout):
            if name in out:
                raise RuntimeError(f"pipeline stages {writer} and {stage} both hold {name}")
            shape, dtype = layout[name]
            t = torch.empty(shape, dtype=dtype, device=dev)
            dist.recv(t, group_src=stage, group=group)
            out[name] = t.cpu()
    return out
