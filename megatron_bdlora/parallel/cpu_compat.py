"""The few places where Megatron-Core assumes CUDA, made to work on CPU.

Everything here is a no-op when CUDA is available, so the same code path runs NCCL + GPU
unchanged (models/llama.py turns Megatron's fusions off and its CPU initialisation on, on both
devices). Patched:
``torch.cuda.current_device`` (used for device placement of buffers such as
RoPE's ``inv_freq``), the default causal mask (built on "cuda"), the CUDA RNG tracker
(attention dropout and activation recompute fork the CUDA generator; on CPU they fork the CPU one),
and the training engine's literal ``device="cuda"`` tensors (the schedules' token count, the
optimizers', clipping's and the local multi-tensor l2 norm's small buffers) clipping's assertion that gradients are CUDA tensors, and the optimizers' sorting of
parameters by CUDA type name; with pipeline parallelism, the p2p code's
``torch.cuda.synchronize`` after batched sends (nothing to wait for on CPU) and the tied
embedding's copy to the GPU before its first-to-last-stage all-reduce.
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


class _CpuDeviceTorch:
    """`torch` as the Megatron-Core modules that write ``device="cuda"`` literally see it: the
    same module, its tensor factories placing "cuda" tensors on the CPU."""

    def __getattr__(self, name):
        fn = getattr(torch, name)
        if name not in ("zeros", "ones", "empty", "tensor", "full"):
            return fn

        def on_cpu(*a, device=None, **k):
            return fn(*a, device="cpu" if device == "cuda" else device, **k)

        return on_cpu


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron-Core's clip_grad_by_total_norm_fp32 (optimizer/clip_grads.py) without its check
    that each gradient is a CUDA FloatTensor: the same scaling through its multi-tensor applier."""
    from megatron.core.optimizer import clip_grads

    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    assert all(g.dtype == torch.float32 for g in grads), "clipping expects fp32 main gradients"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        clip_grads.multi_tensor_applier(clip_grads.multi_tensor_scale_impl,
                                        torch.zeros(1, dtype=torch.int), [grads, grads], clip_coeff)


def _cuda_type_names(init):
    """`init` (a Megatron optimizer's constructor, which sorts parameters into fp32 / 16-bit
    groups by their CUDA type name) with CPU parameters answering `.type()` by that name."""
    def wrapped(*a, **k):
        original = torch.nn.Parameter.type

        def type_name(self, *args, **kwargs):
            name = original(self, *args, **kwargs)
            return name.replace("torch.", "torch.cuda.", 1) if not args and not kwargs else name

        torch.nn.Parameter.type = type_name
        try:
            return init(*a, **k)
        finally:
            torch.nn.Parameter.type = original

    return wrapped


def _tensor_cuda_is_identity(fn):
    """`fn` (LanguageModule.setup_embeddings_and_output_layer, which moves the tied embedding
    ``.cuda()`` before all-reducing it over the first and last stages) with ``.cuda()`` leaving
    a CPU tensor where it is."""
    def wrapped(*a, **k):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        try:
            return fn(*a, **k)
        finally:
            torch.Tensor.cuda = original

    return wrapped


def apply() -> None:
    """Install the CPU accommodations once; inert when CUDA is present."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _applied = True

    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.utils as mutils

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None

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

    import megatron.core.optimizer.clip_grads as mclip
    import megatron.core.optimizer.optimizer as moptimizer
    import megatron.core.pipeline_parallel.schedules as mschedules
    import megatron.core.utils as mcore_utils  # its local multi-tensor l2 norm (no TE / apex)

    for module in (mschedules, moptimizer, mclip, mcore_utils):
        module.torch = _CpuDeviceTorch()
    for module in (moptimizer, mclip):  # imported by name in optimizer.py
        module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for cls in (DistributedOptimizer, moptimizer.Float16OptimizerWithFloat16Params):
        cls.__init__ = _cuda_type_names(cls.__init__)
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _tensor_cuda_is_identity(
        LanguageModule.setup_embeddings_and_output_layer)


# LoRA dropout's own tracker state (adapters/dropout.py), seeded here with the others
LORA_DROPOUT_RNG = "lora-dropout-rng"
LORA_DROPOUT_SEED_OFFSET = 5303  # apart from Megatron-Core's (seed, +1024.., +2718 + TP rank)


def seed_model_parallel(seed: int) -> None:
    """Seed the default and the tensor-parallel RNGs (Megatron's model_parallel_cuda_manual_seed)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
    else:
        tracker = mrandom.get_cuda_rng_tracker()
        tracker.reset()
        # Same offsets as Megatron-Core: TP ranks differ for dropout inside TP regions.
        tracker.add("model-parallel-rng", seed + 2718 + ps.get_tensor_model_parallel_rank())
        tracker.add("data-parallel-rng", seed)
        tracker.add("expert-parallel-rng", seed + 1024 + 100 * ps.get_expert_model_parallel_rank()
                    + ps.get_expert_tensor_parallel_rank())
    # LoRA dropout's own state, seeded alike on every TP rank (adapters/dropout.py)
    mrandom.get_cuda_rng_tracker().add(LORA_DROPOUT_RNG, seed + LORA_DROPOUT_SEED_OFFSET)
