"""STAND-IN for the Transformer Engine module interface the adapter relies on. Tests only.

Real TE cannot run without CUDA (`TransformerEngineBaseModule.__init__` asserts
`torch.cuda.is_available()`), so the CPU tests build the TE layer spec with these two classes in
place of Megatron-Core's `TELayerNormColumnParallelLinear` / `TERowParallelLinear`. They are used
only after a test calls `install()`; production code never falls back to them.

Written from TE 2.11 (transformer_engine/pytorch/module/layernorm_linear.py = LNL, linear.py =
LIN, base.py = BASE) and Megatron-Core 0.16.1 (megatron/core/extensions/transformer_engine.py =
MC). What is mirrored:

- constructor: MC's wrapper signatures; `te_return_bias = skip_bias_add and bias` (MC) passed to
  TE as `return_bias`; `apply_bias = use_bias and not return_bias` (LNL 1176); `parallel_mode`
  "column" (LNL wrapper) / "row" (TERowParallelLinear), local out/in features divided by the TP
  size at construction; `sequence_parallel = (tp_size > 1) and sequence_parallel` (LNL 1209);
  a layer without bias holds an empty `bias` tensor, not a parameter (LIN 1290-1292); weights
  marked tensor-parallel (dim 0 / 1), `layer_norm_weight` marked `sequence_parallel` (LNL 1442);
  row-layer bias added after the TP reduction, outside the GEMM (LIN 1301, LNL 1602).
- TP communication decided at call time from `parallel_mode` / `sequence_parallel`, not at
  construction: column + SP all-gathers the norm output before the GEMM (LNL 151, 246-283),
  row all-reduces or (SP) reduce-scatters the GEMM output (LNL 392-401, LIN 354-363).
- `return_layernorm_output`: the norm output before any gather is returned (LNL 238, 533-538);
  TE's return is `out`, `(out, ln_out)`, `(out, bias)` or `(out, bias, ln_out)` (LNL 1599-1612);
  MC's wrapper returns TE's tuple when `te_return_bias`, else `(TE's return, None)`.
- autograd: norm and GEMM are ONE node. Backward: the row layer under SP all-gathers
  grad_output (BASE 1113); GEMM dgrad; the column layer's all-reduce / (SP) reduce-scatter of
  dgrad (LNL 760-770); only then the gradient of the returned norm output is added (LNL 964);
  then the norm backward (LNL 983). So with TE's own communication on, a LoRA branch on the
  norm output would get an unreduced input gradient: the adapter turns it off.
- `_extra_state`: `get_extra_state` is an empty uint8 tensor without FP8 (BASE 841).

Not mirrored: FP8 / quantizers, userbuffers, CPU offload, delayed wgrad, LayerNorm and
zero-centred gamma (RMSNorm only, as Llama uses).
"""

import torch
import torch.distributed as dist


