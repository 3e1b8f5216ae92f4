"""Inference and measured benchmarks: KV cache vs full recompute, multi-adapter batching vs each
request alone, BD-LoRA decode collectives == base, and smoke runs of the two benchmark scripts.

One TP=2 spawn computes everything the in-process tests check (starting ranks costs seconds);
the two scripts' smoke runs share one fixture, running at the same time.
"""

import pytest
import torch

from tests.dist_utils import run_distributed

from megatron_bdlora.adapters import AdapterConfig

STRATEGIES = {
    "bd": AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=2),
    "bd-fused": AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=2, layout="fused"),
    "bd-4blocks": AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=4),  # 2 per rank
    "slora": AdapterConfig(method="lora", rank=4, alpha=8, sharding="slora"),
    "replicated": AdapterConfig(method="lora", rank=4, alpha=8, sharding="replicated"),
}
ADAPTER_OF_REQUEST = [2, 0, 1, 2]  # request b uses adapter ADAPTER_OF_REQUEST[b]; one shared
NEW_TOKENS = 5


def _random_states(layout, count, seed):
    from megatron_bdlora.benchmarks.timing import random_adapter_states

    return random_adapter_states(layout, count, seed, b_std=0.3)


def _worker():
    from megatron_bdlora.adapters import (apply_adapters, global_adapter_layout,
                                          load_global_adapter_state)
    from megatron_bdlora.benchmarks.timing import share_base_weights
    from megatron_bdlora.inference import (KVCacheSession, adapter_batch, greedy_generate,
                                           load_adapter_stack)
    from megatron_bdlora.models.llama import build_model
    from megatron_bdlora.models.presets import get_preset
    from megatron_bdlora.parallel import count_collectives, tp_rank_size

    hf = get_preset("tiny")
    tp = tp_rank_size()[1]
    torch.manual_seed(0)
    base = build_model(hf, tp=tp).eval()
    gen = torch.Generator().manual_seed(3)
    out = {}

    # 1. KV cache vs full recompute, left-padded prompts of different lengths; base and a bd model
    ids = torch.randint(2, hf["vocab_size"], (3, 10), generator=gen)
    lengths = torch.tensor([10, 4, 7])
    for i, n in enumerate(lengths.tolist()):
        ids[i, :10 - n] = 0
    bd = build_model(hf, tp=tp, init=False)
    share_base_weights(bd, base)
    apply_adapters(bd, STRATEGIES["bd"])
    load_global_adapter_state(bd, _random_states(global_adapter_layout(bd), 1, 9)[0])
    bd.eval()
    for name, model in (("base", base), ("bd", bd)):
        cached = greedy_generate(model, ids, 8, lengths=lengths, return_logits=True)
        full = greedy_generate(model, ids, 8, lengths=lengths, use_cache=False, return_logits=True)
        alone = greedy_generate(model, ids[1:2, 6:], 8, return_logits=True)  # request 1 unpadded
        out[f"kv-{name}"] = {"cached": cached, "full": full, "alone": alone}

    # 2. multi-adapter batch vs each request alone with its adapter (single-adapter path)
    prompts = torch.randint(2, hf["vocab_size"], (len(ADAPTER_OF_REQUEST), 6), generator=gen)
    index = torch.tensor(ADAPTER_OF_REQUEST)
    for name, cfg in STRATEGIES.items():
        model = build_model(hf, tp=tp, init=False)
        share_base_weights(model, base)
        apply_adapters(model, cfg)
        model.eval()
        states = _random_states(global_adapter_layout(model), 3, seed=len(name))
        load_adapter_stack(model, states)
        with adapter_batch(model, index):
            batched = greedy_generate(model, prompts, NEW_TOKENS, return_logits=True)
            with count_collectives() as counts:  # 3. collectives of one prefill and decode step
                session = KVCacheSession(model, len(index), prompts.shape[1] + 1)
                with counts.phase("prefill"):
                    logits = session.prefill(prompts)
                with counts.phase("decode"):
                    session.step(logits.argmax(-1))
        alone = []
        for b, k in enumerate(ADAPTER_OF_REQUEST):
            load_global_adapter_state(model, states[k])
            alone.append(greedy_generate(model, prompts[b:b + 1], NEW_TOKENS, return_logits=True))
        out[f"multi-{name}"] = {"batched": batched, "alone": alone, "counts": counts.as_dict()}
    with count_collectives() as counts:
        session = KVCacheSession(base, len(index), prompts.shape[1] + 1)
        with counts.phase("prefill"):
            logits = session.prefill(prompts)
        with counts.phase("decode"):
            session.step(logits.argmax(-1))
    out["base-counts"] = counts.as_dict()
    out["base-tokens"] = greedy_generate(base, prompts, NEW_TOKENS)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2, 2)


