"""RNG state for bit-exact resume: the CPU generator, the CUDA generator and Megatron's RNG
tracker (one set of named states per TP rank: they are seeded per TP rank).

Everything is a uint8 tensor, so the checkpoint's trainer state stays loadable with safetensors
and `weights_only`; nothing is pickled to disk.
"""

import torch
import torch.distributed as dist


def capture() -> dict:
    """Collective over the TP group: every TP rank's tracker states, gathered for rank 0."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    mine = dict(get_cuda_rng_tracker().get_states())  # CPU uint8 tensors, CUDA tracker too
    trackers = [None] * ps.get_tensor_model_parallel_world_size()
    dist.all_gather_object(trackers, mine, group=ps.get_tensor_model_parallel_group())
    state = {"cpu": torch.get_rng_state(), "tracker": trackers}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state) -> None:
    """Restore what `capture` saved (a bare tensor: the CPU state of older checkpoints). The
    tracker is restored when the TP size is the one saved; else it keeps its fresh seeding."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    trackers = state.get("tracker") or []
    if len(trackers) == ps.get_tensor_model_parallel_world_size():
        get_cuda_rng_tracker().set_states(dict(trackers[ps.get_tensor_model_parallel_rank()]))