def _gather_first(x, group):
    """TE's gather_along_first_dim."""
    out = torch.empty((dist.get_world_size(group) * x.shape[0],) + x.shape[1:], dtype=x.dtype,
                      device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_first(x, group):
    """TE's reduce_scatter_along_first_dim."""
    out = torch.empty((x.shape[0] // dist.get_world_size(group),) + x.shape[1:], dtype=x.dtype,
                      device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _all_reduce(x, group):
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _rmsnorm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


class _NormLinear(torch.autograd.Function):
    """_LayerNormLinear (ln_weight given) / _Linear (ln_weight None) on CPU: one autograd node."""

    @staticmethod
    def forward(ctx, inp, ln_weight, weight, bias, m):
        mode, sp, group = m.parallel_mode, m.sequence_parallel, m.tp_group
        x = inp.reshape(-1, inp.shape[-1])
        ln_out = x if ln_weight is None else _rmsnorm(x, ln_weight, m.eps)
        total = _gather_first(ln_out, group) if mode == "column" and sp else ln_out
        out = torch.nn.functional.linear(total, weight, bias)
        if mode == "row" and m.tp_size > 1:
            out = _reduce_scatter_first(out, group) if sp else _all_reduce(out, group)
        ctx.save_for_backward(x, ln_weight, weight, total)
        ctx.mode, ctx.sp, ctx.group, ctx.tp_size = mode, sp, group, m.tp_size
        ctx.eps = getattr(m, "eps", None)
        ctx.return_ln, ctx.has_bias = m.return_layernorm_output, bias is not None
        ctx.inp_shape = inp.shape
        out = out.view(-1, *inp.shape[1:-1], out.shape[-1])
        return (out, ln_out.view(inp.shape)) if ctx.return_ln else out

    @staticmethod
    def backward(ctx, grad_out, grad_ln=None):
        x, ln_weight, weight, total = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.mode == "row" and ctx.sp:
            g = _gather_first(g, ctx.group)
        wgrad = g.t() @ total if weight.requires_grad else None
        bgrad = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        dx = dgamma = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dgrad = g @ weight
            if ctx.mode == "column" and ctx.tp_size > 1:
                dgrad = (_reduce_scatter_first(dgrad, ctx.group) if ctx.sp
                         else _all_reduce(dgrad, ctx.group))
            if ln_weight is None:
                dx = dgrad
            else:
                if ctx.return_ln:
                    dgrad = dgrad + grad_ln.reshape(dgrad.shape)
                with torch.enable_grad():
                    xr = x.detach().requires_grad_(True)
                    wr = ln_weight.detach().requires_grad_(ln_weight.requires_grad)
                    leaves = [xr] + ([wr] if ln_weight.requires_grad else [])
                    grads = torch.autograd.grad(_rmsnorm(xr, wr, ctx.eps), leaves, dgrad)
                dx, dgamma = grads[0], (grads[1] if ln_weight.requires_grad else None)
            dx = dx.view(ctx.inp_shape)
        return dx, dgamma, wgrad, bgrad, None


class _StandIn(torch.nn.Module):
    """What TE's LayerNormLinear / Linear and Megatron-Core's wrappers hold."""

    def __init__(self, input_size, output_size, *, config, init_method, bias, skip_bias_add,
                 parallel_mode, norm: bool, tp_group=None, stride=1):
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

        super().__init__()
        self.config = config
        self.tp_group = tp_group or ps.get_tensor_model_parallel_group()
        self.tp_size = dist.get_world_size(self.tp_group)
        self.tp_rank = dist.get_rank(self.tp_group)
        self.te_return_bias = skip_bias_add and bias
        self.use_bias, self.return_bias = bias, self.te_return_bias
        self.apply_bias = self.use_bias and not self.return_bias
        self.parallel_mode = parallel_mode
        self.sequence_parallel = self.tp_size > 1 and config.sequence_parallel
        self.return_layernorm_output = self.return_layernorm_output_gathered = False
        dim = 0 if parallel_mode == "column" else 1
        self.in_features = input_size // (self.tp_size if dim == 1 else 1)
        self.out_features = output_size // (self.tp_size if dim == 0 else 1)
        self.gemm_bias_unfused_add = parallel_mode == "row" and self.apply_bias
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(dtype=config.params_dtype, device=device)
        self.weight = torch.nn.Parameter(torch.empty(self.out_features, self.in_features, **kw))
        if config.perform_initialization:
            _initialize_affine_weight_cpu(
                self.weight, output_size, input_size, self.weight.shape[dim], dim, init_method,
                stride, params_dtype=config.params_dtype, rank=self.tp_rank, world_size=self.tp_size,
                skip_set_tensor_parallel_attributes=True)
        self.weight.tensor_model_parallel, self.weight.partition_dim = True, dim
        self.weight.partition_stride = stride
        if bias:
            size = self.out_features if dim == 0 else output_size
            self.bias = torch.nn.Parameter(torch.zeros(size, **kw))
        else:
            self.bias = torch.Tensor().to(**kw)
        if norm:
            if config.normalization != "RMSNorm":
                raise ValueError("the TE stand-in implements RMSNorm only")
            self.eps = config.layernorm_epsilon
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, **kw))
            self.layer_norm_weight.sequence_parallel = self.sequence_parallel
            self.layer_norm_bias = None

    def forward(self, inp):
        bias = self.bias if self.use_bias else None
        fused = bias if self.apply_bias and not self.gemm_bias_unfused_add else None
        out = _NormLinear.apply(inp, getattr(self, "layer_norm_weight", None), self.weight, fused,
                                self)
        if self.return_layernorm_output:
            out, ln_out = out
        if self.gemm_bias_unfused_add:
            out = out + bias
        ret = out
        if self.return_bias:
            ret = (out, bias, ln_out) if self.return_layernorm_output else (out, bias)
        elif self.return_layernorm_output:
            ret = (out, ln_out)
        return ret if self.te_return_bias else (ret, None)  # Megatron-Core's wrapper

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        if state is not None and state.numel():
            raise ValueError("the TE stand-in holds no FP8 state")


class StandInLayerNormColumnParallelLinear(_StandIn):
    """Stand-in for TELayerNormColumnParallelLinear (te.pytorch.LayerNormLinear, column)."""

    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias,
                 skip_bias_add, is_expert, skip_weight_param_allocation=False,
                 tp_comm_buffer_name=None, tp_group=None, stride=1):
        if gather_output or is_expert or skip_weight_param_allocation:
            raise ValueError("Transformer Engine linear layers do not support these options")
        super().__init__(input_size, output_size, config=config, init_method=init_method,
                         bias=bias, skip_bias_add=skip_bias_add, parallel_mode="column",
                         norm=True, tp_group=tp_group, stride=stride)


class StandInRowParallelLinear(_StandIn):
    """Stand-in for TERowParallelLinear (te.pytorch.Linear, row)."""

    def __init__(self, input_size, output_size, *, config, init_method, bias, input_is_parallel,
                 skip_bias_add, is_expert, tp_comm_buffer_name=None, tp_group=None):
        if not input_is_parallel or is_expert:
            raise ValueError("Transformer Engine row-parallel layers need input_is_parallel")
        super().__init__(input_size, output_size, config=config, init_method=init_method,
                         bias=bias, skip_bias_add=skip_bias_add, parallel_mode="row",
                         norm=False, tp_group=tp_group)


def install() -> None:
    """Use the stand-in as this process's TE layers (tests call this explicitly)."""
    from megatron_bdlora.te import guard

    guard.inject(StandInLayerNormColumnParallelLinear, StandInRowParallelLinear)
