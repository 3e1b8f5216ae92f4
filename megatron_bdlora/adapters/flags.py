"""The run's adapter from its command-line flags: one function for the ranks and pre-flight."""

from megatron_bdlora.adapters.config import AdapterConfig
from megatron_bdlora.adapters.layout import check
from megatron_bdlora.adapters.param_count import adapter_params, match_bd_rank
from megatron_bdlora.adapters.strategies import of_flags

# AdapterConfig field -> the trainer flag (argparse dest) that sets it; pre-flight's --load
# resolution reads the same table
FLAG_OF = {"method": "adapter", "rank": "lora_rank", "alpha": "lora_alpha",
           "dropout": "lora_dropout", "rslora": "lora_rslora",
           "target_modules": "lora_target_modules", "layout": "lora_layout",
           "sharding": "lora_sharding", "nblocks": "bd_nblocks"}
_COMMON = ("alpha", "dropout", "rslora", "target_modules", "layout")  # LoRA and its BD match alike


def adapter_config(args, hf: dict, say=None) -> AdapterConfig | None:
    """The adapter of flags `args` on base model `hf` (None for --adapter none), checked against
    the model shape and TP size (`layout.check`); `say` gets the rank-matching line."""
    tp = args.tensor_model_parallel_size
    strategy = of_flags(args.adapter, args.lora_sharding)
    if strategy is None:
        check(hf, None, tp)
        return None
    rank = args.lora_rank
    common = {field: getattr(args, FLAG_OF[field]) for field in _COMMON}
    common.update(target_modules=tuple(common["target_modules"]), seed=args.seed)
    if strategy.has_blocks and args.match_lora_rank_params:
        lora = AdapterConfig(method="lora", rank=args.match_lora_rank_params, **common)
        rank = match_bd_rank(hf, lora, args.bd_nblocks)
        if say:
            bd = AdapterConfig(method="bdlora", rank=rank, nblocks=args.bd_nblocks, **common)
            say(f"BD rank {rank} matches LoRA rank {args.match_lora_rank_params}: "
                f"{adapter_params(hf, bd):,} vs {adapter_params(hf, lora):,} parameters "
                f"({args.lora_layout} layout)")
    cfg = AdapterConfig(method=args.adapter, rank=rank, nblocks=args.bd_nblocks,
                        sharding=args.lora_sharding, **common)
    check(hf, cfg, tp)
    return cfg
