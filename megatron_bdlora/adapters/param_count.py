"""Analytic adapter parameter counts for a Llama shape, and BD rank matching (docs/design.md §1).

One source of truth for every count the project prints: the trainer's summary, the rank
matcher, the paper projection and the memory estimate. Tests check it against the real modules.
"""

from megatron_bdlora.adapters.config import AdapterConfig
from megatron_bdlora.adapters.layout import params_per_layer as adapter_params_per_layer
from megatron_bdlora.errors import InputError


def adapter_params(hf: dict, cfg: AdapterConfig) -> int:
    """Trainable adapter parameters of the model (the global factors of `layout.py`)."""
    return hf["num_hidden_layers"] * adapter_params_per_layer(hf, cfg)


def match_bd_rank(hf: dict, lora_cfg: AdapterConfig, nblocks: int) -> int:
    """The largest BD rank (a multiple of nblocks) whose parameter count does not pass LoRA's:
    raise the rank in steps of N until it passes, then step back once (PEFT's example)."""
    budget = adapter_params(hf, lora_cfg)

    def bd(rank):
        return adapter_params(hf, AdapterConfig(method="bdlora", rank=rank, nblocks=nblocks,
                                                layout=lora_cfg.layout,
                                                target_modules=lora_cfg.target_modules))

    rank = nblocks
    if bd(rank) > budget:
        raise InputError(f"even BD rank {nblocks} (one per block) has more parameters than LoRA "
                         f"rank {lora_cfg.rank}; use a larger LoRA rank or fewer blocks")
    while bd(rank + nblocks) <= budget:
        rank += nblocks
    return rank
