"""The BD plugin's refusals of a PEFT adapter directory, one line each (docs/design.md §4, §9).

The plugin runs `check_dir` in vLLM's engine core before an adapter load reaches the workers
(a failed worker call at TP > 1 would leave the other workers' replies queued for the next call),
and again in each worker before it loads one (a request naming an adapter not loaded yet). A
refused adapter fails its own load request; the engine and the server keep serving the others.
vLLM's own checks (DoRA, bias, ...) still run after these.
"""

import json
import os

from megatron_bdlora.adapters.layout import BD_A, BD_B, BY_NAME
from megatron_bdlora.models.shape import divisors, projection_shapes
from megatron_bdlora.adapters.strategies import STRATEGIES

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
SWITCH = "MEGATRON_BDLORA_VLLM"


def packed_shapes(proj: str, in_features: int, out_features: int, r: int, n: int) -> tuple:
    """(A, B) shapes PEFT stores for a use_bdlora projection (its block-diagonal side packed)."""
    return STRATEGIES["bd"].hf_shapes(BY_NAME[proj].kind, in_features, out_features, r, n, packed=True)


def read_adapter(path: str) -> tuple:
    """(adapter_config.json as a dict, {tensor name: shape}) without reading any tensor."""
    from safetensors import safe_open

    with open(os.path.join(path, CONFIG)) as f:
        cfg = json.load(f)
    with safe_open(os.path.join(path, WEIGHTS), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return cfg, shapes


def check_dir(name: str, path: str, hf: dict, tp: int, max_rank: int) -> None:
    """`check_adapter` on an adapter directory (a missing one: vLLM's own not-found error)."""
    if os.path.isdir(path):
        check_adapter(name, *read_adapter(path), hf, tp, max_rank)


def check_adapter(name: str, cfg: dict, shapes: dict, hf: dict, tp: int, max_rank: int) -> None:
    """Refuse (ValueError, one line) what the BD layers cannot serve exactly at TP size `tp` and
    --max-lora-rank `max_rank` on base model `hf` (its config dict): dense adapters, N not
    divisible by TP, r above max_rank, other BD sides, per-module ranks, another base's shapes."""
    bd = cfg.get("use_bdlora")
    if not bd:
        raise ValueError(f"adapter {name!r} is a dense LoRA: with {SWITCH}=1 vLLM serves BD-LoRA "
                         "adapters only (PEFT use_bdlora; export --format hf-peft-bd or the vllm "
                         f"bundle's bd/); serve dense adapters without {SWITCH}")
    n, r = bd.get("nblocks"), cfg["r"]
    if not isinstance(n, int) or n < 1 or r % n:
        raise ValueError(f"adapter {name!r}: use_bdlora nblocks={n!r} must be a positive divisor of "
                         f"its rank r={r}")
    if n % tp:
        raise ValueError(f"adapter {name!r} has {n} blocks, which do not split over "
                         f"--tensor-parallel-size {tp}; serve it at a tensor-parallel size in "
                         f"{divisors(n)}")
    if r > max_rank:
        raise ValueError(f"adapter {name!r}: LoRA rank {r} is greater than max_lora_rank {max_rank}; "
                         f"serve it with --max-lora-rank >= {r}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"adapter {name!r}: per-module rank_pattern / alpha_pattern are not "
                         "supported for BD-LoRA; use one r and lora_alpha")
    sides = {p: "A" for p in bd.get("target_modules_bd_a") or ()}
    sides.update({p: "B" for p in bd.get("target_modules_bd_b") or ()})
    base = projection_shapes(hf)
    for key, shape in shapes.items():
        proj = key.split(".lora_")[0].rsplit(".", 1)[-1]
        if proj not in BY_NAME:
            raise ValueError(f"adapter {name!r}: {key} is not one of the Llama projections "
                             f"{sorted(BY_NAME)}; BD-LoRA serving adapts those only")
        if sides.get(proj) != BY_NAME[proj].bd_factor:
            raise ValueError(f"adapter {name!r}: {proj}'s block-diagonal factor must be "
                             f"{BY_NAME[proj].bd_factor} (use_bdlora target_modules_bd_a = "
                             f"{list(BD_A)}, target_modules_bd_b = {list(BD_B)})")
        in_f, out_f = base[proj]
        split = out_f if BY_NAME[proj].kind == "column" else in_f
        want = packed_shapes(proj, in_f, out_f, r, n)[key.endswith("lora_B.weight")]
        if split % n or shape != want:
            raise ValueError(f"adapter {name!r} does not fit this base model: {key} has shape "
                             f"{shape}, the base's {proj} ({in_f} -> {out_f}) needs {want} at "
                             f"r={r}, {n} blocks; serve it on the base it was trained for")