def _close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name", ["base", "bd"])
def test_kv_cache_equals_full_recompute(results, name):
    for r in results:  # every TP rank returns the same tokens and logits
        (cached, lc), (full, lf) = r[f"kv-{name}"]["cached"], r[f"kv-{name}"]["full"]
        assert cached == full
        assert lc.shape == lf.shape == (3, 8, 512)
        assert _close(lc, lf)
    assert results[0][f"kv-{name}"]["cached"][0] == results[1][f"kv-{name}"]["cached"][0]
    # a left-padded request gives the same tokens as the request alone (RoPE is relative)
    (cached, lc), (alone, la) = results[0][f"kv-{name}"]["cached"], results[0][f"kv-{name}"]["alone"]
    assert alone[0] == cached[1]
    assert _close(la[0], lc[1])


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_multi_adapter_batch_equals_each_request_alone(results, name):
    r = results[0][f"multi-{name}"]
    tokens, logits = r["batched"]
    for b, (alone_tokens, alone_logits) in enumerate(r["alone"]):
        assert tokens[b] == alone_tokens[0], b
        assert _close(logits[b], alone_logits[0]), b
    # the adapters matter: requests 0 and 3 share adapter 2 but differ from the base model
    assert tokens != results[0]["base-tokens"]


def test_decode_collectives(results):
    base = results[0]["base-counts"]
    for name in ("bd", "bd-fused"):
        assert results[0][f"multi-{name}"]["counts"] == base  # calls and bytes, prefill and decode
    assert results[0]["multi-replicated"]["counts"] == base  # replicated pays in FLOPs instead
    layers = 2
    slora = results[0]["multi-slora"]["counts"]["decode"]
    assert slora["all_gather"]["calls"] - base["decode"]["all_gather"]["calls"] == 2 * layers
    assert slora["all_reduce"]["calls"] - base["decode"]["all_reduce"]["calls"] == 2 * layers


@pytest.fixture(scope="module")
def smokes(together, torchrun_tool):
    """The two benchmark scripts' smoke runs, at the same time: (serving, training TP=2 x DP=2)."""
    return together(lambda: torchrun_tool("benchmark_serving.py", 2, timeout=300),
                    lambda: torchrun_tool("benchmark_training.py", 4, "--tensor-model-parallel-size",
                                          "2", timeout=300))


def test_serving_script_smoke(smokes):
    out = smokes[0]
    assert set(out) == {"config", "results"}
    assert out["config"]["tp"] == 2
    assert set(out["results"]) == {"base", "replicated", "slora", "bd"}
    for v in out["results"].values():
        for key in ("decode_ms_median", "prefill_ms_median", "decode_ms_p10", "decode_ms_p90",
                    "decode_ratio_to_base", "decode_ratio_to_bd"):
            assert key in v
        for op in v["collectives_per_decode_step"].values():
            assert set(op) == {"calls", "bytes"}
    bd = out["results"]["bd"]
    assert bd["greedy_equals_merged"]["all_equal"] is True
    assert bd["collectives_per_decode_step"] == out["results"]["base"]["collectives_per_decode_step"]


def test_training_script_smoke_tp2_dp2(smokes):
    out = smokes[1]
    assert set(out) == {"config", "results"}
    assert (out["config"]["tp"], out["config"]["dp"]) == (2, 2)
    assert set(out["results"]) == {"base", "replicated", "slora", "bd"}
    for v in out["results"].values():
        for key in ("step_ms_median", "tokens_per_s", "collectives_per_step", "step_ratio_to_bd"):
            assert key in v
    res = out["results"]
    assert res["bd"]["tp_collectives_equal_base"] is True
    # after the backward (Megatron's finalize_model_grads), over DP: the token count, and for bd
    # its DDP bucket of adapter gradients; no TP collective (frozen norms)
    base_sync, bd_sync = (res[m]["collectives_per_phase"]["grad_sync"] for m in ("base", "bd"))
    assert base_sync["all_reduce[dp]"] == {"calls": 1, "bytes": 4}
    assert bd_sync["all_reduce[dp]"]["calls"] == 2 and bd_sync["all_reduce[dp]"]["bytes"] > 4
    assert "all_reduce" not in bd_sync and "optimizer" not in res["base"]["collectives_per_phase"]
