"""`add_lowrank`: out += s · u · Bᵀ written in place into the adapted slices of a base output.

The expand half of every LoRA / BD-LoRA layer as one autograd node. Each adapted slice of the
base layer's output is the target of a batched GEMM (beta=1, alpha=s), so the forward makes no
full-size temporary (no concatenation of constituents, no scale-and-add pass) and the scale
costs nothing; the backward reads the output gradient's slices in place and writes the factor
gradient with alpha=s. Block-diagonal factors come in dense (zero-filled, `AdapterLinear`): one
GEMM beats one small-K GEMM per block on every pass over the output. `u` (tokens, rank) is the only activation kept.

Geometry (`Geometry`, `Slot`): the local output is `groups` interleave groups of `group_size`
columns (linear_qkv: its query groups [q heads, k, v]; other layers: one group). A B factor
(its rows in the same group order) fills columns [offset, offset + width) of every group from
u[..., col:col + rank]: one GEMM batch entry per group.

Tensors are (R, T, features): R requests of T tokens (R = 1 and T = all tokens for one adapter;
`batch_major`: a [seq, batch, f] output read as [batch, seq, f] for per-request adapters, whose
factors then carry a leading R dimension).
"""

from dataclasses import dataclass

import torch

# Tokens per request up to which the product goes through a (tiny) temporary: CPU BLAS handles
# a strided in-place batched GEMM one small call per batch entry, slower there (decode).
FEW_TOKENS = 16


@dataclass(frozen=True)
class Slot:
    col: int       # first column of u this factor reads
    rank: int      # u columns it reads
    offset: int    # first output column within each interleave group
    width: int     # output columns within each interleave group


@dataclass(frozen=True)
class Geometry:
    groups: int
    group_size: int
    slots: tuple


def _rows(y, batch_major: bool):
    return y.transpose(0, 1) if batch_major else y.view(1, -1, y.shape[-1])


def _out_part(y3, geo: Geometry, slot: Slot):
    """(R*groups, T, width) view of y3's columns for this slot (no copy)."""
    r, t, _ = y3.shape
    v = y3.unflatten(-1, (geo.groups, geo.group_size))[..., slot.offset:slot.offset + slot.width]
    return v.permute(0, 2, 1, 3).view(r * geo.groups, t, slot.width)


def _u_part(u3, geo: Geometry, slot: Slot):
    """(R*groups, T, rank): the slot's u columns, once per group (a stride-0 view for R = 1)."""
    r, t, _ = u3.shape
    u = u3[..., slot.col:slot.col + slot.rank].unsqueeze(1).expand(r, geo.groups, t, slot.rank)
    return u.reshape(r * geo.groups, t, slot.rank)


def _b_part(b, geo: Geometry, slot: Slot):
    """(R_b*groups, width, rank) view of B's rows, per group."""
    return b.reshape(-1, slot.width, slot.rank)


class _AddLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, u3, geo, scale, batch_major, *bs):
        out3 = _rows(out, batch_major)
        for slot, b in zip(geo.slots, bs):
            target = _out_part(out3, geo, slot)
            u, bt = _u_part(u3, geo, slot), _b_part(b, geo, slot).transpose(1, 2)
            if u3.shape[1] > FEW_TOKENS:
                target.baddbmm_(u, bt, alpha=scale)
            else:  # decode: a strided in-place GEMM per request costs more than a tiny temporary
                target.add_(torch.bmm(u, bt), alpha=scale)
        ctx.mark_dirty(out)
        ctx.save_for_backward(u3, *bs)
        ctx.geo, ctx.scale, ctx.batch_major = geo, scale, batch_major
        return out

    @staticmethod
    def backward(ctx, gy):
        u3, *bs = ctx.saved_tensors
        geo, scale = ctx.geo, ctx.scale
        gy3 = _rows(gy.contiguous(), ctx.batch_major)
        r, t, _ = u3.shape
        du = torch.zeros_like(u3) if ctx.needs_input_grad[1] else None
        dbs = []
        for i, (slot, b) in enumerate(zip(geo.slots, bs)):
            g = _out_part(gy3, geo, slot)
            if du is not None:  # summed over the groups, which all read the same u columns
                part = torch.bmm(g, _b_part(b, geo, slot)).view(r, geo.groups, t, slot.rank)
                du[..., slot.col:slot.col + slot.rank].add_(part.sum(1), alpha=scale)
            db = None
            if ctx.needs_input_grad[5 + i]:
                db = torch.empty_like(b)
                _b_part(db, geo, slot).baddbmm_(g.transpose(1, 2), _u_part(u3, geo, slot),
                                                beta=0, alpha=scale)
            dbs.append(db)
        return (gy, du, None, None, None, *dbs)


def add_lowrank(out, u3, bs, geo: Geometry, scale: float, batch_major: bool = False):
    """`out` (its slots) += scale · u3 · Bᵀ in place; returns `out` (autograd-aware)."""
    return _AddLowRank.apply(out, u3, geo, scale, batch_major, *bs)
