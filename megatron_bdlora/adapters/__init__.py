"""Adapters on a Megatron-Core GPTModel. Names load on first use, so the pure-Python parts
(`layout`, `config`, `param_count`) import without torch or Megatron-Core."""

import importlib

_HOME = {
    "AdapterConfig": "config", "adapter_config": "flags", "AdapterLinear": "layers",
    "adapter_params": "param_count", "match_bd_rank": "param_count",
    **{name: "model" for name in (
        "adapter_modules", "apply_adapters", "global_adapter_layout", "global_adapter_state",
        "load_global_adapter_state", "local_shards", "merge_adapters", "trainable_param_count",
        "unmerge_adapters")},
}
__all__ = sorted(_HOME)


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
