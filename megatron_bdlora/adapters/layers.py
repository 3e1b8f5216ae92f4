"""LoRA / BD-LoRA around Megatron-Core's ColumnParallelLinear and RowParallelLinear.

One self-contained module, `AdapterLinear`, holding this rank's pieces of the factors. How the
factors are split over TP ranks is the strategy (`strategies.py`; docs/design.md §2):

  column layer (x replicated, W split by output rows)
    bd:         A split on r, B block-diagonal (each rank owns whole blocks)  -> no communication
    slora:      A split on r -> all-gather (b, r) -> B split on out
    replicated: full A on every rank, B split on out; A's gradient all-reduced over TP
  row layer (x split by input columns, partial sums all-reduced once)
    bd:         A block-diagonal, B split on r; partial added before the base all-reduce
    slora:      A split on in -> all-reduce (b, r) -> B split on out, added to this rank's slice
    replicated: A split on in, full B on every rank; B's gradient all-reduced over TP

Column layers share the base layer's input-gradient all-reduce: the input goes through one
`copy_to_tensor_model_parallel_region`, the base layer stops reducing, and autograd adds the
base and LoRA input gradients before the single reduction. Row layers add their partial to the
base partial before the base's own all-reduce.

Every factor has a TP-independent *global* form (whole factors, or per-block stacks for the
block-diagonal ones); this rank's parameter is a chunk of it along `shard_dims[name]`. Global
factors are drawn from generators seeded by (seed, module, group/block), so TP=1, 2, 4 of the
same config hold the same adapter.

Multi-adapter batching (inference): `load_global_stack` holds K adapters' local shards stacked
on a leading adapter dimension, and `adapter_index` (LongTensor (batch,), set by
`megatron_bdlora.inference.multi_adapter.adapter_batch`) picks one per request. Each request's
factors are gathered (punica-style BGMV) and applied with the same sharding and the same
collectives as the single-adapter path. With `adapter_index` unset, nothing changes.
"""

import hashlib

import torch
import torch.nn as nn

from megatron_bdlora.adapters import comm
from megatron_bdlora.adapters import layout
from megatron_bdlora.adapters.config import AdapterConfig
from megatron_bdlora.adapters.dropout import LoRADropout
from megatron_bdlora.adapters.layer_types import adds_bias_before_return
from megatron_bdlora.adapters.layout import TargetSpec
from megatron_bdlora.adapters.lowrank import Geometry, Slot, add_lowrank
from megatron_bdlora.adapters.strategies import COLUMN, ROW, Factor, a_groups, block_diag, strategy_of
from megatron_bdlora.te.adapter import base_forward, take_over

# the strategies' collectives on u (`Strategy.u_collective`)
U_COLLECTIVES = {"all_gather": comm.all_gather_last_dim, "all_reduce": comm.all_reduce_fwd_bwd}


def _seed(*key) -> int:
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & (2**63 - 1)


def _kaiming_uniform(shape, fan_in, key) -> torch.Tensor:
    """kaiming_uniform_(a=sqrt(5)) over the true fan-in: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5
    gen = torch.Generator().manual_seed(_seed(*key))
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def _take_over_local(base, kind: str) -> None:
    """Switch a local Megatron-Core layer's own TP communication off (the adapter issues it)."""
    if kind == COLUMN:
        # The LoRA branch and the base share one input-gradient all-reduce (ours).
        base.disable_grad_reduce = True
        base.allreduce_dgrad = False
        base.sequence_parallel = False
    else:
        # The base returns its partial sum; we add ours and reduce once.
        base.explicit_expert_comm = True
        base.skip_bias_add = True


