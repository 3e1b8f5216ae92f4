"""Llama-3.x shapes as Hugging Face config.json dicts (public values); no weights."""

import copy


def _llama(hidden, ffn, layers, heads, rope_factor, tied, vocab=128256, kv_heads=8):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": rope_factor, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "tie_word_embeddings": tied,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001,
    }


PRESETS = {
    "tiny": {
        **_llama(64, 128, 2, 8, 8.0, False, vocab=512, kv_heads=4),
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 1,
    },
    "llama3.2-1b": _llama(2048, 8192, 16, 32, 32.0, True),
    "llama3.2-3b": _llama(3072, 8192, 28, 24, 32.0, True),
    "llama3.1-8b": _llama(4096, 14336, 32, 32, 8.0, False),
    "llama3.1-70b": _llama(8192, 28672, 80, 64, 8.0, False),
    "llama3.1-405b": _llama(16384, 53248, 126, 128, 8.0, False),
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
