"""Analytic adapter parameter counts for a Llama shape, and BD rank matching (docs/design.md §1).

One source of truth for every count the project prints: the trainer's summary, the rank
matcher, the paper projection and the memory estimate. Tests check it against the real modules.
"""

from megatron_bdlora.adapters.config import AdapterConfig

# HF projection -> (Megatron module, column|row)
PROJECTIONS = {
    "q_proj": ("linear_qkv", "column"), "k_proj": ("linear_qkv", "column"),
    "v_proj": ("linear_qkv", "column"), "o_proj": ("linear_proj", "row"),
    "gate_proj": ("linear_fc1", "column"), "up_proj": ("linear_fc1", "column"),
    "down_proj": ("linear_fc2", "row"),
}


def projection_shapes(hf: dict) -> dict:
    """{hf projection: (in_features, out_features)} for one decoder layer of a Llama config."""
    h, heads, groups = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    d = hf.get("head_dim") or h // heads
    ffn = hf["intermediate_size"]
    return {"q_proj": (h, heads * d), "k_proj": (h, groups * d), "v_proj": (h, groups * d),
            "o_proj": (heads * d, h), "gate_proj": (h, ffn), "up_proj": (h, ffn), "down_proj": (ffn, h)}


def adapter_params_per_layer(hf: dict, cfg: AdapterConfig) -> int:
    """Trainable adapter parameters in one decoder layer."""
    shapes = projection_shapes(hf)
    r = cfg.rank
    n = cfg.nblocks if cfg.method == "bdlora" else 1
    total = 0
    for module in cfg.modules:
        projs = cfg.module_projections(module)  # the adapted ones (partial targets: canonical)
        kind = PROJECTIONS[projs[0]][1]
        if kind == "row":
            (p,) = projs
            fan_in, fan_out = shapes[p]
            total += r * fan_in // n + r * fan_out
            continue
        fan_in = shapes[projs[0]][0]
        n_a = len(projs) if cfg.layout == "canonical" else 1
        total += n_a * r * fan_in + sum(r * shapes[p][1] // n for p in projs)
    return total


def adapter_params(hf: dict, cfg: AdapterConfig) -> int:
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
        raise ValueError(f"even BD rank {nblocks} (one per block) has more parameters than LoRA "
                         f"rank {lora_cfg.rank}; use a larger LoRA rank or fewer blocks")
    while bd(rank + nblocks) <= budget:
        rank += nblocks
    return rank
