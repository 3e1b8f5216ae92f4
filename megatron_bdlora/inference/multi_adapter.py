"""Serve a batch where every request uses its own adapter (S-LoRA / punica-style batching).

    load_adapter_stack(model, [state_0, ..., state_{K-1}])   # global adapter states
    with adapter_batch(model, torch.tensor([3, 0, 7, ...])):   # adapter of each request
        tokens = greedy_generate(model, ids, 16)

Each `AdapterLinear` keeps the K adapters' local shards stacked on a leading dimension and
gathers, per request, the factors named by `adapter_index`, once per batch: every forward of the
batch (each decode step) reuses them (`AdapterLinear._batch_factors`).
The sharding, and so the collectives, are those of the single-adapter path: `bd` needs no
communication, `slora` keeps its all-gather / all-reduce of the (tokens, r) activations,
`replicated` keeps its replicated LoRA FLOPs. Inference only: the stacks are not parameters.
"""

import contextlib

import torch

from megatron_bdlora.adapters.layout import check_tensors
from megatron_bdlora.adapters.model import adapter_modules, global_adapter_layout


def load_adapter_stack(model, states: list) -> None:
    """Load K global adapter states ({"<module>.<param>": tensor}, as `global_adapter_state`),
    each checked against the model's adapter layout (names and shapes) first."""
    mods = adapter_modules(model)
    if not mods:
        raise ValueError("the model has no adapters; call apply_adapters first")
    expected = global_adapter_layout(model)
    for k, st in enumerate(states):
        check_tensors(st, expected, f"adapter {k}", "it does not match the model's adapter "
                      "(method, rank, nblocks, layout, target modules)")
    for n, m in mods.items():
        m.load_global_stack([{p: st[f"{n}.{p}"] for p in m.adapter_params()} for st in states])


def clear_adapter_stack(model) -> None:
    for m in adapter_modules(model).values():
        m.adapter_stack = None
        m.set_adapter_index(None)


@contextlib.contextmanager
def adapter_batch(model, adapter_index: torch.Tensor):
    """Within the block, request b of every forward uses stacked adapter `adapter_index[b]`."""
    mods = adapter_modules(model).values()
    adapter_index = torch.as_tensor(adapter_index, dtype=torch.long).cpu()
    for m in mods:
        if m.adapter_stack is None:
            raise RuntimeError("no adapter stack loaded; call load_adapter_stack first")
        k = next(iter(m.adapter_stack.values())).shape[0]
        if adapter_index.numel() and (adapter_index.min() < 0 or adapter_index.max() >= k):
            raise ValueError(f"adapter_index {adapter_index.tolist()} out of range for {k} adapters")
        m.set_adapter_index(adapter_index.to(m.lora_A.device))
    try:
        yield
    finally:
        for m in mods:
            m.set_adapter_index(None)
