"""What TE 2.11's LayerNormLinear and Linear share, on CPU: construction, the input checks of
`prepare_forward`, and the one autograd node of norm + GEMM + TP communication.

Cited against TE release_v2.11 transformer_engine/pytorch/module/: layernorm_linear.py = LNL,
linear.py = LIN, base.py = BASE. Mirrored:
- construction: local out/in features divided by the TP size for "column" / "row" (LNL 1198);
  `tp_size` from the group when one is given (LNL 1186); `sequence_parallel = tp_size > 1 and
  sequence_parallel` (LNL 1209); `apply_bias = bias and not return_bias` (LNL 1176); no bias: an
  empty tensor, not a parameter (LIN 1290); a row layer's bias added after the TP reduction
  (LIN 1301); parameters initialised under the RNG tracker's fork (BASE 1219-1239) and marked
  tensor-parallel (LNL 1444);
- `prepare_forward`: every parameter must have the input's dtype outside autocast (BASE 925-944);
  a non-contiguous input is made contiguous (BASE 1074); a TP group must be set (BASE 1052);
- TP communication decided at call time from `parallel_mode` / `sequence_parallel`, through the
  caller module's names `gather_along_first_dim` / `reduce_scatter_along_first_dim` / `allreduce`
  (imported by name there, as in TE: tests patch them): column + SP all-gathers the GEMM input
  (LNL 246-283), row all-reduces or (SP) reduce-scatters the GEMM output (LNL 392-401, LIN
  354-363); backward: the row layer under SP all-gathers grad_output (BASE 1113), the column
  layer under SP all-gathers its input again for wgrad (LNL 688), then reduces dgrad (LNL 760-770);
- outputs: LNL's output is a view made inside the node (LNL 405), LIN's a fresh tensor (LIN 366);
  the returned norm output's gradient is added with `view_as` after dgrad's reduction and before
  the norm backward (LNL 963-983);
- `_extra_state`: an empty uint8 tensor without FP8 (BASE 841).
Not mirrored: FP8 / quantizers, userbuffers, delayed wgrad, wgrad fusion into main_grad, CPU
offload, LayerNorm (RMSNorm only, as Llama uses).
"""

import contextlib

import torch
import torch.distributed as dist


def rmsnorm(x, weight, eps, zero_centered_gamma):
    w = weight.float() + 1 if zero_centered_gamma else weight.float()
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)


