"""LoRA dropout that does not depend on the TP size: every TP rank applies the mask TP=1 draws
for the same input (PEFT's one mask over the layer input), without a collective.

The mask covers the layer's whole input (full sequence, full width) and is drawn from a RNG state
of Megatron's RNG tracker of its own (`LORA_DROPOUT_RNG`), seeded alike on every TP rank with the
tracker's other states (parallel/cpu_compat.seed_model_parallel): every rank draws the same
full-size masks in the same order, so the state advances alike too. A row layer's rank keeps its input columns of the mask.
Activation recompute redraws the same mask: Megatron's CheckpointFunction saves and restores the
tracker's states.
"""

import torch
import torch.nn as nn

from megatron_bdlora.parallel.cpu_compat import LORA_DROPOUT_RNG


class LoRADropout(nn.Module):
    """Dropout of a LoRA input that holds chunk `rank` of `parts` along its last dim (a row
    layer's input columns; (0, 1): the whole input)."""

    def __init__(self, p: float, rank: int = 0, parts: int = 1):
        super().__init__()
        self.p, self.rank, self.parts = p, rank, parts

    def forward(self, x):
        if not self.training:
            return x
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork(LORA_DROPOUT_RNG):
            keep = x.new_empty(*x.shape[:-1], x.shape[-1] * self.parts).bernoulli_(1 - self.p)
        # a copy of this rank's columns: the full mask is not kept alive for the backward
        return x * keep.chunk(self.parts, -1)[self.rank].contiguous() * (1.0 / (1.0 - self.p))
