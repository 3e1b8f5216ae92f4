"""What one TP rank holds of a PEFT-packed BD-LoRA adapter (docs/design.md §1, §9), in one place.

PEFT packs a block-diagonal factor by stacking its N blocks along the non-rank dimension: column
layers (q, k, v, gate, up) store B as (out, r/N), row layers (o, down) store A as (r, in/N); the
other factor is whole: column A (r, in), row B (out, r). With t | N, TP rank i holds blocks
[i N/t, (i+1) N/t): rank rows [i r/t, (i+1) r/t) of the whole factor and its output (column) or
input (row) chunk of the block-diagonal one, laid out as an (r/t)-rank block diagonal. Each rank
then holds an ordinary LoRA of rank r/t on its own shard of the base layer: the column output is
local, the row output is a partial sum the base layer's all-reduce completes. No communication.
"""

import torch


def column_shard(a: torch.Tensor, b: torch.Tensor, tp: int, shard: int) -> tuple:
    """(A_i (r/t, in), B_i (out/t, r/t)) of rank `shard` from A (r, in), packed B (out, r/N)."""
    r, per_rank = a.shape[0], (a.shape[0] // b.shape[1]) // tp  # blocks per rank: N/t
    rows, ranks = b.shape[0] // tp, r // tp
    mine = b[shard * rows:(shard + 1) * rows].unflatten(0, (per_rank, -1))  # (N/t, out/N, r/N)
    return a[shard * ranks:(shard + 1) * ranks], torch.block_diag(*mine)


def row_shard(a: torch.Tensor, b: torch.Tensor, nblocks: int, tp: int, shard: int) -> tuple:
    """(A_i (r/t, in/t), B_i (out, r/t)) of rank `shard` from packed A (r, in/N), B (out, r)."""
    ranks = a.shape[0] // tp
    mine = a[shard * ranks:(shard + 1) * ranks].unflatten(0, (nblocks // tp, -1))  # (N/t, r/N, in/N)
    return torch.block_diag(*mine), b[:, shard * ranks:(shard + 1) * ranks]
