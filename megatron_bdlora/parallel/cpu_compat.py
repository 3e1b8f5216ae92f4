"""The few places where Megatron-Core assumes CUDA, made to work on CPU.

Everything here is a no-op when CUDA is available, so the same code path runs NCCL + GPU
unchanged (models/llama.py turns Megatron's fusions off and its CPU initialisation on, on both
devices). Patched:
``torch.cuda.current_device`` (used for device placement of buffers such as
RoPE's ``inv_freq``), the default causal mask (built on "cuda"), and the CUDA RNG tracker
(attention dropout and activation recompute fork the CUDA generator; on CPU they fork the CPU one).
"""

import torch

_applied = False


class _CpuRNGStatesTracker:
    """Megatron's CudaRNGStatesTracker API, backed by the CPU generator."""

    def __init__(self):
        self.reset()

    def is_initialized(self):
        return bool(self.states_)

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    def fork(self, name="model-parallel-rng"):
        from contextlib import contextmanager

        @contextmanager
        def _fork():
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

        return _fork()


def apply() -> None:
    """Install the CPU accommodations once; inert when CUDA is present."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _applied = True

    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.utils as mutils

    torch.cuda.current_device = lambda: torch.device("cpu")

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    import megatron.core.fusions.fused_softmax as msoftmax

    mutils.get_default_causal_mask = causal_mask
    msoftmax.get_default_causal_mask = causal_mask  # imported by name there

    # Activation recompute saves/restores the "CUDA" generator state through these two.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mrandom._CUDA_RNG_STATE_TRACKER = _CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def seed_model_parallel(seed: int) -> None:
    """Seed the default and the tensor-parallel RNGs (Megatron's model_parallel_cuda_manual_seed)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    # Same offsets as Megatron-Core: TP ranks differ for dropout inside TP regions.
    tracker.add("model-parallel-rng", seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add("data-parallel-rng", seed)
    tracker.add("expert-parallel-rng", seed + 1024 + 100 * ps.get_expert_model_parallel_rank()
                + ps.get_expert_tensor_parallel_rank())