class GemmNode(torch.autograd.Function):
    """_LayerNormLinear (ln_weight given) / _Linear (ln_weight None): ONE autograd node."""

    @staticmethod
    def forward(ctx, inp, ln_weight, weight, bias, m, comm):
        mode, sp, group = m.parallel_mode, m.sequence_parallel, m.tp_group
        x = inp if ln_weight is None else inp.view(-1, inp.shape[-1])
        ln_out = x if ln_weight is None else rmsnorm(x, ln_weight, m.eps, m.zero_centered_gamma)
        total = comm.gather_along_first_dim(ln_out, group)[0] if mode == "column" and sp else ln_out
        out = torch.nn.functional.linear(total, weight, bias)
        if mode == "row" and m.tp_size > 1:
            out = (comm.reduce_scatter_along_first_dim(out, group) if sp
                   else comm.allreduce(out, group))[0]
        ctx.save_for_backward(x, ln_out, ln_weight, weight)
        ctx.m, ctx.comm, ctx.mode, ctx.sp, ctx.group = m, comm, mode, sp, group
        ctx.return_ln, ctx.has_bias, ctx.inp_shape = m.return_layernorm_output, bias is not None, inp.shape
        if ln_weight is None:
            return out
        out = out.view(-1, *inp.shape[1:-1], out.shape[-1])
        return (out, ln_out.view(inp.shape)) if ctx.return_ln else out

    @staticmethod
    def backward(ctx, grad_out, grad_ln=None):
        x, ln_out, ln_weight, weight = ctx.saved_tensors
        comm, group, column_sp = ctx.comm, ctx.group, ctx.mode == "column" and ctx.sp
        g = grad_out.contiguous()
        if ctx.mode == "row" and ctx.sp:
            g = comm.gather_along_first_dim(g, group)[0]
        g = g.view(-1, g.shape[-1])
        wgrad = bgrad = dx = dgamma = None
        if weight.requires_grad:
            if ctx.m.fuse_wgrad_accumulation:
                raise NotImplementedError("fake Transformer Engine: wgrad fusion is not mirrored")
            total = comm.gather_along_first_dim(ln_out, group)[0] if column_sp else ln_out
            wgrad = g.t() @ total.reshape(-1, total.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            bgrad = g.sum(0)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dgrad = g @ weight
            if ctx.mode == "column" and ctx.m.tp_size > 1:
                dgrad = (comm.reduce_scatter_along_first_dim(dgrad, group) if ctx.sp
                         else comm.allreduce(dgrad, group))[0]
            dx = dgrad
            if ln_weight is not None:
                dgrad = dgrad.view(x.shape)
                if ctx.return_ln:
                    dgrad = dgrad + grad_ln.view_as(dgrad)
                with torch.enable_grad():
                    xr = x.detach().requires_grad_(True)
                    wr = ln_weight.detach().requires_grad_(ln_weight.requires_grad)
                    leaves = [xr] + ([wr] if ln_weight.requires_grad else [])
                    y = rmsnorm(xr, wr, ctx.m.eps, ctx.m.zero_centered_gamma)
                    grads = torch.autograd.grad(y, leaves, dgrad)
                dx, dgamma = grads[0], (grads[1] if ln_weight.requires_grad else None)
            dx = dx.view(ctx.inp_shape)
        return dx, dgamma, wgrad, bgrad, None, None


class TransformerEngineBaseModule(torch.nn.Module):
    def __init__(self, in_features, out_features, *, tp_group, tp_size, parallel_mode,
                 sequence_parallel, bias, return_bias, params_dtype, device,
                 fuse_wgrad_accumulation, not_mirrored):
        super().__init__()
        for name, value in not_mirrored.items():
            if value and name not in ("rng_tracker_name", "name"):
                raise NotImplementedError(f"fake Transformer Engine: {name} is not mirrored")
        if parallel_mode not in ("column", "row", None):
            raise ValueError(f"parallel_mode {parallel_mode} not supported")
        dtype = params_dtype or torch.get_default_dtype()
        self.tp_group, self.tp_group_initialized = None, False
        self.tp_size = tp_size if tp_group is None else dist.get_world_size(tp_group)
        if tp_group is not None or tp_size == 1:
            self.set_tensor_parallel_group(tp_group)
        self.parallel_mode = parallel_mode
        self.in_features = in_features // (self.tp_size if parallel_mode == "row" else 1)
        self.out_features = out_features // (self.tp_size if parallel_mode == "column" else 1)
        self.sequence_parallel = self.tp_size > 1 and sequence_parallel
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.gemm_bias_unfused_add = parallel_mode == "row" and self.apply_bias
        self.return_layernorm_output = self.return_layernorm_output_gathered = False
        self.activation_dtype = None
        kw = dict(dtype=dtype, device=device)
        self.weight = torch.nn.Parameter(torch.empty(self.out_features, self.in_features, **kw))
        self.bias = (torch.nn.Parameter(torch.zeros(self.out_features, **kw)) if bias
                     else torch.Tensor().to(**kw))

    def set_tensor_parallel_group(self, tp_group):
        self.tp_group, self.tp_group_initialized = tp_group, True

    def init_weight(self, init_method, get_rng_state_tracker):
        fork = get_rng_state_tracker().fork() if get_rng_state_tracker else contextlib.nullcontext()
        with fork:
            (init_method or torch.nn.init.normal_)(self.weight)
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 1 if self.parallel_mode == "row" else 0
        self.weight.partition_stride = 1

    def prepare_forward(self, inp):
        if self.tp_size > 1 and not self.tp_group_initialized:
            raise AssertionError("TP group not initialized.")
        if not torch.is_autocast_enabled() and self.activation_dtype != inp.dtype:
            for name, param in self.named_parameters():
                assert inp.dtype == param.dtype, (
                    "Data types for parameters must match when outside of autocasted region. "
                    f" Found input dtype: {inp.dtype} and {name!r} dtype: {param.dtype}")
            self.activation_dtype = inp.dtype
        return inp if inp.is_contiguous() else inp.contiguous()

    def run(self, inp, ln_weight, comm):
        """TE's forward after prepare_forward: the node, the unfused bias, the return tuple."""
        if self.return_layernorm_output_gathered:
            raise NotImplementedError("fake Transformer Engine: the gathered norm output is not "
                                      "mirrored")
        inp = self.prepare_forward(inp)
        bias = self.bias if self.use_bias else None
        out = GemmNode.apply(inp, ln_weight, self.weight,
                             bias if self.apply_bias and not self.gemm_bias_unfused_add else None,
                             self, comm)
        ln_out = None
        if self.return_layernorm_output:
            out, ln_out = out
        if self.gemm_bias_unfused_add:
            out = out + bias
        ret = (out, bias) if self.return_bias else (out,)
        ret += (ln_out,) if self.return_layernorm_output else ()
        return ret if len(ret) > 1 else out

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        if state is not None and state.numel():
            raise ValueError("fake Transformer Engine: no FP8 state")
