"""Analytic serving cost model and memory estimate: counts, hand-computed FLOPs, the tools."""

import importlib.util
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_bdlora.adapters.param_count import adapter_params_per_layer
from megatron_bdlora.analytic import cost_model as cm
from megatron_bdlora.analytic import memory_model as mm
from megatron_bdlora.models.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("model,tp", [("tiny", 2), ("llama3.1-8b", 8), ("llama3.1-70b", 8)])
def test_decode_collectives_per_strategy(model, tp):
    hf, batch, r = get_preset(model), 5, 16
    L, h = hf["num_hidden_layers"], hf["hidden_size"]
    colls = {s: cm.decode_step(hf, tp, batch, 100, cm.make_adapter(s, r, nblocks=tp))["collectives"]
             for s in cm.STRATEGIES}
    base = colls["base"]
    assert base["all_reduce"]["calls"] == 2 * L + 1           # 2 per layer + embedding
    assert colls["bd"] == base and colls["replicated"] == base
    extra_ar = colls["slora"]["all_reduce"]["calls"] - base["all_reduce"]["calls"]
    extra_ag = colls["slora"]["all_gather"]["calls"] - base["all_gather"]["calls"]
    assert (extra_ar, extra_ag) == (2 * L, 2 * L)
    # bytes: all-gathers of (b, 3r) after the q/k/v shrinks and (b, 2r) after gate/up
    # (canonical), all-reduces of (b, r) after the o/down shrinks; bf16
    assert colls["slora"]["all_gather"]["bytes"] - base["all_gather"]["bytes"] == L * 2 * batch * 5 * r
    assert colls["slora"]["all_reduce"]["bytes"] - base["all_reduce"]["bytes"] == L * 2 * 2 * batch * r
    assert base["all_reduce"]["bytes"] == (2 * L + 1) * 2 * batch * h


def test_tiny_flops_by_hand():
    # tiny: h=64, f=128, 2 layers, 8 heads, 4 KV heads, d=8, vocab 512; TP=2, 2 requests, context 10
    hf, tp, batch = get_preset("tiny"), 2, 2
    base = cm.decode_step(hf, tp, batch, 10)
    # per layer, per rank: qkv 64*(4+2+2)*8 + proj 32*64 + fc1 64*256/2... = 4096+2048+8192+4096
    # weights; 2 FLOPs per weight per token, 2 tokens, 2 layers; LM head 2*2*64*256
    assert base["flops"]["base"] == 2 * 2 * 18432 * 2 + 2 * 2 * 64 * 256
    # attention: 4 * (4 local heads) * 8 * (11 cached positions) per request per layer
    assert base["flops"]["attention"] == 4 * 4 * 8 * 11 * 2 * 2
    assert base["flops"]["lora"] == 0
    # BD r=8, N=2 per rank: qkv A 24*64/2 + B 128*8/4, proj A 8*64/4 + B 64*8/2,
    # fc1 A 16*64/2 + B 256*8/4, fc2 A 8*128/4 + B 64*8/2
    bd_local = 768 + 256 + 128 + 256 + 512 + 512 + 256 + 256
    slora_local = 768 + 512 + 256 + 256 + 512 + 1024 + 512 + 256
    repl_local = 1536 + 512 + 256 + 512 + 1024 + 1024 + 512 + 512
    for strategy, local in (("bd", bd_local), ("slora", slora_local), ("replicated", repl_local)):
        res = cm.decode_step(hf, tp, batch, 10, cm.make_adapter(strategy, 8, nblocks=2))
        assert res["flops"]["lora"] == 2 * 2 * local * 2, strategy
        assert res["flops"]["base"] == base["flops"]["base"]


@pytest.mark.parametrize("model", ["tiny", "llama3.1-8b", "llama3.1-70b"])
@pytest.mark.parametrize("layout", ["canonical", "fused"])
def test_shards_sum_to_param_count(model, layout):
    hf, tp = get_preset(model), 2
    for strategy in ("bd", "slora"):   # each parameter owned by exactly one rank
        cfg = cm.make_adapter(strategy, 16, nblocks=4 if model == "tiny" else 8, layout=layout)
        local = sum(e["a"] + e["b"] for e in cm.lora_shards(hf, cfg, tp))
        assert local * tp == adapter_params_per_layer(hf, cfg)


def test_inconsistent_shapes_raise():
    hf = get_preset("llama3.1-8b")
    with pytest.raises(ValueError, match="does not divide --bd-nblocks 4"):
        cm.decode_step(hf, 8, 1, 10, cm.make_adapter("bd", 16, nblocks=4))
    with pytest.raises(ValueError, match="must divide"):
        cm.decode_step(get_preset("tiny"), 8, 1, 10)


