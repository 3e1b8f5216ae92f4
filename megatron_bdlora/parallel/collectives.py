"""Count the collectives issued through torch.distributed, per op type, calls and bytes.

Megatron-Core's TP mappings call `torch.distributed.<op>` by attribute, so wrapping the
attributes sees every collective of the model, forward and backward (autograd runs the
backward mappings on the calling thread on CPU and through the same functions on GPU).
Bytes are the size of the payload: the reduced tensor for all_reduce, the gathered output
for all_gather, the input for reduce_scatter.
"""

import contextlib
from collections import defaultdict

import torch.distributed as dist

# op name -> which positional argument / keyword holds the payload tensor
_OPS = {
    "all_reduce": ("tensor", 0),
    "all_gather_into_tensor": ("output_tensor", 0),
    "_all_gather_base": ("output_tensor", 0),
    "all_gather": ("tensor_list", 0),
    "reduce_scatter_tensor": ("input", 1),
    "_reduce_scatter_base": ("input", 1),
    "reduce_scatter": ("input_list", 1),
    "broadcast": ("tensor", 0),
    "all_to_all_single": ("input", 1),
}
_CANONICAL = {"_all_gather_base": "all_gather", "all_gather_into_tensor": "all_gather",
              "_reduce_scatter_base": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter"}


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size()


class CollectiveCounts:
    """counts[phase][op] = {"calls": n, "bytes": b}; phase is "all" unless set with .phase()."""

    def __init__(self):
        self.counts = defaultdict(lambda: defaultdict(lambda: {"calls": 0, "bytes": 0}))
        self._phase = "all"

    @contextlib.contextmanager
    def phase(self, name: str):
        prev, self._phase = self._phase, name
        try:
            yield self
        finally:
            self._phase = prev

    def record(self, op: str, nbytes: int) -> None:
        entry = self.counts[self._phase][_CANONICAL.get(op, op)]
        entry["calls"] += 1
        entry["bytes"] += nbytes

    def as_dict(self) -> dict:
        return {ph: {op: dict(v) for op, v in sorted(ops.items())} for ph, ops in self.counts.items()}

    def get(self, phase: str) -> dict:
        return {op: dict(v) for op, v in sorted(self.counts.get(phase, {}).items())}


@contextlib.contextmanager
def count_collectives():
    """Record every collective issued inside the block (forward and backward alike)."""
    counts = CollectiveCounts()
    originals = {}
    for op, (kw, pos) in _OPS.items():
        fn = getattr(dist, op, None)
        if fn is None:
            continue
        originals[op] = fn

        def wrapper(*args, _fn=fn, _op=op, _kw=kw, _pos=pos, **kwargs):
            payload = kwargs[_kw] if _kw in kwargs else args[_pos]
            counts.record(_op, _nbytes(payload))
            return _fn(*args, **kwargs)

        setattr(dist, op, wrapper)
    # Megatron's mappings and layers (the SP gathers of trainable linears) bind these two at
    # import time; point the aliases at the wrappers.
    from megatron.core.tensor_parallel import layers, mappings

    aliases = [(mod, name, getattr(mod, name)) for mod in (mappings, layers)
               for name in ("dist_all_gather_func", "dist_reduce_scatter_func")]
    for mod in (mappings, layers):
        mod.dist_all_gather_func = dist.all_gather_into_tensor
        mod.dist_reduce_scatter_func = dist.reduce_scatter_tensor
    try:
        yield counts
    finally:
        for op, fn in originals.items():
            setattr(dist, op, fn)
        for mod, name, fn in aliases:
            setattr(mod, name, fn)
