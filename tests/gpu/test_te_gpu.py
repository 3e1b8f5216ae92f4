"""Real Transformer Engine on a CUDA GPU (tools/gpu_smoke.sh stage `te`); skipped without both.

TP=1, one process: the adapters' take-over silences TE's own collectives (a column-parallel SP
LayerNormLinear at tp_size=2, its collectives patched to record calls: the expected ones without
the take-over, none with it; tests/te_checks.py, also run on the fake TE on CPU), TE vs local
logits and adapter gradients within bf16 tolerance, and training tokens/s TE vs local on the
Llama-3.2-1B shape (printed; run pytest with -s to see it). FP8 is not claimed: Megatron-Core
keeps TE's first FP8 weight cache for the whole run without `config.fp8`, which the trainer does
not set.
"""

import os
import time

import pytest
import torch

from megatron_bdlora.te import guard

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or guard.probe() != "ok",
    reason="needs a CUDA GPU and an importable Transformer Engine")

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                max_position_embeddings=8192)
IMPLS = ("local", "transformer_engine")


@pytest.fixture(scope="module", autouse=True)
def distributed():
    from megatron_bdlora.parallel import destroy_distributed, init_distributed

    os.environ.update({k: os.environ.get(k, v) for k, v in dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29517").items()})
    init_distributed(1, seed=1234)
    yield
    destroy_distributed()


def _pair(hf, cfg, dtype=torch.bfloat16):
    """Local and TE models with the same base weights and the same (non-zero) adapter."""
    from megatron_bdlora.adapters import (apply_adapters, global_adapter_layout,
                                          load_global_adapter_state)
    from megatron_bdlora.checkpoint.hf_mapping import (hf_state_from_model, load_base_weights,
                                                       tensor_reader)
    from megatron_bdlora.models.llama import build_model

    local = build_model(hf, dtype=dtype).cuda()
    sd = hf_state_from_model(local, hf)
    te = build_model(hf, dtype=dtype, init=False, transformer_impl="transformer_engine").cuda()
    load_base_weights(te, tensor_reader({k: v.cuda() for k, v in sd.items()}), hf)
    gen = torch.Generator().manual_seed(0)
    factors = None
    for model in (local, te):
        apply_adapters(model, cfg)
        if factors is None:
            factors = {k: torch.randn(s, generator=gen) * 0.05
                       for k, s in sorted(global_adapter_layout(model).items())}
        load_global_adapter_state(model, factors)
        model.cuda()
    return local, te


def _cfg():
    from megatron_bdlora.adapters import AdapterConfig

    return AdapterConfig(method="bdlora", rank=16, alpha=32, nblocks=2)


def _batch(hf, b, s):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf["vocab_size"], (b, s), generator=gen).cuda()
    return ids, torch.roll(ids, -1, 1)


def test_take_over_silences_te_collectives():
    from tests.te_checks import TE_OWN, te_collective_calls

    assert te_collective_calls(False, "cuda") == TE_OWN
    assert te_collective_calls(True, "cuda") == {"forward": {}, "backward": {}}


def test_te_matches_local_and_issues_no_collectives():
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    from megatron_bdlora.adapters import adapter_modules, global_adapter_state
    from megatron_bdlora.models.llama import forward_logits, lm_loss
    from megatron_bdlora.parallel import count_collectives

    hf = {**LLAMA_1B, "num_hidden_layers": 2}
    local, te = _pair(hf, _cfg())
    wrapped = adapter_modules(te)
    assert any(isinstance(m.base, TELayerNormColumnParallelLinear) for m in wrapped.values())
    assert all(m.base.parallel_mode is None for m in wrapped.values())  # TE's own TP comm off
    ids, labels = _batch(hf, 2, 256)
    out = {}
    for impl, model in zip(IMPLS, (local, te)):
        with count_collectives() as counts:
            logits = forward_logits(model, ids).float()
            loss, _ = lm_loss(model, ids, labels)
            loss.backward()
        out[impl] = (logits, global_adapter_state(model, lambda p: p.grad), counts.as_dict())
    (l_logits, l_grads, l_counts), (t_logits, t_grads, t_counts) = (out[i] for i in IMPLS)
    assert t_counts == l_counts == {}, t_counts  # TP=1: nothing at all, TE included
    err = (t_logits - l_logits).abs().max() / l_logits.abs().max()
    print(f"TE vs local logits: max rel err {err:.2e}")
    assert err < 3e-2
    for k, g in l_grads.items():
        cos = torch.nn.functional.cosine_similarity(t_grads[k].flatten(), g.flatten(), dim=0)
        assert g.abs().max() > 0 and cos > 0.99, (k, cos.item())


def test_tokens_per_second_te_vs_local():
    from megatron_bdlora.models.llama import lm_loss

    local, te = _pair(LLAMA_1B, _cfg())
    b, s = 2, 2048
    ids, labels = _batch(LLAMA_1B, b, s)
    rate = {}
    for impl, model in zip(IMPLS, (local, te)):
        for i in range(5):  # 2 warm-up steps, 3 timed
            if i == 2:
                torch.cuda.synchronize()
                start = time.perf_counter()
            loss, _ = lm_loss(model, ids, labels)
            loss.backward()
        torch.cuda.synchronize()
        rate[impl] = 3 * b * s / (time.perf_counter() - start)
    print(f"Llama-3.2-1B shape, bd r=16 N=2, bf16, {b}x{s} tokens: local {rate['local']:.0f} "
          f"tokens/s, TE {rate['transformer_engine']:.0f} tokens/s "
          f"({rate['transformer_engine'] / rate['local']:.2f}x)")
    assert all(r > 0 for r in rate.values())