def test_paper_setting_bd_beats_slora():
    rows = cm.speedup_grid({"llama3.1-8b": get_preset("llama3.1-8b")}, [16], [1, 16], factors=(2,))
    for row in rows:
        assert 0.86 < row["param_ratio"] < 0.87
        assert row["decode_speedup"] > 1 and row["e2e_speedup"] > 1
        assert row["decode_step_ms"]["base"] < row["decode_step_ms"]["bd"] < row["decode_step_ms"]["slora"]
        assert row["paper_speedup"] == 1.63


def test_memory_monotonic():
    hf, cfg = get_preset("llama3.1-8b"), cm.make_adapter("bd", 64, nblocks=8)
    kw = dict(tp=8, seq=4096, adapter=cfg)
    full, rec = mm.estimate(hf, **kw), mm.estimate(hf, recompute=True, **kw)
    assert rec["train"]["activations"] < full["train"]["activations"]
    assert rec["train_total"] < full["train_total"]
    shard = {tp: mm.estimate(hf, tp=tp)["train"]["base_weights"] for tp in (1, 2, 8)}
    assert shard[8] < shard[2] < shard[1]
    assert mm.estimate(hf, **{**kw, "seq": 8192})["train"]["activations"] > full["train"]["activations"]
    assert mm.estimate(hf, dp=4, distributed_optimizer=True, **kw)["train"]["adam_states_fp32"] \
        == full["train"]["adam_states_fp32"] / 4
    # one bf16 adapter per request; KV cache linear in batch
    s1, s2 = (mm.estimate(hf, serve_batch=b, serve_seq=1024, **kw)["serve"] for b in (8, 16))
    assert s2["kv_cache_bf16"] == 2 * s1["kv_cache_bf16"]
    # 8B in bf16 over 8 ranks: ~2 GB of weights per GPU
    assert 1.9e9 < full["train"]["base_weights"] < 2.1e9


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_fit(recipe):
    tool = _tool("estimate_memory")
    args = tool.parse_args(["--config", str(recipe)])
    assert args.tensor_model_parallel_size == 8 and args.adapter == "bdlora"
    res = tool.run(args)
    assert res["train_fits"], res["train_total"] / mm.GiB
    assert res["model_preset"] in recipe.name


