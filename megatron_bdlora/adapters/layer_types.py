"""Megatron-Core layer classes -> the adapter layout: `parallel_kind` decides column vs row from
a module's class (the one place that knows the classes); `target_spec` describes a GPTModel
linear with the table and shapes of `layout.py`, read from its TransformerConfig."""

from megatron_bdlora.adapters.layout import TargetSpec, module_spec
from megatron_bdlora.te.guard import te_parallel_kind

__all__ = ["TargetSpec", "adds_bias_before_return", "parallel_kind", "target_spec"]


def parallel_kind(module) -> str:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    kind = te_parallel_kind(module)  # TELayerNormColumnParallelLinear / TERowParallelLinear
    if kind is not None:
        return kind
    raise TypeError(f"cannot put an adapter on {type(module).__name__}: not a Megatron-Core "
                    "column/row parallel linear (local or Transformer Engine)")


def adds_bias_before_return(module) -> bool:
    """Does the layer add its own bias to its output (local: not skip_bias_add; TE: without
    te_return_bias), rather than return it separately?"""
    if te_parallel_kind(module) is not None:
        return bool(module.use_bias and not module.te_return_bias)
    return not module.skip_bias_add and module.bias is not None


def target_spec(leaf: str, module, config) -> TargetSpec:
    """Describe a GPTModel linear by its leaf name and Megatron-Core TransformerConfig."""
    if leaf == "linear_fc1" and not config.gated_linear_unit:
        raise ValueError("adapters need Llama's gated MLP (gate_proj, up_proj in linear_fc1)")
    spec = module_spec({"hidden_size": config.hidden_size, "intermediate_size": config.ffn_hidden_size,
                        "num_attention_heads": config.num_attention_heads,
                        "num_key_value_heads": config.num_query_groups,
                        "head_dim": config.kv_channels}, leaf)
    if parallel_kind(module) != spec.kind:
        raise TypeError(f"{leaf} is a {parallel_kind(module)}-parallel layer in this model; the "
                        f"Llama layout has it {spec.kind}-parallel")
    return spec
