"""Put adapters on a GPTModel and work with them as a whole (torchtune-style small utilities)."""

import torch.nn as nn

from megatron_bdlora.adapters.config import AdapterConfig
from megatron_bdlora.adapters.layer_types import target_spec
from megatron_bdlora.adapters.layers import AdapterLinear
from megatron_bdlora.adapters.layout import check_tensors
from megatron_bdlora.errors import InputError


def model_chunks(model) -> list:
    """A model or a pipeline rank's list of model chunks, as a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def apply_adapters(model, cfg: AdapterConfig) -> list:
    """Wrap every target linear of `model` (a GPTModel, or this pipeline rank's list of chunks)
    in an AdapterLinear; freeze everything else. Each adapter is named (and seeded) by its
    global layer (models.llama.global_name): the names are the PP=1 ones at any PP.

    Raises if a target pattern matches nothing (a typo must not train a silently empty adapter).
    """
    from megatron.core import parallel_state as ps

    # lazy: models.llama imports Megatron-Core, and the launcher's pre-flight reads this module
    # (through checkpoint/adapter_checkpoint) before any rank starts
    from megatron_bdlora.models.llama import global_name

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    found = {t: 0 for t in cfg.modules}
    wrappers = []
    for chunk in model_chunks(model):
        for p in chunk.parameters():
            p.requires_grad_(False)
        for name, module in list(chunk.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in found or isinstance(module, AdapterLinear):
                continue
            parent = chunk.get_submodule(name.rsplit(".", 1)[0])
            wrapper = AdapterLinear(module, target_spec(leaf, module, chunk.config), cfg,
                                    global_name(chunk, name), tp_rank, tp_size)
            setattr(parent, leaf, wrapper)
            wrappers.append(wrapper)
            found[leaf] += 1
        chunk.info.adapter_config = cfg
    missing = [t for t, n in found.items() if n == 0]  # every stage holds decoder layers
    if missing:
        raise ValueError(f"adapter target modules {missing} match no module of the model; "
                         f"check --lora-target-modules")
    return wrappers


def adapter_modules(model) -> dict:
    """{module name: AdapterLinear} of a model or a pipeline rank's chunks, names as in the
    unwrapped PP=1 model (TP- and PP-independent)."""
    return {m.name: m for chunk in model_chunks(model) for m in chunk.modules()
            if isinstance(m, AdapterLinear)}


def trainable_param_count(model) -> int:
    """Parameters this rank trains (a BD-LoRA parameter lives on exactly one TP and PP rank)."""
    return sum(p.numel() for chunk in model_chunks(model) for p in chunk.parameters() if p.requires_grad)


def global_adapter_state(model: nn.Module, tensor_of=lambda p: p.detach()) -> dict:
    """The whole adapter in TP-independent form, on every TP rank: {"<module>.<param>": tensor}.

    `tensor_of` selects per parameter what to gather (default the weights; e.g. `lambda p: p.grad`)."""
    return {f"{n}.{k}": t for n, m in adapter_modules(model).items()
            for k, t in m.gather_global(tensor_of).items()}


def global_adapter_layout(model: nn.Module) -> dict:
    """{"<module>.<param>": global shape} of the model's adapter."""
    return {f"{n}.{k}": shape for n, m in adapter_modules(model).items()
            for k, (shape, _, _) in m.global_layout().items()}


def load_global_adapter_state(model: nn.Module, tensors: dict, where: str = "the adapter state",
                              error=InputError) -> None:
    """Set the model's adapter from global factors {"<module>.<param>": tensor} (any TP the
    constraints allow), checked first against its layout (`where`, `error`: for the message)."""
    check_tensors(tensors, global_adapter_layout(model), where,
                  "check the adapter config (method, rank, nblocks, layout, target modules) and "
                  "the base model", error)
    for n, m in adapter_modules(model).items():
        m.load_global({k: tensors[f"{n}.{k}"] for k in m.adapter_params()})


def local_shards(model: nn.Module, tensors: dict) -> dict:
    """{parameter: this rank's chunk} of global per-parameter tensors (e.g. optimizer moments)."""
    return {p: m.shard(tensors[f"{n}.{k}"], m.shard_dims[k])
            for n, m in adapter_modules(model).items() for k, p in m.adapter_params().items()}


def merge_adapters(model: nn.Module) -> None:
    for m in adapter_modules(model).values():
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for m in adapter_modules(model).values():
        m.unmerge()
