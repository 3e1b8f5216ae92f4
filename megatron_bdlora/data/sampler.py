"""Deterministic, data-parallel, resumable batching.

Each epoch is a permutation of the rows drawn from torch.Generator(seed + epoch), cut into global
batches (the tail that does not fill one is dropped, so every rank does the same number of steps).
Each global batch is split into dp_size contiguous slices, one per data-parallel rank, and each
slice into micro-batches (more than one per rank means gradient accumulation).
"""

import torch

from megatron_bdlora.data.packing import RowDataset
from megatron_bdlora.errors import InputError


class DistributedBatchSampler:
    """Yields lists of `micro_batch_size` row indices for rank `dp_rank`, one epoch per iter().

    `state_dict()` is {"epoch", "position", ...} (plain ints): `position` counts the micro-batches
    this rank has taken in the epoch. Loading it makes the next batch exactly the one that would
    have come next. The sampler counts a batch as taken when it hands it out, so iterate it in the
    training process (DataIterator does), not through a prefetching DataLoader.
    """

    def __init__(self, num_rows: int, micro_batch_size: int, *, dp_rank: int = 0, dp_size: int = 1,
                 global_batch_size: int = None, seed: int = 0, shuffle: bool = True):
        global_batch_size = global_batch_size or micro_batch_size * dp_size
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global batch size {global_batch_size} must be a multiple of "
                             f"micro_batch_size {micro_batch_size} x dp_size {dp_size}")
        if num_rows < global_batch_size:
            raise InputError(f"the dataset has {num_rows} rows, fewer than one global batch of "
                             f"{global_batch_size}; lower the batch size or add data")
        self.num_rows, self.micro_batch_size = num_rows, micro_batch_size
        self.dp_rank, self.dp_size, self.global_batch_size = dp_rank, dp_size, global_batch_size
        self.seed, self.shuffle = seed, shuffle
        self.micro_per_global = global_batch_size // (micro_batch_size * dp_size)
        self.global_batches = num_rows // global_batch_size
        self.epoch, self.position = 0, 0
        self._perm = (None, None)  # (epoch, permutation) cache

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        return self.global_batches * self.micro_per_global

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                perm = torch.randperm(self.num_rows, generator=g)
            else:
                perm = torch.arange(self.num_rows)
            self._perm = (epoch, perm)
        return self._perm[1]

    def indices(self, epoch: int, k: int) -> list:
        """Row indices of this rank's k-th micro-batch of `epoch`."""
        g, m = divmod(k, self.micro_per_global)
        start = (g * self.global_batch_size + self.dp_rank * self.global_batch_size // self.dp_size
                 + m * self.micro_batch_size)
        return self._order(epoch)[start:start + self.micro_batch_size].tolist()

    def _roll_epoch(self):
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0

    def next_indices(self) -> list:
        """The next micro-batch, moving on to the next epoch when this one is done."""
        self._roll_epoch()
        batch = self.indices(self.epoch, self.position)
        self.position += 1
        return batch

    def __iter__(self):
        """The rest of the current epoch (a fresh epoch if the last one was finished)."""
        self._roll_epoch()
        epoch = self.epoch
        while self.epoch == epoch and self.position < len(self):
            yield self.next_indices()

    def set_epoch(self, epoch: int):
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        self._roll_epoch()
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_rows": self.num_rows, "global_batch_size": self.global_batch_size,
                "micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict):
        optional = {"micro_batch_size": 1, "dp_size": 1}  # older checkpoints lack them
        for key, low in (("position", 0), ("epoch", 0), ("micro_batch_size", 1), ("dp_size", 1)):
            value = state.get(key, optional.get(key)) if isinstance(state, dict) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"the checkpoint's data position has {key} "
                                 f"{value if isinstance(value, (int, float)) else type(value).__name__}"
                                 f", not a whole number >= {low}; the checkpoint is corrupt: use "
                                 "an earlier step_* directory")
        for key in ("seed", "num_rows", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise InputError(f"cannot resume data order: saved {key}={state[key]} but this run "
                                 f"has {getattr(self, key)}; resume with the same data and batching")
        position = int(state["position"])
        saved_split = (state.get("micro_batch_size", self.micro_batch_size),
                       state.get("dp_size", self.dp_size))
        if saved_split != (self.micro_batch_size, self.dp_size):
            # Another dp/micro split of the same global batches: convertible only between steps.
            saved_per_global = self.global_batch_size // (saved_split[0] * saved_split[1])
            if position % saved_per_global:
                raise InputError("cannot resume mid global batch with a different dp_size or "
                                 "micro_batch_size")
            position = position // saved_per_global * self.micro_per_global
        self.epoch, self.position = int(state["epoch"]), position


class DataIterator:
    """Endless iterator of collated micro-batches (dicts of [b, s] tensors) over epochs, built in
    the calling process so that `state_dict()` reflects exactly the batches returned so far."""

    def __init__(self, dataset: RowDataset, sampler: DistributedBatchSampler):
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.dataset.batch(self.sampler.next_indices())

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict):
        self.sampler.load_state_dict(state)
