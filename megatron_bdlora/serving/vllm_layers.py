"""vLLM LoRA layers that hold a BD-LoRA adapter sharded by blocks (docs/design.md §9).

Subclasses of vLLM's stock merged-QKV, merged gate/up and row-parallel LoRA layers: they
allocate buffers of R/t ranks (R = --max-lora-rank, t = the TP size) and `set_lora` stores only
this rank's blocks (`adapters/strategies.py` `rank_slice`); the stock `apply` / `forward` do the math, so the column
outputs stay local and the row outputs join the base layer's own all-reduce: no collective is
added. Adapters reach `set_lora` checked (`adapter_check`); the only other input is vLLM's
warm-up dummy, whose zero factors leave a slot empty.
"""

import torch
from vllm.lora.layers import (
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
)

from megatron_bdlora.serving.adapter_check import SWITCH
from megatron_bdlora.adapters.strategies import COLUMN, ROW, STRATEGIES

# what one TP rank holds of a PEFT-packed adapter: the strategy type owns it (docs/design.md §9)
_BD = STRATEGIES["bd"]


def _rank_per_tp(layer, lora_config) -> int:
    """R/t, refusing the settings the BD layers cannot hold (one line, at engine start)."""
    if lora_config.fully_sharded_loras:
        raise ValueError(f"{SWITCH}=1 shards LoRA by BD-LoRA blocks; drop --fully-sharded-loras "
                         "(S-LoRA) or unset the switch")
    if lora_config.max_lora_rank % layer.tp_size:
        raise ValueError(f"--max-lora-rank {lora_config.max_lora_rank} is not divisible by "
                         f"--tensor-parallel-size {layer.tp_size}; {SWITCH}=1 holds R/t ranks per "
                         "rank")
    return lora_config.max_lora_rank // layer.tp_size


def _zeros(max_loras: int, rows: int, cols: int, lora_config, device) -> torch.Tensor:
    return torch.zeros(max_loras, 1, rows, cols, dtype=lora_config.lora_dtype, device=device)


def _store(stacked, index: int, t: torch.Tensor) -> None:
    stacked[index, 0, :t.shape[0], :t.shape[1]].copy_(t, non_blocking=True)


def _is_empty(a, b) -> bool:
    """An unadapted slice (None) or vLLM's warm-up dummy (zeros): nothing to add."""
    return a is None or b is None or not bool(b.any())


class _BDColumn:
    """Merged column layers (qkv_proj, gate_up_proj): one slice per packed projection, each
    A (R/t, in) and B (out_slice/t, R/t)."""

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        self.lora_config = lora_config
        rank = _rank_per_tp(self, lora_config)
        if getattr(self.base_layer, "num_kv_head_replicas", 1) > 1:
            raise ValueError(f"{SWITCH}=1 needs --tensor-parallel-size <= the base's KV heads "
                             "(replicated KV heads cannot hold BD blocks)")
        self.lora_a_stacked = tuple(_zeros(max_loras, rank, self.input_size, lora_config, self.device)
                                    for _ in range(self.n_slices))
        self.lora_b_stacked = tuple(_zeros(max_loras, out, rank, lora_config, self.device)
                                    for out in self.output_slices)

    def set_lora(self, index, lora_a, lora_b) -> None:
        self.reset_lora(index)
        for s, (a, b) in enumerate(zip(lora_a, lora_b)):
            if _is_empty(a, b):
                continue
            nblocks = a.shape[0] // b.shape[1]  # packed B: (out, r/N)
            a_i, b_i = _BD.rank_slice(COLUMN, a, b, nblocks, self.tp_size, self.output_ids[s])
            _store(self.lora_a_stacked[s], index, a_i)
            _store(self.lora_b_stacked[s], index, b_i)

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list, model_config=None,
                          **_) -> bool:
        # the stock test without its "not --fully-sharded-loras" condition (refused above)
        return super().can_replace_layer(source_layer=source_layer, lora_config=lora_config,
                                         packed_modules_list=packed_modules_list,
                                         model_config=model_config, decorate=False)


class BDMergedQKVParallelLinearWithLoRA(_BDColumn, MergedQKVParallelLinearWithLoRA):
    pass


class BDMergedColumnParallelLinearWithLoRA(_BDColumn, MergedColumnParallelLinearWithLoRA):
    pass


class BDRowParallelLinearWithLoRA(RowParallelLinearWithLoRA):
    """Row layers (o_proj, down_proj): A (R/t, in/t) on this rank's input, B (out, R/t)."""

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        self.lora_config = lora_config
        rank = _rank_per_tp(self, lora_config)
        self.lora_a_stacked = (_zeros(max_loras, rank, self.input_size, lora_config, self.device),)
        self.lora_b_stacked = (_zeros(max_loras, self.output_size, rank, lora_config, self.device),)
        self.output_slices = (self.output_size,)

    def set_lora(self, index, lora_a, lora_b) -> None:
        self.reset_lora(index)
        if _is_empty(lora_a, lora_b):
            return
        nblocks = self.input_size * self.tp_size // lora_a.shape[1]  # packed A: (r, in/N)
        a_i, b_i = _BD.rank_slice(ROW, lora_a, lora_b, nblocks, self.tp_size, self.tp_rank)
        _store(self.lora_a_stacked[0], index, a_i)
        _store(self.lora_b_stacked[0], index, b_i)

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list, model_config=None,
                          **_) -> bool:
        return super().can_replace_layer(source_layer=source_layer, lora_config=lora_config,
                                         packed_modules_list=packed_modules_list,
                                         model_config=model_config, decorate=False)


BD_CLASSES = (BDMergedQKVParallelLinearWithLoRA, BDMergedColumnParallelLinearWithLoRA,
              BDRowParallelLinearWithLoRA)
