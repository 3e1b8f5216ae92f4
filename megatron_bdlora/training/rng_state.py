"""RNG state for bit-exact resume: the CPU generator, the CUDA generator and Megatron's RNG
tracker (one set of named states per TP rank: they are seeded per TP rank), with the device kind
they were drawn on.

Everything is a uint8 tensor (and the kind a string), so the checkpoint's trainer state stays
loadable with safetensors and `weights_only`; nothing is pickled to disk.
"""

import torch
import torch.distributed as dist

from megatron_bdlora.parallel.cpu_compat import seed_model_parallel


def device_kind() -> str:
    """Whose generators the tracker holds: CUDA's with a GPU, else the CPU's (cpu_compat)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def capture() -> dict:
    """Collective over the TP group: every TP rank's tracker states, gathered for rank 0."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    mine = dict(get_cuda_rng_tracker().get_states())  # CPU uint8 tensors, CUDA tracker's too
    trackers = [None] * ps.get_tensor_model_parallel_world_size()
    dist.all_gather_object(trackers, mine, group=ps.get_tensor_model_parallel_group())
    state = {"device": device_kind(), "cpu": torch.get_rng_state(), "tracker": trackers}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict, seed: int, say=print) -> None:
    """Restore what `capture` saved. The tracker and the CUDA generator are restored when saved on
    this device kind (their states differ in size between CPU and CUDA) and, for the tracker, at
    the TP size saved; otherwise they are reseeded from `seed` (deterministic; `say` tells why)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tp = ps.get_tensor_model_parallel_world_size()
    trackers = state["tracker"]
    if state["device"] != device_kind() or len(trackers) != tp:
        seed_model_parallel(seed)
        if say is not None:
            say(f"RNG: checkpoint saved on {state['device']} at TP={len(trackers)}, resuming on "
                f"{device_kind()} at TP={tp}: dropout RNGs reseeded from {seed}, not restored")
    else:
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        # a state the checkpoint predates (LoRA dropout's, added later) keeps its fresh seed
        states = dict(get_cuda_rng_tracker().get_states())
        states.update(trackers[ps.get_tensor_model_parallel_rank()])
        get_cuda_rng_tracker().set_states(states)
    torch.set_rng_state(state["cpu"])