def test_estimate_memory_json(capsys):
    _tool("estimate_memory").main(["--config", str(ROOT / "examples/recipes/llama3.1-70b_bdlora_a100.yaml"),
                                   "--serve-batch", "8", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["train_fits"] and res["serve_fits"] and res["serve"]["adapters_bf16"] > 0


def test_estimate_memory_one_line_errors():
    tool = _tool("estimate_memory")
    p8 = ["--model-preset", "llama3.1-8b"]
    for argv, msg in ((["--model-preset", "nope"], "unknown model preset"),
                      ([*p8, "--tensor-model-parallel-size", "8", "--bd-nblocks", "4"],
                       "does not divide --bd-nblocks 4"),
                      ([*p8, "--lora-rank", "12", "--bd-nblocks", "8"],
                       "--lora-rank 12 is not divisible by --bd-nblocks 8"),
                      ([*p8, "--tensor-model-parallel-size", "0"], "must be >= 1"),
                      ([*p8, "--seq-length", "-4"], "must be >= 2"),
                      ([*p8, "--recompute-granularity", "full"], "--recompute-method"),
                      ([*p8, "--fp16"], "use --bf16"),
                      (["--data-parallel-size", "2"], "give --model-preset")):
        with pytest.raises(SystemExit) as exc:
            tool.main(argv)
        text = str(exc.value.code)
        assert text.startswith("error: ") and msg in text and "\n" not in text


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_pass_config_validation(recipe):
    """Each recipe parses (types, choices, combinations) on its 8-GPU node and its adapter passes
    the check pre-flight and the ranks run against the model shape (adapter_config). TE recipes
    are checked with local layers here (TE needs a GPU); the flags are otherwise the same."""
    from megatron_bdlora.adapters.flags import adapter_config
    from megatron_bdlora.models.presets import get_preset
    from megatron_bdlora.training.arguments import parse_args, virtual_pipeline_size

    import yaml

    pp = yaml.safe_load(recipe.read_text()).get("pipeline-model-parallel-size", 1)
    argv = ["--config", str(recipe), "--transformer-impl", "local"]
    args = parse_args(argv, world_size=8 * pp)
    hf = get_preset(recipe.name.split("_")[0])
    virtual_pipeline_size(args, hf["num_hidden_layers"])  # the pipeline layout fits the layers
    assert args.hf_checkpoint.lower().endswith(recipe.name.split("_")[0].replace("llama", "llama-"))
    cfg = adapter_config(args, hf)
    assert cfg.method == "bdlora" and cfg.nblocks % args.tensor_model_parallel_size == 0


def _local_params(hf, configs):
    """{name: (all parameters, trainable parameters)} of this rank's model as the trainer builds
    it: adapters applied (the base frozen), or every weight trained (--adapter none)."""
    from megatron_bdlora.adapters import apply_adapters
    from megatron_bdlora.models.llama import build_model
    from megatron_bdlora.parallel import tp_rank_size

    out = {}
    for name, cfg in configs.items():
        model = build_model(hf, tp=tp_rank_size()[1])
        if cfg is not None:
            apply_adapters(model, cfg)
        out[name] = (sum(p.numel() for p in model.parameters()),
                     sum(p.numel() for p in model.parameters() if p.requires_grad))
    return out


def test_memory_estimate_counts_the_built_model():
    """The estimator's adapter and full fine-tuning figures are the parameter counts of the model
    the trainer builds (TP=2 shards: BD and S-LoRA adapters; all weights for --adapter none),
    times the bytes per parameter the engine keeps (fp32 grads, fp32 main params with bf16, Adam,
    the distributed optimizer's DP sharding); the PP stages split the same count."""
    from megatron_bdlora.adapters.config import AdapterConfig
    from tests.dist_utils import run_distributed

    hf = get_preset("tiny")
    configs = {"bd": AdapterConfig(method="bdlora", rank=4, nblocks=2),
               "slora": AdapterConfig(method="lora", rank=4, sharding="slora"), "none": None}
    counts = run_distributed(_local_params, 2, 2, hf, configs)
    assert counts[0] == counts[1]
    for name, cfg in configs.items():
        total, trainable = counts[0][name]
        assert mm.base_weight_params(hf, 2) + mm.adapter_local_params(hf, cfg, 2) == total, name
        est = mm.estimate(hf, tp=2, seq=16, adapter=cfg, bf16=True)
        assert est["trainable_params_per_gpu"] == trainable, name
        t = est["train"]
        assert t["grads_fp32"] == 4 * trainable and t["adam_states_fp32"] == 8 * trainable
        if cfg is None:  # bf16 weights + fp32 main copies; Megatron-LM's 6 + 12/DP bytes
            assert t["base_weights"] + t["main_params_fp32"] == 6 * trainable
            dist = mm.estimate(hf, tp=2, dp=4, seq=16, bf16=True, distributed_optimizer=True)
            assert sum(dist["train"][k] for k in ("base_weights", "grads_fp32", "main_params_fp32",
                                                  "adam_states_fp32")) == (6 + 12 / 4) * trainable
            fp32 = mm.estimate(hf, tp=2, seq=16, bf16=False)["train"]
            assert fp32["main_params_fp32"] == 0 and fp32["base_weights"] == 4 * trainable
        else:
            assert t["adapter_weights_fp32"] == 4 * trainable and t["main_params_fp32"] == 0
    # PP=2: the stages hold the layers once between them, the embedding and LM head once each
    stages = mm.stage_base_params(hf, 2, pp=2)
    assert stages["first"] + stages["last"] == mm.base_weight_params(hf, 2)


def test_scripts_run(tmp_path):
    path = tmp_path / "proj.json"
    commands = {
        "help_mem": ["tools/estimate_memory.py", "--help"],
        "help_proj": ["tools/project_paper_setting.py", "--help"],
        "proj": ["tools/project_paper_setting.py", "--models", "llama3.1-8b", "--ranks", "16",
                 "--batch-sizes", "1", "16", "--out", str(path)],
    }
    with ThreadPoolExecutor(len(commands)) as pool:  # each start pays the torch import: overlap them
        out = dict(zip(commands, pool.map(lambda c: _run(*c), commands.values())))
    for key in ("help_mem", "help_proj"):
        assert out[key].returncode == 0 and "usage" in out[key].stdout, out[key].stderr
    assert out["proj"].returncode == 0, out["proj"].stderr
    data = json.loads(path.read_text())
    assert {r["batch"] for r in data["speedups"]} == {1, 16}
    assert "312 TFLOP/s" in out["proj"].stdout and "paper" in out["proj"].stdout
