"""The one place that decides every layer-type question: column vs row, packed constituents.

A target is described by its global shape and, for column-parallel layers, its constituents in
Hugging Face order (q,k,v for linear_qkv, gate,up for linear_fc1) plus how many groups they are
interleaved over in Megatron's fused output (linear_qkv: per query group [q heads, k, v]).
"""

from dataclasses import dataclass

# Megatron module -> HF projections it holds (row layers hold one).
HF_PROJECTIONS = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc2": ("down_proj",),
}


@dataclass(frozen=True)
class TargetSpec:
    kind: str                 # "column" | "row"
    in_features: int          # global
    constituents: tuple       # ((hf_name, global out features), ...)
    interleave: int = 1       # groups the constituents are interleaved over in the fused output

    @property
    def out_features(self) -> int:
        return sum(out for _, out in self.constituents)


def parallel_kind(module) -> str:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    cls = type(module).__name__
    if cls.startswith("TE"):
        raise NotImplementedError(
            f"adapters on Transformer Engine layer {cls} are not implemented yet; "
            "build the model with the local layer spec")
    raise TypeError(f"cannot put an adapter on {cls}: not a Megatron-Core column/row parallel linear")


def target_spec(leaf: str, module, config) -> TargetSpec:
    """Describe a GPTModel linear by its leaf name and Megatron-Core TransformerConfig."""
    kind = parallel_kind(module)
    h, ffn = config.hidden_size, config.ffn_hidden_size
    d, heads, groups = config.kv_channels, config.num_attention_heads, config.num_query_groups
    if leaf == "linear_qkv":
        return TargetSpec(kind, h, (("q_proj", heads * d), ("k_proj", groups * d),
                                    ("v_proj", groups * d)), interleave=groups)
    if leaf == "linear_fc1":
        if not config.gated_linear_unit:
            return TargetSpec(kind, h, (("up_proj", ffn),))
        return TargetSpec(kind, h, (("gate_proj", ffn), ("up_proj", ffn)))
    if leaf == "linear_proj":
        return TargetSpec(kind, heads * d, (("o_proj", h),))
    if leaf == "linear_fc2":
        return TargetSpec(kind, ffn, (("down_proj", h),))
    raise ValueError(f"no adapter mapping for module {leaf!r}; targets are {sorted(HF_PROJECTIONS)}")
