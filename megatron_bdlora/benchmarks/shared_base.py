"""The benchmarks' models: one random base shared by every method's model (`build_models`)."""

import torch

from megatron_bdlora.adapters import apply_adapters
from megatron_bdlora.benchmarks.timing import share_base_weights
from megatron_bdlora.models.llama import build_model
from megatron_bdlora.parallel import device, tp_rank_size


def build_models(hf: dict, configs: dict, seed: int = 0, sequence_parallel: bool = False,
                 dtype=torch.float32) -> dict:
    """{method: GPTModel}: one randomly initialised base, shared (same tensors) by every method's
    model, each wrapped with its adapter. Base weights are never modified by these models."""
    tp = tp_rank_size()[1]
    torch.manual_seed(seed)
    ref = build_model(hf, tp=tp, sequence_parallel=sequence_parallel, dtype=dtype).to(device())
    for p in ref.parameters():
        p.requires_grad_(False)
    models = {}
    for method, cfg in configs.items():
        model = ref if cfg is None else build_model(hf, tp=tp, init=False, dtype=dtype,
                                                     sequence_parallel=sequence_parallel)
        if model is not ref:
            share_base_weights(model, ref)
            model.to(device())
        if cfg is not None:
            apply_adapters(model, cfg)
        models[method] = model
    return models
