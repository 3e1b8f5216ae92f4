"""Sequence parallelism (`--sequence-parallel`): the pieces Megatron-Core's local spec lacks.

Under SP the activations outside the TP regions (norms, residual stream) are split along the
sequence over the TP ranks: Megatron's embedding scatters, column layers all-gather, row layers
reduce-scatter, the output layer gathers. Two pieces are missing from the local (non-TE) spec:

- its norm (a torch RMSNorm wrapper) refuses SP: `block_spec` swaps in `RMSNorm`, which accepts
  it and marks its weight `sequence_parallel`, as Megatron's fused and TE norms do;
- each rank's norm-weight gradient is then a partial sum over its own sequence chunk: the
  training engine's `finalize_model_grads` (Megatron-Core) sums the weights marked
  `sequence_parallel` over TP (one flat all-reduce) after the backward. With a frozen base
  (every adapter run) those weights have no gradient and nothing is issued.

Adapted linears take the layer's one SP collective over (adapters/comm.py), so BD-LoRA issues
exactly the base model's collectives under SP too.
"""

import dataclasses
import os

import torch

from megatron_bdlora.errors import InputError
from megatron_bdlora.te.guard import require_te

NEEDS_TP = ("--sequence-parallel splits activations over TP ranks: it needs "
            "--tensor-model-parallel-size > 1")


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm behind Megatron's norm signature, usable under SP."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        # params dtype: an fp32 weight on bf16 input would take torch's slow composite path
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        # Megatron's marker: replicated over TP, gradient summed over TP under SP.
        self.weight.sequence_parallel = config.sequence_parallel


def block_spec(layer_spec, config):
    """The transformer-block spec for a local layer spec with every norm (each layer's two and
    the final one) built as `RMSNorm`."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        layer_spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm))
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=RMSNorm)


def check_tool_flags(parser, sequence_parallel: bool, tp: int,
                     transformer_impl: str = "local") -> None:
    """A tool's --sequence-parallel without TP, or --transformer-impl transformer_engine where TE
    cannot run: one line from rank 0, exit status 2 everywhere."""
    error = NEEDS_TP if sequence_parallel and tp < 2 else None
    if error is None and transformer_impl == "transformer_engine":
        try:
            require_te()
        except InputError as e:
            error = str(e)
    if error:
        parser.exit(2, f"{parser.prog}: error: {error}\n"
                    if os.environ.get("RANK", "0") == "0" else None)
