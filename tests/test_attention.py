"""Attention backends: SDPA (models/attention.py) vs Megatron's local DotProductAttention vs
transformers, unpacked and packed rows, GQA, TP=1 and TP=2; what reaches the attention module in
training; KV-cached generation (left padding, multi-adapter) with SDPA equals local.

One spawn per TP size computes everything (starting ranks costs seconds).
"""

import pytest
import torch

from tests.dist_utils import run_distributed

from megatron_bdlora.adapters import AdapterConfig

DOCS = [7, 5, 4]  # a packed row of three documents, then padding
SEQ = 20
NEW_TOKENS = 4


def _rows(gen, vocab):
    """An unpacked batch (one document per row, right padding) and a packed one, as make_row."""
    from megatron_bdlora.data import collate, make_row

    docs = [torch.randint(2, vocab, (n,), generator=gen) for n in DOCS]
    one = lambda d: (d.numpy(), torch.ones(len(d)).numpy())  # noqa: E731
    unpacked = collate([make_row([one(d)], SEQ, 0) for d in docs[:2]])
    packed = collate([make_row([one(d) for d in docs], SEQ, 0),
                      make_row([one(docs[2]), one(docs[0])], SEQ, 0)])
    return docs, unpacked, packed


def _worker(hf, sd):
    from megatron_bdlora.adapters import apply_adapters, global_adapter_layout
    from megatron_bdlora.benchmarks.timing import random_adapter_states
    from megatron_bdlora.checkpoint.hf_mapping import load_base_weights, tensor_reader
    from megatron_bdlora.inference import adapter_batch, greedy_generate, load_adapter_stack
    from megatron_bdlora.models.attention import SDPAttention
    from megatron_bdlora.models.llama import build_model, forward_logits, gather_logits, lm_loss
    from megatron_bdlora.parallel import tp_rank_size
    from megatron_bdlora.training.engine import attention_mask, device_batch

    def _to_device(batch):  # a loader batch as the trainer's step runs it: (ids, labels, mask)
        ids, labels, docs = device_batch(batch)
        return ids, labels, attention_mask(docs, ids.device)

    tp = tp_rank_size()[1]
    vocab = hf["vocab_size"]
    docs, unpacked, packed = _rows(torch.Generator().manual_seed(5), vocab)
    gen = torch.Generator().manual_seed(6)
    prompts = torch.randint(2, vocab, (3, 8), generator=gen)
    lengths = torch.tensor([8, 3, 6])
    for i, n in enumerate(lengths.tolist()):
        prompts[i, :8 - n] = 0
    cfg = AdapterConfig(method="bdlora", rank=4, alpha=8, nblocks=2)
    out, cores = {}, {}
    for backend in ("sdpa", "local"):
        model = build_model(hf, tp=tp, init=False, attention_backend=backend)
        load_base_weights(model, tensor_reader(sd), hf)
        apply_adapters(model, cfg)  # B = 0: the base model's logits
        logits = lambda ids, mask=None: gather_logits(forward_logits(model, ids, mask), vocab)  # noqa
        seen = []  # (attention_mask, attn_mask_type) of every core-attention call
        for layer in model.decoder.layers:
            core = layer.self_attention.core_attention
            assert isinstance(core, SDPAttention) == (backend == "sdpa")
            core.register_forward_pre_hook(
                lambda m, a, kw: seen.append((a[3], kw.get("attn_mask_type"))), with_kwargs=True)
        r = out[backend] = {}
        with torch.no_grad():
            r["alone"] = [logits(d[None])[0] for d in docs]
            for name, batch in (("unpacked", unpacked), ("packed", packed)):
                seen.clear()
                ids, labels, mask = _to_device(batch)
                r[name] = logits(ids, mask)
                r[f"{name}-masks"] = [None if m is None else tuple(m.shape) for m, _ in seen]
        # what reaches attention in a training step (forward and backward) on unpacked rows
        model.train()
        seen.clear()
        ids, labels, mask = _to_device(unpacked)
        loss, _ = lm_loss(model, ids, labels, mask)
        loss.backward()
        r["train-masks"] = [m for m, _ in seen]
        r["train-loss"] = loss.item()
        # generation: left padding + KV cache, and per-request adapters; then an unpadded batch
        model.eval()
        load_adapter_stack(model, random_adapter_states(global_adapter_layout(model), 2, 3, 0.3))
        with adapter_batch(model, torch.tensor([1, 0, 1])):
            r["gen-padded"] = greedy_generate(model, prompts, NEW_TOKENS, lengths=lengths,
                                              return_logits=True)
            seen.clear()
            r["gen-unpadded"] = greedy_generate(model, prompts[:, 5:], NEW_TOKENS,
                                                return_logits=True)
            r["gen-unpadded-masks"] = [m for m, _ in seen]
        cores[backend] = model.decoder.layers[0].self_attention.core_attention
    from megatron.core.transformer.enums import AttnMaskType

    heads, groups = hf["num_attention_heads"] // tp, hf["num_key_value_heads"] // tp
    q = torch.randn(3, 2, heads, 8, generator=gen)
    k, v = (torch.randn(7, 2, groups, 8, generator=gen) for _ in range(2))
    lower_right = torch.ones(3, 7, dtype=torch.bool).triu(diagonal=7 - 3 + 1)  # True = masked
    out["chunk"] = {
        "sdpa": cores["sdpa"](q, k, v, None, attn_mask_type=AttnMaskType.causal),
        "local": cores["local"](q, k, v, lower_right, attn_mask_type=AttnMaskType.causal)}
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def results(request, tiny_llama):
    hf, sd, hf_model = tiny_llama
    assert hf["num_key_value_heads"] < hf["num_attention_heads"]  # GQA on every TP rank
    docs, unpacked, _ = _rows(torch.Generator().manual_seed(5), hf["vocab_size"])
    with torch.no_grad():
        ref = [hf_model(d[None]).logits[0] for d in docs]
    tp = request.param
    return tp, ref, run_distributed(_worker, tp, tp, hf, sd)


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("backend", ["sdpa", "local"])
def test_logits_equal_transformers_unpacked_and_packed(results, backend):
    _, ref, ranks = results
    for r in ranks:
        r = r[backend]
        for d, n in enumerate(DOCS):
            assert _close(r["alone"][d], ref[d])
        # unpacked: one document per right-padded row, no mask at all
        for row in range(2):
            assert _close(r["unpacked"][row, :DOCS[row]], ref[row])
        # packed: every document of a row equals that document run alone
        start = 0
        for d, n in enumerate(DOCS):
            assert _close(r["packed"][0, start:start + n], ref[d])
            start += n
        assert _close(r["packed"][1, :DOCS[2]], ref[2])
        assert _close(r["packed"][1, DOCS[2]:DOCS[2] + DOCS[0]], ref[0])


