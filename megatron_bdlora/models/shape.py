"""The Llama base model's shape facts, in one place (pure Python: no torch, no Megatron-Core):
the config fields (transformers v4 and v5 spellings, RoPE scaling), head_dim,
KV heads, the per-projection matrix sizes, the padded vocabulary and the TP check.
The model builder, the HF import and mapping, the adapter layout and the cost and memory models
read them here."""

import math

from megatron_bdlora.errors import InputError


def hf_field(hf: dict, key: str, default=None):
    """Read a config key, also from transformers v5's `rope_parameters`."""
    if key in hf and hf[key] is not None:
        return hf[key]
    rope = hf.get("rope_parameters") or {}
    return rope.get(key, default)


def rope_scaling(hf: dict) -> dict | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return None
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} is not "
                         "supported; only llama3 scaling (or none) is implemented")
    return scaling


def head_dim(hf: dict) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def kv_heads(hf: dict) -> int:
    return hf.get("num_key_value_heads") or hf["num_attention_heads"]


def padded_vocab_size(vocab: int, tp: int, multiple: int = 128) -> int:
    """The model's vocabulary, padded to a multiple of lcm(multiple, tp): TP-independent for
    Llama's 128256 and any tp | 128 (Megatron's --make-vocab-size-divisible-by is 128)."""
    step = math.lcm(multiple, tp)
    return -(-vocab // step) * step


def projection_shapes(hf: dict) -> dict:
    """{HF projection: (in_features, out_features)} of one decoder layer."""
    h, heads, d, ffn = hf["hidden_size"], hf["num_attention_heads"], head_dim(hf), hf["intermediate_size"]
    kv = kv_heads(hf) * d
    return {"q_proj": (h, heads * d), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * d, h),
            "gate_proj": (h, ffn), "up_proj": (h, ffn), "down_proj": (ffn, h)}


def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tp(hf: dict, tp: int) -> None:
    """The base model splits over TP ranks by whole heads, KV groups and FFN columns."""
    heads, groups, ffn = hf["num_attention_heads"], kv_heads(hf), hf["intermediate_size"]
    if heads % tp or groups % tp or ffn % tp:
        raise InputError(f"--tensor-model-parallel-size {tp} must divide the attention heads "
                         f"({heads}), KV heads ({groups}) and FFN size ({ffn}); use TP in "
                         f"{divisors(math.gcd(heads, groups, ffn))}")
