"""What AdapterLinear needs from a Transformer Engine layer (docs/transformer_engine.md).

`take_over` (construction): TE decides its TP communication at call time from `parallel_mode` /
`sequence_parallel`, so setting `parallel_mode=None` (as Megatron-Core's shared experts do) and SP
off leaves the layer's one collective to the adapter (comm.column_input / row_output), exactly as
for local layers. A fused-norm column layer is asked for its norm output, the LoRA input.

Under SP the adapter's one all-gather runs before the layer, so TE's norm runs on the gathered
sequence (every rank, redundantly) and its returned norm output is the LoRA input: autograd adds
the LoRA's input gradient to the GEMM's inside TE's backward, before the norm backward, and the
sum leaves through our single reduce-scatter. TE's own order (reduce its dgrad, then add the
returned norm output's gradient) would leave the LoRA's part unreduced.
"""

from megatron_bdlora.errors import InputError
from megatron_bdlora.te.guard import te_parallel_kind


# Config under which TE would compute something the CPU tests (over a fake TE) do not check.
REFUSED = {
    "tp_comm_overlap": "TE userbuffer overlap of the TP collectives, which the adapters issue "
                       "themselves; turn --tp-comm-overlap off",
    "gradient_accumulation_fusion": "TE's wgrad fused into main_grad, a path the adapters' tests "
                                    "never run",
    "layernorm_zero_centered_gamma": "TE's norm would scale by 1 + weight, while HF norm weights "
                                     "are the scale itself",
}


def take_over(base, kind: str, name: str) -> bool:
    """Switch a TE layer's own TP communication off; False (nothing done) for non-TE layers."""
    if te_parallel_kind(base) is None:
        return False
    for flag, why in REFUSED.items():
        if getattr(base.config, flag):
            raise InputError(f"{name}: {flag} ({why}) is not supported with adapters")
    comm_off(base)
    return True


def comm_off(layer) -> None:
    """TE's own TP communication off (it reads these at every forward and keeps them for the
    backward); a fused-norm layer returns its norm output, the LoRA input."""
    layer.parallel_mode = None
    layer.sequence_parallel = False
    if getattr(layer, "layer_norm_weight", None) is not None:
        layer.return_layernorm_output = True
        layer.return_layernorm_output_gathered = False


def base_forward(base, x, *args, **kwargs):
    """(out, bias, LoRA input) of the base layer: a taken-over TE fused-norm layer's norm output,
    else x itself. Megatron-Core's TE wrapper returns TE's own tuple when `te_return_bias`."""
    if getattr(base, "return_layernorm_output", False):
        if base.te_return_bias:
            out, bias, ln_out = base(x, *args, **kwargs)
        else:
            (out, ln_out), bias = base(x, *args, **kwargs)
    else:
        (out, bias), ln_out = base(x, *args, **kwargs), x
    if out._is_view():
        # TE returns its output as a view made inside its autograd Function, which autograd
        # forbids modifying in place; the LoRA delta is accumulated in place (add_lowrank).
        # Local layers' outputs are not views: no copy.
        out = out.clone()
    return out, bias, ln_out
