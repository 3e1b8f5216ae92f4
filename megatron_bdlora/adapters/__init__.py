from megatron_bdlora.adapters.config import AdapterConfig
from megatron_bdlora.adapters.layers import AdapterLinear
from megatron_bdlora.adapters.model import (
    adapter_modules,
    apply_adapters,
    get_adapter_params,
    global_adapter_layout,
    global_adapter_state,
    load_global_adapter_state,
    local_shards,
    merge_adapters,
    set_trainable_params,
    trainable_param_count,
    unmerge_adapters,
)
from megatron_bdlora.adapters.param_count import adapter_params, match_bd_rank

__all__ = ["AdapterConfig", "AdapterLinear", "adapter_modules", "adapter_params", "apply_adapters",
           "get_adapter_params", "global_adapter_layout", "global_adapter_state", "load_global_adapter_state", "local_shards",
           "match_bd_rank", "merge_adapters", "set_trainable_params", "trainable_param_count",
           "unmerge_adapters"]
