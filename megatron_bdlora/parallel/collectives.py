"""Count the collectives issued through torch.distributed, per op type, calls and bytes.

Megatron-Core's TP mappings call `torch.distributed.<op>` by attribute, so wrapping the
attributes sees every collective of the model, forward and backward (autograd runs the
backward mappings on the calling thread on CPU and through the same functions on GPU).
Bytes are the size of the payload: the reduced tensor for all_reduce, the gathered output
for all_gather, the input for reduce_scatter.

An op on the tensor-parallel group is recorded by its name ("all_reduce"); on another group
with the group's name appended: "all_reduce[dp]" (data parallel: the engine's gradient reduce and
token count), "all_reduce[mp]" (model parallel: the grad norm), "broadcast[pp]", "[embd]",
"[world]", "[other]".

Pipeline point-to-point traffic goes through `batch_isend_irecv` (Megatron-Core's default
`batch_p2p_comm`, which the model config keeps): each op in a batch is recorded as "send[pp]"
or "recv[pp]" with its tensor's bytes. (`isend`/`irecv` themselves cannot be wrapped: `P2POp`
accepts only the original functions.)
"""

import contextlib
from collections import defaultdict

import torch.distributed as dist

# op name -> (keyword, position) of the payload tensor, position of the group argument
_OPS = {
    "all_reduce": ("tensor", 0, 2),
    "all_gather_into_tensor": ("output_tensor", 0, 2),
    "_all_gather_base": ("output_tensor", 0, 2),
    "all_gather": ("tensor_list", 0, 2),
    "reduce_scatter_tensor": ("input", 1, 3),
    "_reduce_scatter_base": ("input", 1, 3),
    "reduce_scatter": ("input_list", 1, 3),
    "broadcast": ("tensor", 0, 2),
    "all_to_all_single": ("input", 1, 4),
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
        entry = self.counts[self._phase][op]
        entry["calls"] += 1
        entry["bytes"] += nbytes

    def as_dict(self) -> dict:
        return {ph: {op: dict(v) for op, v in sorted(ops.items())} for ph, ops in self.counts.items()}

    def get(self, phase: str) -> dict:
        return {op: dict(v) for op, v in sorted(self.counts.get(phase, {}).items())}


def _group_names() -> dict:
    """{id(process group): name} of Megatron's groups ("" for tensor parallel)."""
    from megatron.core import parallel_state as ps

    names = {}
    if ps.model_parallel_is_initialized():
        for name, get in (("mp", ps.get_model_parallel_group), ("embd", ps.get_embedding_group),
                          ("pp", ps.get_pipeline_model_parallel_group),
                          ("dp", ps.get_data_parallel_group),
                          ("dp", lambda: ps.get_data_parallel_group(with_context_parallel=True)),
                          ("", ps.get_tensor_model_parallel_group)):  # last: wins a tie
            try:
                names[id(get())] = name
            except (AssertionError, RuntimeError):  # a group this run did not create
                pass
    return names


def model_collectives(counts: dict) -> dict:
    """`counts` (as_dict) restricted to the model's own collectives: tensor-parallel ops and
    pipeline point-to-point traffic (what BD-LoRA must issue exactly as the base does); the
    engine's DP gradient reduce and grad norm, which scale with what trains, are left out."""
    keep = lambda op: "[" not in op or op.endswith("[pp]")
    out = {ph: {op: v for op, v in ops.items() if keep(op)} for ph, ops in counts.items()}
    return {ph: ops for ph, ops in out.items() if ops}


@contextlib.contextmanager
def count_collectives():
    """Record every collective issued inside the block (forward and backward alike)."""
    counts = CollectiveCounts()
    originals = {}
    names = _group_names()
    for op, (kw, pos, gpos) in _OPS.items():
        fn = getattr(dist, op, None)
        if fn is None:
            continue
        originals[op] = fn

        def wrapper(*args, _fn=fn, _op=op, _kw=kw, _pos=pos, _gpos=gpos, **kwargs):
            payload = kwargs[_kw] if _kw in kwargs else args[_pos]
            group = kwargs.get("group", args[_gpos] if len(args) > _gpos else None)
            name = "world" if group is None or group is dist.group.WORLD else \
                names.get(id(group), "other")
            op_name = _CANONICAL.get(_op, _op)
            counts.record(op_name if name == "" else f"{op_name}[{name}]", _nbytes(payload))
            return _fn(*args, **kwargs)

        setattr(dist, op, wrapper)
    batch_p2p = originals["batch_isend_irecv"] = dist.batch_isend_irecv

    def batch_wrapper(ops, *args, **kwargs):
        for p2p in ops:
            name = names.get(id(p2p.group), "other")
            kind = "send" if p2p.op is dist.distributed_c10d.isend else "recv"
            counts.record(f"{kind}[{name}]", _nbytes(p2p.tensor))
        return batch_p2p(ops, *args, **kwargs)

    dist.batch_isend_irecv = batch_wrapper
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
