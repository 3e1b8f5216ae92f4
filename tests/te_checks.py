"""The check of the adapters' TE take-over that runs on the fake TE (tests/test_te.py, CPU) and
on real TE (tests/gpu/test_te_gpu.py, the `te` stage of tools/gpu_smoke.sh)."""

import collections

import torch

COLLECTIVES = ("gather_along_first_dim", "reduce_scatter_along_first_dim", "allreduce")
TP = 2
# TE 2.11 LayerNormLinear(column, SP) with its own communication: the norm output all-gathered
# (LNL 276), and in backward again for wgrad (LNL 688) and dgrad reduce-scattered (LNL 764)
TE_OWN = {"forward": {"gather_along_first_dim": 1},
          "backward": {"gather_along_first_dim": 1, "reduce_scatter_along_first_dim": 1}}


def te_collective_calls(take_over: bool, device="cpu") -> dict:
    """{phase: {collective: calls}} of one forward and backward of TE's
    LayerNormLinear(parallel_mode="column", sequence_parallel=True, tp_size=2) in one process,
    its collectives (TE's module-level names in layernorm_linear) replaced by recorders that
    return what two ranks holding the same tensor would. After the adapters' take-over
    (te/adapter.comm_off) TE must call none of them."""
    import transformer_engine.pytorch as tep
    from transformer_engine.pytorch.module import layernorm_linear as lnl

    from megatron_bdlora.te.adapter import comm_off

    layer = tep.LayerNormLinear(32, 64, normalization="RMSNorm", parallel_mode="column",
                                sequence_parallel=True, tp_size=TP, params_dtype=torch.float32,
                                device=device)
    layer.set_tensor_parallel_group(None)  # TE wants one set at tp_size > 1; recorders ignore it
    if take_over:
        comm_off(layer)
    calls, phase = {"forward": collections.Counter(), "backward": collections.Counter()}, ["forward"]
    answers = {"gather_along_first_dim": lambda x: torch.cat([x] * TP),
               "reduce_scatter_along_first_dim": lambda x: x.chunk(TP)[0].contiguous(),
               "allreduce": lambda x: x}

    def recorder(name):
        def call(x, *args, **kwargs):
            calls[phase[0]][name] += 1
            return answers[name](x), None
        return call

    saved = {name: getattr(lnl, name) for name in COLLECTIVES}
    try:
        for name in COLLECTIVES:
            setattr(lnl, name, recorder(name))
        out = layer(torch.randn(8, 2, 32, device=device, requires_grad=True))
        phase[0] = "backward"
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    finally:
        for name, fn in saved.items():
            setattr(lnl, name, fn)
    return {p: dict(c) for p, c in calls.items()}
