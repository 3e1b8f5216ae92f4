"""Rows of exactly seq_length tokens: packed (several documents per row) or padded (one per row).

Every row carries
  input_ids     int64 [s]   tokens; padding is the tokenizer's pad id
  labels        int64 [s]   labels[t] = input_ids[t + 1] when that token is a target of the same
                            document, else -100 (so labels never cross a document boundary)
  loss_mask     float [s]   labels != -100, the form Megatron's loss wants
  document_ids  int64 [s]   0, 1, ... per document in the row; -1 on padding
  position_ids  int64 [s]   restart at 0 for each document, as if it were alone in the row
"""

from bisect import bisect_left, insort

import numpy as np
import torch

IGNORE_INDEX = -100


def pack_best_fit(lengths, seq_length: int) -> list:
    """Greedy best-fit-decreasing bin packing: longest example first, each into the open row with
    the least room that still fits it. Deterministic. Returns lists of example indices per row."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins, caps, open_bins = [], [], {}  # caps: sorted distinct free capacities (<= seq_length)
    for i in order:
        n = int(lengths[i])
        if n > seq_length:
            raise ValueError(f"example {i} has {n} tokens, more than seq_length {seq_length}")
        k = bisect_left(caps, n)
        if k < len(caps):
            room = caps[k]
            b = open_bins[room].pop()
            if not open_bins[room]:
                caps.pop(k)
                del open_bins[room]
        else:
            room, b = seq_length, len(bins)
            bins.append([])
        bins[b].append(i)
        room -= n
        if room > 0:
            if room not in open_bins:
                insort(caps, room)
            open_bins.setdefault(room, []).append(b)
    return bins


def make_row(docs, seq_length: int, pad_id: int) -> dict:
    """One row from [(input_ids, loss_mask), ...] whose lengths sum to <= seq_length."""
    input_ids = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int64)
    document_ids = np.full(seq_length, -1, dtype=np.int64)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    start = 0
    for d, (ids, mask) in enumerate(docs):
        ids, mask, n = np.asarray(ids, dtype=np.int64), np.asarray(mask), len(ids)
        end = start + n
        input_ids[start:end] = ids
        # The last token of a document has no target: the next token belongs to another one.
        labels[start:end - 1] = np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)
        document_ids[start:end] = d
        position_ids[start:end] = np.arange(n)
        start = end
    if start > seq_length:
        raise ValueError(f"documents hold {start} tokens, more than seq_length {seq_length}")
    labels_t = torch.from_numpy(labels)
    return {"input_ids": torch.from_numpy(input_ids), "labels": labels_t,
            "loss_mask": (labels_t != IGNORE_INDEX).float(),
            "document_ids": torch.from_numpy(document_ids),
            "position_ids": torch.from_numpy(position_ids)}


def attention_mask_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool [b, 1, s, s] mask from document ids [b, s] (or [s]); True means MASKED (Megatron-Core).

    A query sees keys that are at or before it and in its own document: causal and
    block-diagonal, so packed documents never attend to each other. A padding query (id -1) sees
    only itself, so that no row of the softmax is fully masked (which would give NaN).
    """
    d = document_ids if document_ids.dim() == 2 else document_ids[None]
    s = d.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=d.device).tril()
    is_real = (d >= 0)[:, :, None]
    allowed = causal & (d[:, :, None] == d[:, None, :]) & is_real
    allowed |= torch.eye(s, dtype=torch.bool, device=d.device) & ~is_real
    return ~allowed[:, None]


def batch_attention_mask(document_ids: torch.Tensor, device=None) -> torch.Tensor | None:
    """The mask a batch of rows needs, built on `device`: None when no row holds more than one
    document.

    make_row puts a row's padding after its documents, so with one document per row the
    attention layer's own causal masking is exact for every real token (a pad query may see the
    document; nothing reads it) and no (b, 1, s, s) tensor is built. Packed rows get the
    document mask of `attention_mask_from_document_ids`. Pass the loader's host tensor: the
    decision then costs no device sync, and the mask is built where it is used."""
    if int(document_ids.max()) <= 0:
        return None
    return attention_mask_from_document_ids(
        document_ids if device is None else document_ids.to(device, non_blocking=True))


def collate(rows) -> dict:
    """Stack row dicts into a batch dict of [b, s] tensors."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class RowDataset(torch.utils.data.Dataset):
    """Rows built on the fly from tokenized examples (a `datasets.Dataset` with input_ids and
    loss_mask). pack=True packs several examples per row; pack=False gives one per row,
    right-padded. `stats` is set by build_dataset."""

    def __init__(self, examples, lengths, seq_length: int, pad_id: int, pack: bool):
        self.examples = examples.with_format("numpy", columns=["input_ids", "loss_mask"])
        self.seq_length, self.pad_id, self.packed = seq_length, pad_id, pack
        self.rows = pack_best_fit(lengths, seq_length) if pack else [[i] for i in range(len(lengths))]
        self.stats = None

    def __len__(self):
        return len(self.rows)

    def documents(self, i: int) -> list:
        """The (input_ids, loss_mask) examples in row i, in row order."""
        return [(e["input_ids"], e["loss_mask"]) for e in (self.examples[int(j)] for j in self.rows[i])]

    def __getitem__(self, i: int) -> dict:
        return make_row(self.documents(i), self.seq_length, self.pad_id)

    def batch(self, indices) -> dict:
        """Collated rows; all their documents are read in one arrow call (per-item reads are slow)."""
        rows = [self.rows[int(i)] for i in indices]
        got = self.examples[[j for r in rows for j in r]]
        docs = list(zip(got["input_ids"], got["loss_mask"]))
        out, k = [], 0
        for r in rows:
            out.append(make_row(docs[k:k + len(r)], self.seq_length, self.pad_id))
            k += len(r)
        return collate(out)