class AdapterLinear(nn.Module):
    """A frozen Megatron-Core parallel linear plus this rank's share of a LoRA / BD-LoRA adapter."""

    # Multi-adapter batching (inference only): {param name: (K, *local shape)} and (batch,) indices.
    adapter_stack: dict | None = None
    adapter_index: torch.Tensor | None = None
    adapter_index_is_identity: bool = False  # adapter_index == arange(K): skip the gather
    _batch_factors_cache: tuple | None = None  # (adapter_index, dtype, per-request factors)

    def __init__(self, base: nn.Module, spec: TargetSpec, cfg: AdapterConfig, name: str,
                 tp_rank: int, tp_size: int):
        super().__init__()
        self.base, self.spec, self.cfg, self.name = base, spec, cfg, name
        # The constituents with a LoRA (a packed module may be adapted in part).
        self.adapted = tuple(c for c, _ in spec.constituents if cfg.adapts(c))
        if not self.adapted:
            raise ValueError(f"{name}: no projection of this module is targeted")
        layout.check_module(spec, cfg, tp_size, name)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.strategy = strategy_of(cfg)
        self.u_collective = self.strategy.u_collective.get(spec.kind)
        self.scale = cfg.scale
        # TP-invariant (dropout.py): a row layer's input is this rank's chunk of the columns
        self.dropout = (LoRADropout(cfg.dropout, *((tp_rank, tp_size) if spec.kind == ROW else ()))
                        if cfg.dropout > 0 else nn.Identity())
        self.merged = False
        # Under sequence parallelism the adapter owns the layer's one SP collective: the column
        # layer's all-gather (the base's own turned off) and the row layer's reduce-scatter.
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))
        if spec.kind == ROW and adds_bias_before_return(base):  # we reduce after: tp x bias
            raise ValueError(f"{name}: row-parallel layer with a fused bias is not supported")
        if not take_over(base, spec.kind, name):  # TE switches its own TP communication off
            _take_over_local(base, spec.kind)
        for p in base.parameters():
            p.requires_grad_(False)

        self.shard_dims = {}
        self.blocked = set()  # parameters held as diagonal blocks (multiplied dense: `_dense`)
        self.lora_B = nn.ParameterDict()
        device = base.weight.device
        for pname, f in layout.factor_layout(spec, cfg).items():
            dim = f.shard_dim
            local = torch.empty(f.local_shape(tp_size), device=device)
            if device.type != "meta":
                local = self.shard(self._init(f)(f.shape), dim).to(device)
            param = nn.Parameter(local.contiguous())
            param.tensor_model_parallel = dim is not None  # Megatron's flag: sharded, not replicated
            if pname == "lora_A":
                self.lora_A = param
            else:
                self.lora_B[pname.split(".", 1)[1]] = param
            self.shard_dims[pname] = dim
            if f.blocks is not None:
                self.blocked.add(pname)
        self.geometry = self._geometry()

    # ---- layout -----------------------------------------------------------------------------
    @property
    def groups(self) -> list:
        """A-factor groups: one per adapted constituent (canonical) or one shared (fused / row)."""
        return a_groups(self.spec, self.cfg)

    def group_of(self, constituent: str) -> int:
        groups = self.groups
        return groups.index(constituent) if constituent in groups else 0

    @property
    def local_groups(self) -> int:
        """Interleave groups in this rank's fused output (qkv: its query groups; else 1)."""
        return max(1, self.spec.interleave // self.tp_size)

    def global_layout(self) -> dict:
        """{param name: (global shape, TP shard dim or None, init fn)} — the TP-independent form
        (`layout.factor_layout`), each factor drawn from generators seeded by (seed, module, draw)."""
        return {pname: (f.shape, f.shard_dim, self._init(f))
                for pname, f in layout.factor_layout(self.spec, self.cfg).items()}

    def _init(self, f: Factor):
        """B: zeros. A: kaiming-uniform over its true fan-in, one draw per group / block."""
        key = (self.cfg.seed, self.name)
        if f.fan_in is None:
            return torch.zeros
        if f.draws is None:
            return lambda shape: _kaiming_uniform(shape, f.fan_in, key)
        return lambda shape: torch.stack([_kaiming_uniform(shape[1:], f.fan_in, (*key, d))
                                          for d in f.draws])

    def _geometry(self) -> Geometry:
        """Where each B factor writes in this rank's base output, and which u columns it reads."""
        t = self.tp_size
        if self.spec.kind == ROW:
            ((pname, b),) = self.lora_B.items()
            out = self.spec.out_features
            # B split on out (S-LoRA) writes this rank's slice of the full-width partial
            offset = self.tp_rank * b.shape[0] if self.shard_dims[f"lora_B.{pname}"] == 0 else 0
            return Geometry(1, out, (Slot(0, b.shape[1], offset, b.shape[0]),))
        lg = self.local_groups
        # u holds one block of rank columns per A group, as wide as B's (dense) rank columns
        # (S-LoRA's gathered to the full rank)
        b = layout.factor_layout(self.spec, self.cfg)[f"lora_B.{self.adapted[0]}"]
        r_u = b.dense_shape(t)[1]
        slots, offset = [], 0
        for c, out in self.spec.constituents:
            width = out // (lg * t)  # per interleave group, local
            if c in self.adapted:
                slots.append(Slot(self.group_of(c) * r_u, r_u, offset, width))
            offset += width
        return Geometry(lg, offset, tuple(slots))

    def shard(self, tensor, dim):
        return tensor if dim is None else tensor.chunk(self.tp_size, dim)[self.tp_rank]

    def adapter_params(self) -> dict:
        return {"lora_A": self.lora_A, **{f"lora_B.{c}": p for c, p in self.lora_B.items()}}

    # ---- forward ----------------------------------------------------------------------------
    # u = x·Aᵀ (the shrink: one GEMM for all A groups; one per request in a multi-adapter
    # batch), then the strategy's collective on u (S-LoRA), then `add_lowrank` accumulates
    # s·u·Bᵀ into the base output in place. Tensors are (R, T, features), R = 1 for one adapter.
    def forward(self, x, *args, **kwargs):
        multi = self.adapter_index is not None
        if multi:
            factors = self._batch_factors(x)
        elif not self.merged:
            factors = self._dense({k: p.to(x.dtype) for k, p in self.adapter_params().items()})
        if self.spec.kind == COLUMN:
            x = comm.column_input(x, self.sequence_parallel)
            out, bias, x = base_forward(self.base, x, *args, **kwargs)  # x: the LoRA input
            if multi or not self.merged:
                out = self._add_delta(out, self._column_u(x, factors, multi), factors, multi)
            return out, bias
        partial, bias, _ = base_forward(self.base, x, *args, **kwargs)  # not yet reduced
        if multi or not self.merged:
            partial = self._add_delta(partial, self._row_u(x, factors, multi), factors, multi)
        return comm.row_output(partial, self.sequence_parallel), bias

    def _dense(self, factors: dict) -> dict:
        """This rank's block-diagonal factors (BD: B of a column, A of a row layer) as dense
        zero-filled matrices: one GEMM instead of one per local block (extra FLOPs only when a
        rank holds several blocks, TP < N; at TP = N it is a single block)."""
        return {k: block_diag(v) if k in self.blocked else v for k, v in factors.items()}

    def _rows(self, x, multi):
        return x.transpose(0, 1) if multi else x.reshape(1, -1, x.shape[-1])

    def _column_u(self, x, f, multi):
        a = f["lora_A"].flatten(-3, -2)  # (R?, groups*r_local, in)
        if self.shard_dims["lora_A"] is None and not multi:  # whole on every rank
            a = comm.replicated_factor(a)
        u = torch.matmul(self._rows(self.dropout(x), multi), a.transpose(-1, -2))
        if self.u_collective:  # S-LoRA: gather each group's rank shards
            u = U_COLLECTIVES[self.u_collective](u.unflatten(-1, (len(self.groups), -1))).flatten(-2)
        return u

    def _row_u(self, x, f, multi):
        u = torch.matmul(self._rows(self.dropout(x), multi), f["lora_A"].transpose(-1, -2))
        return U_COLLECTIVES[self.u_collective](u) if self.u_collective else u

    def _add_delta(self, out, u, f, multi):
        names = [f"lora_B.{c}" for c in self.adapted]
        bs = [f[k] if multi or self.shard_dims[k] is not None else comm.replicated_factor(f[k])
              for k in names]  # a factor whole on every rank: its gradient is reduced over TP
        return add_lowrank(out, u, bs, self.geometry, self.scale, batch_major=multi)

    # ---- multi-adapter batching (inference) -------------------------------------------------
    def load_global_stack(self, states: list) -> None:
        """Hold K adapters at once: states[k] = {param name: global factor} (as `load_global`).

        Stored as this rank's shards stacked on a new leading dim, outside the state dict."""
        if not states:
            raise ValueError(f"{self.name}: load_global_stack needs at least one adapter state")
        for k, st in enumerate(states):
            self._check_global(st, f"{self.name}: adapter {k}")
        stack = {}
        for pname, p in self.adapter_params().items():
            shards = [self.shard(st[pname], self.shard_dims[pname]) for st in states]
            stack[pname] = torch.stack(shards).to(device=p.device, dtype=p.dtype).contiguous()
        self.adapter_stack = stack
        self.set_adapter_index(None)

    def set_adapter_index(self, index: torch.Tensor | None) -> None:
        """Request b of the following forwards uses stacked adapter index[b] (None: off)."""
        self.adapter_index = index
        k = None if self.adapter_stack is None else next(iter(self.adapter_stack.values())).shape[0]
        self.adapter_index_is_identity = (index is not None and index.numel() == k
                                          and torch.equal(index.cpu(), torch.arange(k)))
        self._batch_factors_cache = None

    def _batch_factors(self, x) -> dict:
        """Per-request factors (R, *local shape), gathered and cast once per adapter batch, not
        once per forward (a decode step runs every layer once per generated token)."""
        if self.adapter_stack is None:
            raise RuntimeError(f"{self.name}: adapter_index is set but no adapters were loaded "
                               "with load_global_stack")
        if self.merged:
            raise RuntimeError(f"{self.name}: multi-adapter batching needs unmerged adapters")
        idx = self.adapter_index
        if x.dim() != 3 or x.shape[1] != idx.shape[0]:
            raise ValueError(f"{self.name}: input {tuple(x.shape)} is not [seq, batch={idx.shape[0]}, "
                             "hidden]")
        cache = self._batch_factors_cache
        if cache is None or cache[0] is not idx or cache[1] != x.dtype:
            st = self._dense({k: (v if self.adapter_index_is_identity else v.index_select(0, idx))
                              .to(x.dtype) for k, v in self.adapter_stack.items()})
            self._batch_factors_cache = cache = (idx, x.dtype, st)
        return cache[2]

    # ---- merge ------------------------------------------------------------------------------
    def local_delta(self) -> torch.Tensor:
        """This rank's ΔW shard (the base weight's local shape). Communication only where the
        strategy's factors are not aligned with the base shard (S-LoRA: `delta_gathers`)."""
        with torch.no_grad():
            f = self._dense(self.adapter_params())
            gathers = self.strategy.delta_gathers.get(self.spec.kind)
            if gathers:
                f.update({k: v for k, v in self._dense(self.gather_global()).items()
                          if k.startswith(f"lora_{gathers}")})
            a = f["lora_A"]
            if self.spec.kind == COLUMN:  # zero rows for the constituents left out
                geo = self.geometry
                delta = a.new_zeros(geo.groups, geo.group_size, a.shape[-1])
                for slot, c in zip(geo.slots, self.adapted):
                    delta[:, slot.offset:slot.offset + slot.width] = (
                        f[f"lora_B.{c}"] @ a[self.group_of(c)]).view(geo.groups, slot.width, -1)
                return self.scale * delta.flatten(0, 1)
            (b,) = (f[f"lora_B.{c}"] for c in self.adapted)
            return self.scale * (b @ a)

    def merge(self) -> None:
        if not self.merged:
            with torch.no_grad():
                self.base.weight.add_(self.local_delta().to(self.base.weight.dtype))
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.base.weight.sub_(self.local_delta().to(self.base.weight.dtype))
            self.merged = False

    # ---- TP-independent state ---------------------------------------------------------------
    def gather_global(self, tensor_of=lambda p: p.detach()) -> dict:
        """The global (TP-independent) factors, assembled on every rank of the TP group.

        `tensor_of(param)` picks what to gather: the weights, their gradients, optimizer states."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        out = {}
        for pname, p in self.adapter_params().items():
            dim, local = self.shard_dims[pname], tensor_of(p)
            if dim is None or self.tp_size == 1:
                out[pname] = local.clone()
                continue
            parts = [torch.empty_like(local) for _ in range(self.tp_size)]
            dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
            out[pname] = torch.cat(parts, dim=dim)
        return out

    def load_global(self, tensors: dict) -> None:
        """Set this rank's shards from global factors (any TP the constraints allow)."""
        self._check_global(tensors, f"{self.name}: the adapter state")
        with torch.no_grad():
            for pname, p in self.adapter_params().items():
                p.copy_(self.shard(tensors[pname], self.shard_dims[pname]))

    def _check_global(self, tensors: dict, where: str) -> None:
        layout.check_tensors(tensors, {k: v[0] for k, v in self.global_layout().items()}, where,
                             "check the adapter's rank, nblocks, layout and target modules")
