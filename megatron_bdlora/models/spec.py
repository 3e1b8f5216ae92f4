"""The decoder block spec of each `--transformer-impl` (`IMPLS`, te/guard.py).

local: Megatron-Core's local layer spec with our RMSNorm and core attention (models/attention.py,
parallel/sequence_parallel.py). transformer_engine: the same layers with Megatron-Core's TE linears,
as its own TE spec builds them: linear_qkv and linear_fc1 are TELayerNormColumnParallelLinear
with the layer's input / pre-MLP RMSNorm fused in (those separate norms become IdentityOp),
linear_proj and linear_fc2 TERowParallelLinear. Core attention stays ours (sdpa or local), not
TEDotProductAttention: the adapters do not touch it, and one attention for both impls keeps the
TE-vs-local comparison about the linears. The final norm stays our RMSNorm.
"""

import dataclasses

from megatron.core.transformer.identity_op import IdentityOp

from megatron_bdlora.models.attention import layer_spec
from megatron_bdlora.parallel.sequence_parallel import block_spec
from megatron_bdlora.te.guard import IMPLS, layer_classes


def _te_layer(layer, column, row):
    sub = layer.submodules
    attn, mlp = sub.self_attention, sub.mlp
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(
        attn.submodules, linear_qkv=column, linear_proj=row))
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(
        mlp.submodules, linear_fc1=column, linear_fc2=row))
    return dataclasses.replace(layer, submodules=dataclasses.replace(
        sub, input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp, self_attention=attn, mlp=mlp))


def decoder_block_spec(config, attention_backend: str = "sdpa", transformer_impl: str = "local"):
    if transformer_impl not in IMPLS:
        raise ValueError(f"unknown transformer impl {transformer_impl!r}; choose one of {IMPLS}")
    block = block_spec(layer_spec(attention_backend), config)
    if transformer_impl == "local":
        return block
    layer = _te_layer(block.layer_specs[0], *layer_classes())
    return dataclasses.replace(block, layer_specs=[layer] * config.num_layers)
