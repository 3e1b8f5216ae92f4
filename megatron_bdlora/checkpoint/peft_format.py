"""The Hugging Face PEFT LoRA adapter format, read by export and import alike (docs/design.md §4):
its file names, its tensor keys and its adapter_config.json.

PEFT's BD-LoRA (`use_bdlora`) stores a block-diagonal factor packed: B (out, r/N) on q/k/v/gate/up
or A (r, in/N) on o/down, its N blocks stacked on the first dimension; the strategy converts
between that and our per-block stack (N, ., .) (`adapters/strategies.py` `to_hf` / `from_hf`).
"""

import re

from megatron_bdlora.adapters.layout import BD_A, BD_B

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)"
                  r"\.lora_([AB])\.weight$")


def tensor_key(module_path: str, side: str) -> str:
    """The PEFT tensor name of factor `side` ('A' / 'B') of HF module `module_path`
    (e.g. model.layers.0.self_attn.q_proj)."""
    return f"{PREFIX}{module_path}.lora_{side}.weight"


def parse_key(key: str) -> tuple | None:
    """(layer, HF parent 'self_attn' | 'mlp', projection, side) of a PEFT LoRA factor of a decoder
    layer; None for any other name."""
    m = _KEY.match(key)
    return (int(m.group(1)), m.group(2), m.group(3), m.group(4)) if m else None


def adapter_config(cfg, base: str | None, bd: bool = False) -> dict:
    """adapter_config.json of AdapterConfig `cfg` (bd: PEFT's packed BD-LoRA, use_bdlora)."""
    out = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": bool(cfg.rslora), "target_modules": list(cfg.projections), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    if bd:
        out["use_bdlora"] = {"target_modules_bd_a": [p for p in BD_A if cfg.adapts(p)],
                             "target_modules_bd_b": [p for p in BD_B if cfg.adapts(p)],
                             "nblocks": cfg.nblocks, "match_strict": True}
    return out