def test_sdpa_equals_local(results):
    for r in results[2]:
        for key in ("unpacked", "packed"):
            assert _close(r["sdpa"][key], r["local"][key])
        assert abs(r["sdpa"]["train-loss"] - r["local"]["train-loss"]) <= 1e-5 * r["local"]["train-loss"]


def test_no_dense_mask_for_unpacked_rows(results):
    layers = 2
    for r in results[2]:
        for backend in ("sdpa", "local"):
            assert r[backend]["unpacked-masks"] == [None] * layers
            assert r[backend]["train-masks"] == [None] * layers
            assert r[backend]["packed-masks"] == [(2, 1, SEQ, SEQ)] * layers
        # an unpadded generation batch builds no mask either, prefill or decode
        assert r["sdpa"]["gen-unpadded-masks"] == [None] * layers * NEW_TOKENS


@pytest.mark.parametrize("batch", ["gen-padded", "gen-unpadded"])
def test_generation_sdpa_equals_local(results, batch):
    for r in results[2]:
        (tok_s, log_s), (tok_l, log_l) = r["sdpa"][batch], r["local"][batch]
        assert tok_s == tok_l
        assert log_s.shape == (3, NEW_TOKENS, 512)
        assert _close(log_s, log_l)
    # the padded request with 3 real tokens = that row of the unpadded batch (RoPE is relative)
    r = results[2][0]["sdpa"]
    assert r["gen-padded"][0][1] == r["gen-unpadded"][0][1]
    assert _close(r["gen-padded"][1][1], r["gen-unpadded"][1][1])


def test_causal_chunk_after_cached_keys(results):
    """No mask, causal, 3 queries after 4 cached keys: query i sees keys up to 4 + i."""
    for r in results[2]:
        assert _close(r["chunk"]["sdpa"], r["chunk"]["local"])


def test_benchmark_script_smoke(torchrun_tool):
    out = torchrun_tool("benchmark_attention.py", 2)
    r = out["results"]
    assert set(r) == {"sdpa", "local", "sdpa+sp", "local+sp"}
    losses = [v["first_step_loss"] for v in r.values()]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])  # the same model four ways
    # local keeps the (b, heads/t, s, s) probabilities for backward; SP splits the norms' inputs
    assert r["local"]["activation_mib_max_rank"] > r["sdpa"]["activation_mib_max_rank"]
    assert r["sdpa+sp"]["activation_mib_max_rank"] < r["sdpa"]["activation_mib_max_rank"]
    assert all(v["peak_step_mib_max_rank"] > 0 and v["steps_timed"] == 1 for v in r.values())
