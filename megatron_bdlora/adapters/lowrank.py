"""`add_lowrank`: out += s · u · Bᵀ written in place into the adapted slices of a base output.

The expand half of every LoRA / BD-LoRA layer as one autograd node. Each adapted slice of the
base layer's output is the target of a batched GEMM (beta=1, alpha=s), so the forward makes no
full-size temporary (no concatenation of constituents, no scale-and-add pass) and the scale
costs nothing; the backward reads the output gradient's slices in place and writes the factor
gradient with alpha=s. `u` (tokens, rank) is the only activation kept.

Geometry (`Geometry`, `Slot`): the local output is `groups` interleave groups of `group_size`
columns (linear_qkv: its query groups [q heads, k, v]; other layers: one group). A B factor
fills columns [offset, offset + width) of every group. Its rows are `nblocks` diagonal blocks
(BD column layers; else 1) of `rank` columns, block j reading u[..., col + j*rank : ...]; the
rows split into C = max(groups, nblocks) equal chunks, one GEMM batch entry each (BD needs
nblocks | groups or groups == 1, which design.md §1 guarantees).

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
    nblocks: int   # diagonal blocks of B (BD column layers), else 1
    rank: int      # u columns per block
    offset: int    # first output column within each interleave group
    width: int     # output columns within each interleave group


@dataclass(frozen=True)
class Geometry:
    groups: int
    group_size: int
    slots: tuple

    def subchunks(self, slot: Slot) -> int:
        """Chunks per interleave group (> 1 only for several blocks in one group)."""
        return max(self.groups, slot.nblocks) // self.groups


def _rows(y, batch_major: bool):
    return y.transpose(0, 1) if batch_major else y.view(1, -1, y.shape[-1])


def _out_part(y3, geo: Geometry, slot: Slot, sub: int):
    """(R*groups, T, chunk) view of y3's columns for this slot's sub-chunk `sub` (no copy)."""
    r, t, _ = y3.shape
    wc = slot.width // geo.subchunks(slot)
    start = slot.offset + sub * wc
    v = y3.unflatten(-1, (geo.groups, geo.group_size))[..., start:start + wc]
    return v.permute(0, 2, 1, 3).view(r * geo.groups, t, wc)


def _u_part(u3, geo: Geometry, slot: Slot, sub: int):
    """(R*groups, T, rank): the u block each group's chunk reads (a view unless blocks repeat)."""
    r, t, _ = u3.shape
    blocks = u3[..., slot.col:slot.col + slot.nblocks * slot.rank].unflatten(-1, (slot.nblocks, slot.rank))
    if geo.groups >= slot.nblocks:
        per = geo.groups // slot.nblocks
        g = blocks.unsqueeze(3).expand(-1, -1, -1, per, -1).reshape(r, t, geo.groups, slot.rank)
    else:
        g = blocks[:, :, sub:sub + 1]
    return g.permute(0, 2, 1, 3).reshape(r * geo.groups, t, slot.rank)


def _b_part(b, geo: Geometry, slot: Slot, sub: int):
    """(R_b*groups, chunk, rank) view of B's rows for sub-chunk `sub`."""
    per = geo.subchunks(slot)
    wc = slot.width // per
    return b.reshape(-1, geo.groups, per, wc, slot.rank)[:, :, sub].reshape(-1, wc, slot.rank)


class _AddLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, u3, geo, scale, batch_major, *bs):
        out3 = _rows(out, batch_major)
        for slot, b in zip(geo.slots, bs):
            for sub in range(geo.subchunks(slot)):
                target = _out_part(out3, geo, slot, sub)
                u, bt = _u_part(u3, geo, slot, sub), _b_part(b, geo, slot, sub).transpose(1, 2)
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
            db = torch.empty_like(b) if ctx.needs_input_grad[5 + i] else None
            for sub in range(geo.subchunks(slot)):
                g = _out_part(gy3, geo, slot, sub)
                if du is not None:
                    part = torch.bmm(g, _b_part(b, geo, slot, sub))  # (R*groups, T, rank)
                    blocks = du[..., slot.col:slot.col + slot.nblocks * slot.rank].unflatten(
                        -1, (slot.nblocks, slot.rank))
                    if geo.groups >= slot.nblocks:  # sum the groups that read one block
                        part = part.view(r, slot.nblocks, -1, t, slot.rank).sum(2).transpose(1, 2)
                        blocks.add_(part, alpha=scale)
                    else:
                        blocks[:, :, sub].add_(part.view(r, t, slot.rank), alpha=scale)
                if db is not None:
                    _b_part(db, geo, slot, sub).baddbmm_(g.transpose(1, 2), _u_part(u3, geo, slot, sub),
                                                         beta=0, alpha=scale)
            dbs.append(db)
        return (gy, du, None, None, None, *dbs)


def add_lowrank(out, u3, bs, geo: Geometry, scale: float, batch_major: bool = False):
    """`out` (its slots) += scale · u3 · Bᵀ in place; returns `out` (autograd-aware)."""
    return _AddLowRank.apply(out, u3, geo, scale, batch_major, *bs)
