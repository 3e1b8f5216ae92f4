"""Parameter counts at Llama-3.1 scale (meta device) and the one-line constraint errors."""

import pytest
import torch

from tests.dist_utils import run_distributed

from megatron_bdlora.adapters import AdapterConfig
from megatron_bdlora.adapters.param_count import adapter_params, match_bd_rank
from megatron_bdlora.errors import InputError
from megatron_bdlora.models.presets import get_preset


def _meta_counts(preset, cfgs, layers):
    """Trainable adapter parameters of real modules on the meta device (no weights)."""
    from megatron_bdlora.adapters import apply_adapters, trainable_param_count
    from megatron_bdlora.models.llama import build_model

    hf = {**get_preset(preset), "num_hidden_layers": layers}
    counts = []
    for cfg in cfgs:
        with torch.device("meta"):
            model = build_model(hf, tp=1, init=False)
            apply_adapters(model, cfg)
        counts.append(trainable_param_count(model))
    return counts


@pytest.mark.parametrize("preset,ratios", [("llama3.1-8b", (0.863, 1.725)),
                                           ("llama3.1-70b", (0.870, 1.741))])
def test_paper_parameter_ratios(preset, ratios):
    r = 16
    lora = AdapterConfig(method="lora", rank=r)
    bd = [AdapterConfig(method="bdlora", rank=k * r, nblocks=8) for k in (2, 4)]
    # Real modules for 2 layers (meta device), then the analytic count for the whole model.
    real = run_distributed(_meta_counts, 1, 1, preset, [lora] + bd, 2)[0]
    hf = get_preset(preset)
    two = {**hf, "num_hidden_layers": 2}
    assert real == [adapter_params(two, c) for c in [lora] + bd]
    got = tuple(round(adapter_params(hf, c) / adapter_params(hf, lora), 3) for c in bd)
    assert got == ratios
    # Fused layout: ~15% fewer LoRA parameters, different ratios (docs/design.md §1).
    fused = AdapterConfig(method="lora", rank=r, layout="fused")
    assert adapter_params(hf, fused) < 0.86 * adapter_params(hf, lora)


def test_rank_matching():
    hf = get_preset("llama3.1-8b")
    lora = AdapterConfig(method="lora", rank=16)
    rank = match_bd_rank(hf, lora, 8)
    assert rank % 8 == 0
    below = adapter_params(hf, AdapterConfig(method="bdlora", rank=rank, nblocks=8))
    above = adapter_params(hf, AdapterConfig(method="bdlora", rank=rank + 8, nblocks=8))
    assert below <= adapter_params(hf, lora) < above


@pytest.mark.parametrize("leaf,cfg,over,tp,expected", [
    ("linear_qkv", AdapterConfig(method="bdlora", rank=8, nblocks=2), {}, 4,
     "does not divide --bd-nblocks 2"),
    ("linear_qkv", AdapterConfig(method="bdlora", rank=16, nblocks=8), {}, 2,
     "must divide num_query_groups 4"),
    ("linear_fc1", AdapterConfig(method="bdlora", rank=8, nblocks=4), {"intermediate_size": 130}, 2,
     "gate_proj output size 130 is not divisible by --bd-nblocks 4"),
    ("linear_fc2", AdapterConfig(method="bdlora", rank=8, nblocks=4), {"intermediate_size": 130}, 2,
     "input size 130 is not divisible by --bd-nblocks 4"),
    ("linear_proj", AdapterConfig(method="lora", rank=3, sharding="slora"), {}, 2,
     "must be a multiple of"),
])
def test_constraint_errors(leaf, cfg, over, tp, expected):
    from megatron_bdlora.adapters.layout import check, check_module, module_spec

    hf = {**get_preset("tiny"), **over}
    with pytest.raises(InputError) as err:
        check_module(module_spec(hf, leaf), cfg, tp, leaf)
    assert expected in str(err.value) and "\n" not in str(err.value)
    # the whole-model check refuses it with the same line
    target = AdapterConfig.from_dict({**cfg.to_dict(), "target_modules": [leaf]})
    with pytest.raises(InputError, match=expected):
        check(hf, target, tp)


def _apply_errors(hf):
    """Errors raised by apply_adapters on a real model at this TP."""
    from megatron_bdlora.adapters import apply_adapters
    from megatron_bdlora.models.llama import build_model

    msgs = []
    for cfg in (AdapterConfig(method="bdlora", rank=8, nblocks=1),  # TP=2 does not divide N=1
                AdapterConfig(method="lora", rank=4)):
        model = build_model(hf, tp=2, init=False)
        try:
            apply_adapters(model, cfg)
            apply_adapters(model, cfg)  # second time: every target is already wrapped
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def test_apply_errors():
    msgs = run_distributed(_apply_errors, 2, 2, get_preset("tiny"))[0]
    assert "does not divide --bd-nblocks 1" in msgs[0]
    assert "match no module" in msgs[1]
    assert all("\n" not in m for m in msgs)


def test_config_errors():
    with pytest.raises(InputError, match="--lora-rank 6 is not divisible by --bd-nblocks 4"):
        AdapterConfig(method="bdlora", rank=6, nblocks=4)
    with pytest.raises(ValueError, match="unknown target modules"):
        AdapterConfig(target_modules=("qproj",))
    with pytest.raises(ValueError, match="unknown adapter layout"):
        AdapterConfig(layout="packed")
