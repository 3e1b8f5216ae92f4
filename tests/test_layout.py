"""adapters/layout.py against the real model: for every preset x strategy x layout x TP it allows,
the global factor shapes, shard dims and parameter names of the GPTModel's own AdapterLinear
parameters (meta device, one decoder layer) equal the layout's, and the layout's module sizes
equal Megatron-Core's own base weight partition. layout.py imports without torch."""

import itertools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.dist_utils import run_distributed

from megatron_bdlora.adapters import AdapterConfig
from megatron_bdlora.adapters import layout
from megatron_bdlora.adapters import strategies
from megatron_bdlora.adapters.strategies import Factor
from megatron_bdlora.errors import InputError
from megatron_bdlora.models import shape
from megatron_bdlora.models.presets import PRESETS

# The presets, plus SmolLM2-135M's shape (docs/design.md §7: 9 heads / 3 KV heads allow TP=3).
SHAPES = {name: {**hf, "num_hidden_layers": 1} for name, hf in PRESETS.items()}
SHAPES["smollm2-135m"] = {**PRESETS["tiny"], "hidden_size": 576, "intermediate_size": 1536,
                          "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                          "vocab_size": 49152, "num_hidden_layers": 1}
PARTIAL = ("q_proj", "v_proj", "o_proj", "down_proj")


def _configs(tp: int) -> dict:
    """{id: AdapterConfig}: every strategy x layout, and canonical partial targets."""
    n = 3 if tp == 3 else 4
    out = {}
    for strategy, lay in itertools.product(("bd", "slora", "replicated"), ("canonical", "fused")):
        common = dict(rank=2 * n * tp, layout=lay)
        cfg = (AdapterConfig(method="bdlora", nblocks=n, **common) if strategy == "bd"
               else AdapterConfig(method="lora", sharding=strategy, **common))
        out[f"{strategy}-{lay}"] = cfg
        if lay == "canonical":
            out[f"{strategy}-partial"] = AdapterConfig.from_dict({**cfg.to_dict(),
                                                                  "target_modules": PARTIAL})
    return out


def _cases(tp: int) -> list:
    """(shape name, config id) pairs `check` allows at this TP."""
    cases = []
    for (name, hf), (cid, cfg) in itertools.product(SHAPES.items(), _configs(tp).items()):
        try:
            layout.check(hf, cfg, tp)
        except InputError:
            continue
        cases.append((name, cid))
    return cases


def _model_layouts(tps: tuple, builder: int) -> dict:
    """{(tp, shape, config id): ({param: (global shape, shard dim, TP-sharded flag)}, {module:
    (global out, in) of its base weight})} from real GPTModels on the meta device, at each TP of
    `tps` (every rank joins the TP groups; rank `builder` builds: meta models need no peers)."""
    import torch
    import torch.distributed as dist

    from megatron_bdlora.adapters import adapter_modules, apply_adapters
    from megatron_bdlora.models.llama import build_model
    from megatron_bdlora.parallel import init_distributed

    out = {}
    for tp in tps:
        init_distributed(tp)
        if dist.get_rank() != builder:
            continue
        configs = _configs(tp)
        for name, cid in _cases(tp):
            with torch.device("meta"):
                model = build_model(SHAPES[name], tp=tp, init=False)
                apply_adapters(model, configs[cid])
            params, base = {}, {}
            for mname, m in adapter_modules(model).items():
                for k, p in m.adapter_params().items():
                    dim = m.shard_dims[k]
                    shape = list(p.shape)
                    if dim is not None:
                        shape[dim] *= tp
                    params[f"{mname}.{k}"] = (tuple(shape), dim, p.tensor_model_parallel)
                out_l, in_l = m.base.weight.shape  # Megatron's own partition of the base weight
                base[mname] = (out_l * tp, in_l) if m.spec.kind == "column" else (out_l, in_l * tp)
            out[(tp, name, cid)] = (params, base)
    return out


def test_layout_equals_model_parameters():
    expected = {tp: _cases(tp) for tp in (1, 2, 3, 4)}
    assert all(expected[tp] for tp in (1, 2, 4)) and expected[3]
    assert {name for name, _ in expected[3]} == {"smollm2-135m"}  # Llama-3's 8 KV heads refuse TP=3
    # Two worlds started side by side (starting ranks is most of the time): rank 1 of 4 is TP
    # rank 1 at TP=2 and 4, rank 2 of 3 the last TP rank at TP=3.
    with ThreadPoolExecutor(2) as pool:
        four = pool.submit(run_distributed, _model_layouts, 4, 4, (1, 2, 4), 1)
        three = pool.submit(run_distributed, _model_layouts, 3, 3, (3,), 2)
        got = {**four.result()[1], **three.result()[2]}
    assert set(got) == {(tp, name, cid) for tp, cases in expected.items() for name, cid in cases}
    for (tp, name, cid), (params, base) in got.items():
        hf, cfg = SHAPES[name], _configs(tp)[cid]
        want = layout.adapter_layout(hf, cfg)
        assert {k: (f.shape, f.shard_dim, f.shard_dim is not None) for k, f in want.items()} == params, \
            (tp, name, cid)
        for mname, (out_features, in_features) in base.items():
            spec = layout.module_spec(hf, mname.rsplit(".", 1)[-1])
            assert (spec.out_features, spec.in_features) == (out_features, in_features), (tp, name, mname)
        assert sum(Factor(*v[:2], None).numel for v in params.values()) == \
            layout.params_per_layer(hf, cfg)


def test_check_refuses_what_the_model_cannot_hold():
    hf = SHAPES["llama3.1-8b"]
    bd = AdapterConfig(method="bdlora", rank=16, nblocks=8)
    layout.check(hf, bd, 8)
    for cfg, tp, needle in [
        (bd, 3, "--tensor-model-parallel-size 3 must divide the attention heads (32), KV heads (8)"),
        (AdapterConfig(method="bdlora", rank=16, nblocks=16), 1, "must divide num_query_groups 8"),
        (AdapterConfig(method="bdlora", rank=16, nblocks=4), 8, "does not divide --bd-nblocks 4"),
        (AdapterConfig(method="lora", rank=6), 4, "--lora-rank 6 must be a multiple of"),
    ]:
        with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            layout.check(hf, cfg, tp)
    # partial targets: only the adapted projections' sizes must split into N blocks
    odd = {**hf, "intermediate_size": 14338}  # 14338 % 4 != 0
    layout.check(odd, AdapterConfig(method="bdlora", rank=8, nblocks=4,
                                    target_modules=("linear_qkv", "linear_proj")), 2)
    with pytest.raises(InputError, match="gate_proj output size 14338"):
        layout.check(odd, AdapterConfig(method="bdlora", rank=8, nblocks=4), 2)


def test_check_tensors_one_line():
    want = {"a": (2, 3), "b": (4,)}
    layout.check_tensors({"a": (2, 3), "b": (4,)}, want, "f", "fix")
    for found, needle in [({"a": (2, 3)}, "f lacks b; fix"),
                          ({**want, "c": (1,)}, "f has unexpected tensor c; fix"),
                          ({"a": (3, 2), "b": (4,)}, "f: a has shape (3, 2), expected (2, 3); fix")]:
        with pytest.raises(InputError) as err:
            layout.check_tensors(found, want, "f", "fix")
        assert str(err.value) == needle


def test_padded_vocab_is_the_models():
    from megatron_bdlora.analytic import memory_model

    hf = PRESETS["llama3.1-8b"]
    assert shape.padded_vocab_size(128256, 8) == 128256  # not 128 * 8 = 1024's multiple 129024
    per_rank = memory_model.base_weight_params(hf, 8) - memory_model.base_weight_params(
        {**hf, "vocab_size": 0}, 8)
    assert per_rank == 2 * 128256 * hf["hidden_size"] / 8


def test_layout_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['megatron'] = None\n"
            "from megatron_bdlora.adapters import layout, param_count, strategies\n"
            "from megatron_bdlora.analytic import cost_model\n"
            "print(len(layout.PROJECTIONS), 'torch' in sys.modules and sys.modules['torch'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["7", "False"]


def _bd_rank_slice_by_hand(kind, a, b, n, tp, i):
    """Rank i of tp holds blocks [i n/t, (i+1) n/t): rank rows [i r/t, (i+1) r/t) of the whole
    factor, and its output (column) / input (row) chunk of the packed one as a block diagonal."""
    import torch

    ranks = a.shape[0] // tp
    if kind == strategies.COLUMN:  # A (r, in), packed B (out, r/N)
        rows = b.shape[0] // tp
        mine = b[i * rows:(i + 1) * rows].unflatten(0, (n // tp, -1))
        return a[i * ranks:(i + 1) * ranks], torch.block_diag(*mine)
    mine = a[i * ranks:(i + 1) * ranks].unflatten(0, (n // tp, -1))  # packed A (r, in/N), B (out, r)
    return torch.block_diag(*mine), b[:, i * ranks:(i + 1) * ranks]


def test_strategy_facts_agree_across_consumers():
    """One strategy's facts, read by the export (HF form), PEFT import (its inverse), the vLLM
    plugin's rank slicing and the cost model, agree: HF shapes are the strategy's, import undoes
    export, and where a rank runs an ordinary LoRA (no collective on u) its slices rebuild ΔW."""
    import torch

    from megatron_bdlora.analytic.cost_model import lora_shards
    from megatron_bdlora.checkpoint.export import dense_deltas, hf_factors

    hf = SHAPES["tiny"]
    gen = torch.Generator().manual_seed(0)
    for cid, cfg in _configs(2).items():
        strategy = strategies.strategy_of(cfg)
        n = strategy.nblocks(cfg)
        tensors = {k: torch.randn(s, generator=gen)
                   for k, s in layout.expected_global_shapes(hf, cfg).items()}
        deltas = dense_deltas(tensors, cfg, hf)
        for packed in {False, strategy.has_blocks}:
            for name, (a, b) in hf_factors(tensors, cfg, hf, packed=packed).items():
                proj = layout.BY_NAME[name.rsplit(".", 1)[-1]]
                fan_in, out = shape.projection_shapes(hf)[proj.name]
                assert (a.shape, b.shape) == strategy.hf_shapes(proj.kind, fan_in, out, cfg.rank, n,
                                                                packed), (cid, name)
                if not packed:
                    continue
                key = f"{layout.megatron_key(0, proj.module)}.lora_{proj.bd_factor}"
                mine = tensors[key + (f".{proj.name}" if proj.bd_factor == "B" else "")]
                assert torch.equal(strategy.from_hf(proj.kind, proj.bd_factor,
                                                    a if proj.bd_factor == "A" else b, n), mine)
                for tp in (1, 2):  # the slices the vLLM plugin stores, against design.md §9 by hand
                    for i in range(tp):
                        want = _bd_rank_slice_by_hand(proj.kind, a, b, n, tp, i)
                        got = strategy.rank_slice(proj.kind, a, b, n, tp, i)
                        assert all(torch.equal(x, y) for x, y in zip(got, want)), (cid, name, tp)
        for tp in (1, 2):
            if any(e["comm"] for e in lora_shards(hf, cfg, tp)):
                continue  # the ranks exchange u: a rank's slices alone are not a LoRA
            for name, (a, b) in hf_factors(tensors, cfg, hf, packed=strategy.has_blocks).items():
                kind = layout.BY_NAME[name.rsplit(".", 1)[-1]].kind
                parts = [strategy.rank_slice(kind, a, b, n, tp, i) for i in range(tp)]
                delta = torch.cat([b_i @ a_i for a_i, b_i in parts],
                                  dim=0 if kind == strategies.COLUMN else 1)
                torch.testing.assert_close(cfg.scale * delta, deltas[f"{name}.weight"])
