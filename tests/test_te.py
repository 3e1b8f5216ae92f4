"""Transformer Engine layers (`--transformer-impl transformer_engine`) on CPU: Megatron-Core's
own TE wrappers over a FAKE TE (tests/fake_te: real TE needs CUDA). tests/gpu/test_te_gpu.py runs
real TE.

One spawn per TP size (1, 2, 4) runs, with SP off and on: every strategy/layout on the TE spec
against the local spec (loss, adapter grads, embedding grad, collectives), the column layers'
input gradient against a dense reference, HF import/export, merge/unmerge, a multi-adapter batch,
LoRA dropout (TP-invariant, with and without recompute), bf16 and, at TP=2, adapter checkpoints
moving between TE and local layers.
"""

import dataclasses

import os
import subprocess
import sys

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import CONFIGS as CORE_CONFIGS, batch, layouts
from tests.reference import random_factors

from megatron_bdlora.adapters import AdapterConfig

CONFIGS = {**CORE_CONFIGS, "bd-partial": AdapterConfig(
    method="bdlora", rank=8, alpha=16, nblocks=4, target_modules=("linear_qkv", "linear_fc2"))}
IMPLS = ("local", "transformer_engine")
TP_SIZES = (1, 2, 4)
# SP off and on at TP=2; TP=4 runs SP on (the harder path) and, on local layers, only the base
# and one BD adapter: 4 ranks share 2 cores, and the file must stay well under a minute.
SP_RUNS = {1: (False,), 2: (False, True), 4: (True,)}
DROPOUT = dataclasses.replace(CORE_CONFIGS["bd-canonical"], dropout=0.1)
LOCAL_AT_TP4 = ("base", "bd-canonical")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(hf, sd, impl, sp, cfg=None, factors=None, **kw):
    from megatron_bdlora.adapters import apply_adapters, load_global_adapter_state
    from megatron_bdlora.checkpoint.hf_mapping import load_base_weights, tensor_reader
    from megatron_bdlora.models.llama import build_model
    from megatron_bdlora.parallel import tp_rank_size

    model = build_model(hf, tp=tp_rank_size()[1], init=False, sequence_parallel=sp,
                        transformer_impl=impl, **kw)
    load_base_weights(model, tensor_reader(sd), hf)
    if cfg is not None:
        apply_adapters(model, cfg)
        load_global_adapter_state(model, factors)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    model.embedding.word_embeddings.weight.requires_grad_(True)  # the backward runs to the bottom
    return model


def _column_input_grads(model, sp):
    """d/dx of sum(g * y) for layer 0's linear_qkv and linear_fc1 wrappers (full sequence), with
    the adapter and with its B factors zeroed (the base alone); x and g are the same at every TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    layer = model.decoder.layers[0]
    out = {}
    for name, mod in (("qkv", layer.self_attention.linear_qkv), ("fc1", layer.mlp.linear_fc1)):
        gen = torch.Generator().manual_seed(11)
        x_full = torch.randn(12, 2, mod.spec.in_features, generator=gen)
        g_full = torch.randn(12, 2, mod.spec.out_features, generator=gen)
        for tag in ("lora", "base"):
            x = (x_full.chunk(t)[rank] if sp else x_full).clone().requires_grad_(True)
            y, _ = mod(x)
            # this rank's output columns: whole query groups (qkv), [gate_i; up_i] (fc1)
            parts = g_full.chunk(1 if name == "qkv" else 2, -1)
            (y * torch.cat([g.chunk(t, -1)[rank] for g in parts], -1)).sum().backward()
            dx = x.grad
            if sp:
                dxs = [torch.empty_like(dx) for _ in range(t)]
                dist.all_gather(dxs, dx.contiguous(), group=ps.get_tensor_model_parallel_group())
                dx = torch.cat(dxs)
            out[f"{name}-{tag}"] = dx
            if t == 1 and tag == "lora":  # dense reference: RMSNorm, then W + ΔW on its output
                xr = x_full.clone().requires_grad_(True)
                base = mod.base
                ln = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + base.eps)
                ln = ln * base.layer_norm_weight
                (ln @ (base.weight + mod.local_delta()).t() * g_full).sum().backward()
                out[f"{name}-dense"] = xr.grad
            with torch.no_grad():  # then the base alone
                for p in mod.lora_B.values():
                    p.zero_()
    return out


def _worker(hf, sd, factors, ckpt_dir):
    from megatron_bdlora.adapters import global_adapter_state
    from megatron_bdlora.benchmarks.collectives import step_collectives
    from megatron_bdlora.checkpoint.hf_mapping import hf_state_from_model
    from megatron_bdlora.inference.multi_adapter import adapter_batch, load_adapter_stack
    from megatron_bdlora.models.llama import forward_logits, gather_logits
    from megatron_bdlora.parallel import tp_rank_size
    from tests.fake_te import install

    install()
    tp = tp_rank_size()[1]
    ids, labels = batch()
    vocab = hf["vocab_size"]
    out = {}
    for sp in SP_RUNS[tp]:
        for impl in IMPLS:
            _, counts = step_collectives(_model(hf, sd, impl, sp), ids, labels)
            out[(sp, impl, "base")] = {"counts": counts}
            for name, cfg in CONFIGS.items():
                if tp == 4 and impl == "local" and name not in LOCAL_AT_TP4:
                    continue
                model = _model(hf, sd, impl, sp, cfg, factors[name])
                loss, counts = step_collectives(model, ids, labels)
                out[(sp, impl, name)] = {
                    "loss": loss.item(), "counts": counts,
                    "grads": global_adapter_state(model, lambda p: p.grad),
                    "embedding_grad": model.embedding.word_embeddings.weight.grad.clone()}
        te = _model(hf, sd, "transformer_engine", sp, CONFIGS["bd-canonical"], factors["bd-canonical"])
        out[(sp, "input_grads")] = _column_input_grads(te, sp)
        if tp < 4:
            out.update(_dropout_runs(hf, sd, factors["bd-canonical"], sp, tp == 2 and sp))
    if tp == 2:
        out["bf16"] = _bf16_runs(hf, sd, factors["bd-canonical"])

    te = _model(hf, sd, "transformer_engine", False, CONFIGS["bd-fused"], factors["bd-fused"])
    out["te_names"] = sorted(n for n, _ in te.named_parameters())
    out["te_classes"] = sorted({f"{type(m.base).__module__}.{type(m.base).__name__}"
                                for m in te.modules() if hasattr(m, "base")})
    out["state_dict_keys"] = sorted(te.state_dict())
    out["hf_export"] = hf_state_from_model(te, hf)
    logits = gather_logits(forward_logits(te, ids), vocab).detach()
    weights = {n: p.detach().clone() for n, p in te.named_parameters() if ".base." in n}
    from megatron_bdlora.adapters import merge_adapters, unmerge_adapters

    merge_adapters(te)
    out["merged_logits"] = gather_logits(forward_logits(te, ids), vocab).detach()
    unmerge_adapters(te)
    out["unmerged_drift"] = max((p - weights[n]).abs().max().item()
                                for n, p in te.named_parameters() if ".base." in n)
    out["logits"] = logits
    # multi-adapter batch: row 0 uses bd-fused, row 1 a second adapter of the same layout
    second = {k: v * -0.5 for k, v in factors["bd-fused"].items()}
    load_adapter_stack(te, [factors["bd-fused"], second])
    with torch.no_grad(), adapter_batch(te, torch.tensor([0, 1])):
        out["multi_logits"] = gather_logits(forward_logits(te, ids), vocab)
    if tp == 1:
        out["layer_checks"] = _layer_checks()
    if tp == 2:
        out["cross_load"] = _cross_load(hf, sd, factors["bd-canonical"], ckpt_dir, ids)
        out["trainer"] = _train(ckpt_dir)  # last: the trainer re-initialises parallel state
    return out


def _dropout_runs(hf, sd, factors, sp, recompute):
    """One step with --lora-dropout 0.1 on local and TE layers (and, with `recompute`, full
    activation recompute on TE layers), each from the same RNG seeds: loss, adapter grads and the
    collectives."""
    from megatron_bdlora.adapters import global_adapter_state
    from megatron_bdlora.benchmarks.collectives import step_collectives
    from megatron_bdlora.parallel.cpu_compat import seed_model_parallel

    ids, labels = batch()
    runs = [(impl, False) for impl in IMPLS] + [("transformer_engine", True)] * recompute
    out = {}
    for impl, rc in runs:
        model = _model(hf, sd, impl, sp, DROPOUT, factors, recompute=rc)
        seed_model_parallel(1234)
        loss, counts = step_collectives(model, ids, labels)
        out[(sp, impl, "dropout", rc)] = {"loss": loss.item(), "counts": counts,
                                         "grads": global_adapter_state(model, lambda p: p.grad)}
    return out


def _bf16_runs(hf, sd, factors):
    """TE vs local layers in bf16 (TP=2, SP): the fake TE checks every TE parameter has the
    input's dtype, as TE does. Loss and adapter gradients (fp32)."""
    from megatron_bdlora.adapters import global_adapter_state
    from megatron_bdlora.models.llama import lm_loss

    ids, labels = batch()
    out = {}
    for impl in IMPLS:
        model = _model(hf, sd, impl, True, CONFIGS["bd-canonical"], factors, dtype=torch.bfloat16)
        loss, _ = lm_loss(model, ids, labels)
        loss.backward()
        out[impl] = (loss.item(), global_adapter_state(model, lambda p: p.grad))
    return out


def _train(work):
    """The trainer with --transformer-impl local and transformer_engine, TP=2 with SP: per-step
    losses and the saved adapters."""
    import json

    from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint
    from megatron_bdlora.training.arguments import parse_args
    from megatron_bdlora.training.trainer import train

    out = {}
    for impl in IMPLS:
        save = os.path.join(work, f"train-{impl}")
        data = os.path.join(work, "data")
        train(parse_args(["--model-preset", "tiny", "--tokenizer", os.path.join(data, "tokenizer"),
                          "--data-path", os.path.join(data, "train.jsonl"),
                          "--tensor-model-parallel-size", "2", "--sequence-parallel",
                          "--seq-length", "32", "--micro-batch-size", "4", "--train-iters", "2",
                          "--lr", "1e-2", "--save", save, "--log-interval", "1",
                          "--transformer-impl", impl]))
        with open(os.path.join(save, "metrics.jsonl")) as f:
            losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
        out[impl] = (losses, AdapterCheckpoint(save).tensors)
    return out


def _cross_load(hf, sd, factors, ckpt_dir, ids):
    """Adapter checkpoints saved from TE layers load on local layers and the reverse."""
    from megatron_bdlora.checkpoint.adapter_checkpoint import load_checkpoint, save_checkpoint
    from megatron_bdlora.models.llama import forward_logits, gather_logits

    cfg, vocab, out = CONFIGS["bd-canonical"], hf["vocab_size"], {}
    for src, dst in (("transformer_engine", "local"), ("local", "transformer_engine")):
        model = _model(hf, sd, src, False, cfg, factors)
        want = gather_logits(forward_logits(model, ids), vocab).detach()
        save_checkpoint(os.path.join(ckpt_dir, src), model, step=1)
        fresh = _model(hf, sd, dst, False)
        load_checkpoint(os.path.join(ckpt_dir, src), fresh)
        out[src] = (want, gather_logits(forward_logits(fresh, ids), vocab).detach())
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    hf, sd, _ = tiny_llama
    factors = {name: random_factors(layout, seed=i)
               for i, (name, layout) in enumerate(layouts(hf, CONFIGS).items())}
    from megatron_bdlora.data.synthetic import write_demo_data

    ckpt = str(tmp_path_factory.mktemp("te_ckpt"))
    write_demo_data(os.path.join(ckpt, "data"), 0, num_train=32, num_eval=8, num_pretrain=8)
    return hf, sd, factors, {tp: run_distributed(_worker, tp, tp, hf, sd, factors, ckpt)
                             for tp in TP_SIZES}


def _close(a, b, rtol=2e-5):
    return (a - b).abs().max() <= rtol * b.abs().max() + 1e-7


def _runs(results):
    return [(tp, sp) for tp in TP_SIZES for sp in SP_RUNS[tp]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_te_matches_local_spec(setup, name):
    """Loss, every adapter gradient and the embedding gradient (the input gradients of every
    layer, LoRA branches included) equal the local spec's, at TP 1/2/4, SP off and on; and the
    TP>1 runs equal TP=1's."""
    _, _, _, results = setup
    ref = results[1][0][(False, "local", name)]
    for tp, sp in _runs(results):
        # TP=4's four-way fp32 sums: S-LoRA's gradients differ from TP=1's by up to 2.6e-5 of
        # their largest entry, on local layers as on TE layers (the embedding's too)
        rtol = 5e-5 if tp == 4 else 2e-5
        for rank, r in enumerate(results[tp]):
            local, te = r.get((sp, "local", name)), r[(sp, "transformer_engine", name)]
            for got in (local, te) if local else (te,):
                assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (tp, sp)
                assert set(got["grads"]) == set(ref["grads"])
                for k, g in ref["grads"].items():
                    assert g.abs().max() > 0, k
                    assert _close(got["grads"][k], g, rtol), (tp, sp, k)
            ref_emb = (local["embedding_grad"] if local else  # this rank's vocabulary rows
                       results[1][0][(False, "local", name)]["embedding_grad"].chunk(tp)[rank])
            err = (te["embedding_grad"] - ref_emb).abs().max() / ref_emb.abs().max()
            assert _close(te["embedding_grad"], ref_emb, rtol), (tp, sp, err.item())


def _calls(counts, phase, op):
    return counts.get(phase, {}).get(op, {}).get("calls", 0)


def test_te_collectives(setup):
    """TE layers issue exactly the local layers' collectives (calls and bytes, forward and
    backward), for the base and every strategy; BD-LoRA issues exactly the base's."""
    hf, _, _, results = setup
    layers = hf["num_hidden_layers"]
    for tp, sp in _runs(results):
        if tp == 1:
            continue
        r = results[tp][0]
        base = r[(sp, "transformer_engine", "base")]["counts"]
        # TE's own communication really runs in the unadapted base: one all-gather (SP) or
        # all-reduce per column layer's backward, per row layer's forward
        op = "reduce_scatter" if sp else "all_reduce"
        assert _calls(base, "forward", op) >= 2 * layers
        for name in ("base", *CONFIGS):
            if (sp, "local", name) in r:
                assert r[(sp, "transformer_engine", name)]["counts"] == \
                    r[(sp, "local", name)]["counts"], (tp, sp, name)
        for name in ("bd-canonical", "bd-fused", "bd-partial"):
            assert r[(sp, "transformer_engine", name)]["counts"] == base, (tp, sp, name)


def test_lora_dropout_is_tp_invariant(setup):
    """--lora-dropout 0.1: TP=2 (SP off and on) equals TP=1 on local and TE layers (every TP rank
    applies TP=1's mask, adapters/dropout.py), full activation recompute redraws the same mask,
    dropout changes the step, and BD-LoRA's collectives stay the base's (no mask is shared)."""
    _, _, _, results = setup
    ref = results[1][0][(False, "local", "dropout", False)]
    no_dropout = results[1][0][(False, "local", "bd-canonical")]["loss"]
    assert abs(ref["loss"] - no_dropout) > 1e-4 * abs(no_dropout)
    for tp, sp in ((1, False), (2, False), (2, True)):
        for r in results[tp]:
            runs = {k: v for k, v in r.items() if k[:1] == (sp,) and k[2:3] == ("dropout",)}
            assert len(runs) == (3 if tp == 2 and sp else 2)
            for key, got in runs.items():
                assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (tp, key)
                for k, g in ref["grads"].items():
                    assert _close(got["grads"][k], g), (tp, key, k)
                if tp > 1 and not key[3]:  # (recompute repeats the forward's in backward)
                    assert got["counts"] == r[(sp, key[1], "base")]["counts"], (tp, key)


def test_te_bf16(setup):
    """bf16 (TP=2, SP): TE and local layers agree within bf16 rounding."""
    (l_loss, l_grads), (t_loss, t_grads) = (setup[3][2][0]["bf16"][impl] for impl in IMPLS)
    assert abs(t_loss - l_loss) <= 1e-2 * abs(l_loss), (t_loss, l_loss)
    for k, g in l_grads.items():
        cos = torch.nn.functional.cosine_similarity(t_grads[k].flatten(), g.flatten(), dim=0)
        assert g.abs().max() > 0 and cos > 0.99, (k, cos.item())


def test_column_input_grad_includes_lora(setup):
    """Under SP the column layer's norm runs after our one all-gather, inside TE: its input
    gradient carries the LoRA branch's part (summed before the one reduce-scatter)."""
    _, _, _, results = setup
    ref = results[1][0][(False, "input_grads")]
    for name in ("qkv", "fc1"):
        assert _close(ref[f"{name}-lora"], ref[f"{name}-dense"]), name
        lora_part = ref[f"{name}-lora"] - ref[f"{name}-base"]
        assert lora_part.abs().max() > 0.05 * ref[f"{name}-lora"].abs().max(), name
        for tp, sp in _runs(results):
            for r in results[tp]:
                got = r[(sp, "input_grads")]
                assert _close(got[f"{name}-lora"], ref[f"{name}-lora"]), (tp, sp, name)
                assert _close(got[f"{name}-base"], ref[f"{name}-base"]), (tp, sp, name)


def test_hf_import_export_merge_multi(setup):
    hf, sd, factors, results = setup
    ref = results[1][0]
    for tp in TP_SIZES:
        r = results[tp][0]
        ext = "megatron.core.extensions.transformer_engine"  # Megatron-Core's wrappers, fake TE
        assert r["te_classes"] == [f"{ext}.TELayerNormColumnParallelLinear",
                                   f"{ext}.TERowParallelLinear"]
        assert "decoder.layers.0.self_attention.linear_qkv.base.layer_norm_weight" in r["te_names"]
        assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in r["te_names"])
        assert any(k.endswith("linear_qkv.base._extra_state") for k in r["state_dict_keys"])
        # HF import -> TE layout -> HF export is the identity (no _extra_state, norms back in place)
        assert r["hf_export"].keys() == {k for k in sd if k != "lm_head.weight" or
                                         not hf.get("tie_word_embeddings")}
        for k, v in r["hf_export"].items():
            assert torch.equal(v, sd[k].float()), (tp, k)
        assert _close(r["logits"], ref["logits"]), tp
        assert _close(r["merged_logits"], r["logits"]), tp
        assert r["unmerged_drift"] <= 1e-6
        # multi-adapter batch: row 0 is the single-adapter run's row 0
        assert _close(r["multi_logits"][0], r["logits"][0]), tp
        assert not _close(r["multi_logits"][1], r["logits"][1]), tp


def test_adapter_checkpoints_move_between_te_and_local(setup):
    _, _, _, results = setup
    for src, (want, got) in results[2][0]["cross_load"].items():
        assert _close(got, want), src


def test_trainer_runs_te_layers(setup):
    """--transformer-impl transformer_engine through the trainer (TP=2, SP): the same losses and
    the same trained adapter as local layers."""
    run = setup[3][2][0]["trainer"]
    (local_losses, local_ckpt), (te_losses, te_ckpt) = run["local"], run["transformer_engine"]
    assert len(local_losses) == 2
    for a, b in zip(local_losses, te_losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (local_losses, te_losses)
    assert local_ckpt.keys() == te_ckpt.keys()
    for k, v in local_ckpt.items():
        # 1e-4: Adam's first steps scale each update by 1/sqrt(v), so an element whose gradient
        # is near zero carries the two layer kinds' fp32 rounding difference into the weights
        assert _close(te_ckpt[k], v, rtol=1e-4), k


def test_te_flag_refused_without_te_in_one_line():
    from megatron_bdlora.errors import InputError
    from megatron_bdlora.te import guard
    from megatron_bdlora.training.arguments import parse_args

    assert guard.probe() == "absent" and not guard._injected  # this machine: no TE
    with pytest.raises(InputError) as e:
        parse_args(["--model-preset", "tiny", "--data-path", __file__,
                    "--transformer-impl", "transformer_engine"])
    assert "megatron-bdlora[gpu]" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="not installed"):
        guard.layer_classes()
    # the done-when command's tool: one line from rank 0, nothing from rank 1, exit status 2
    tool = os.path.join(ROOT, "tools", "collective_table.py")
    for rank in (0, 1):
        run = subprocess.run([sys.executable, tool, "--transformer-impl", "transformer_engine",
                              "--sequence-parallel"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "WORLD_SIZE": "2", "RANK": str(rank)})
        assert run.returncode == 2 and run.stdout == ""
        lines = run.stderr.strip().splitlines()
        assert lines == ([f"collective_table.py: error: {e.value}"] if rank == 0 else []), lines


def _layer_checks():
    """Megatron-Core's TE wrappers (over the fake TE) under AdapterLinear: TE's returned bias
    comes back as the bias, not added; a fused row bias and the config real TE is not checked
    under are refused; TE's collectives with and without the take-over (tests/te_checks.py)."""
    from megatron.core.extensions.transformer_engine import (TELayerNormColumnParallelLinear,
                                                             TERowParallelLinear)
    from megatron.core.transformer import TransformerConfig

    from megatron_bdlora.adapters.layers import AdapterLinear
    from megatron_bdlora.adapters.layer_types import TargetSpec
    from megatron_bdlora.te.adapter import REFUSED
    from tests.te_checks import te_collective_calls

    def config(**kw):
        return TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                 normalization="RMSNorm", use_cpu_initialization=True, **kw)

    def wrap(layer, kind):
        spec = TargetSpec(kind, 16, (("o_proj" if kind == "row" else "up_proj", 16),))
        return AdapterLinear(layer, spec, CONFIGS["bd-fused"], f"layer.{kind}", 0, 1)

    def refusal(make):
        try:
            make()
        except ValueError as e:
            return type(e).__name__, str(e)

    def row(cfg, **kw):
        return TERowParallelLinear(16, 16, config=cfg, init_method=torch.nn.init.normal_,
                                   input_is_parallel=True, is_expert=False, **kw)

    def column(cfg, **kw):
        return TELayerNormColumnParallelLinear(16, 16, config=cfg, init_method=torch.nn.init.normal_,
                                               gather_output=False, is_expert=False, **kw)

    out = {"fused_row_bias": refusal(lambda: wrap(row(config(), bias=True, skip_bias_add=False),
                                                  "row"))}
    for flag in REFUSED:  # set after construction: the fake TE mirrors none of these
        cfg = config()
        layer = column(cfg, bias=False, skip_bias_add=True)
        setattr(cfg, flag, True)
        out[flag] = refusal(lambda: wrap(layer, "column"))
    layer = column(config(), bias=True, skip_bias_add=True)
    with torch.no_grad():
        layer.bias.normal_()
    adapted = wrap(layer, "column")
    x = torch.randn(3, 2, 16)
    y, bias = adapted(x)
    ln = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.eps)  # norm weight ones
    out["returned_bias"] = (bias is layer.bias, (y - ln @ layer.weight.t()).abs().max().item())
    out["collectives"] = {take: te_collective_calls(take) for take in (False, True)}
    return out


def test_te_bias_return_and_refusals(setup):
    checks = setup[3][1][0]["layer_checks"]
    from megatron_bdlora.te.adapter import REFUSED

    for flag in REFUSED:
        kind, msg = checks[flag]
        assert kind == "InputError" and flag in msg and "\n" not in msg, (flag, msg)
    assert checks["fused_row_bias"] == (
        "ValueError", "layer.row: row-parallel layer with a fused bias is not supported")
    is_param, err = checks["returned_bias"]
    assert is_param and err < 1e-5  # returned to the caller (bias-dropout-add), not added


def test_take_over_leaves_te_no_collective(setup):
    """TE's own collectives (patched to record calls): the expected ones without the take-over,
    none with it. tests/gpu/test_te_gpu.py runs the same check on real TE."""
    from tests.te_checks import TE_OWN

    calls = setup[3][1][0]["layer_checks"]["collectives"]
    assert calls[False] == TE_OWN
    assert calls[True] == {"forward": {}, "backward": {}}


BROKEN_TE = '''raise RuntimeError("libcudart.so.12: cannot open shared object file")\n'''


def test_broken_te_leaves_local_working(tmp_path):
    """A TE whose import raises RuntimeError (as TE does without its CUDA libraries; reproduced by
    a package that only raises) takes Megatron-Core's import down, unless megatron_bdlora is
    imported first: then one line says so, GPTModel imports and the TE flag is refused."""
    (tmp_path / "transformer_engine").mkdir()
    (tmp_path / "transformer_engine" / "__init__.py").write_text(BROKEN_TE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "RANK": "0"}
    premise = subprocess.run([sys.executable, "-c", "from megatron.core.models.gpt import GPTModel"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert premise.returncode != 0 and "RuntimeError: libcudart" in premise.stderr
    code = ("import megatron_bdlora\n"
            "from megatron.core.models.gpt import GPTModel\n"
            "from megatron_bdlora.models.llama import build_model\n"
            "from megatron_bdlora.te.guard import require_te\n"
            "try:\n    require_te()\nexcept ValueError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert [ln for ln in run.stderr.splitlines() if "Transformer Engine" in ln] == [
        "megatron-bdlora: Transformer Engine is installed but fails to import (RuntimeError: "
        "libcudart.so.12: cannot open shared object file); --transformer-impl local still works"]
    assert run.stdout.strip().startswith("--transformer-impl transformer_engine: Transformer "
                                         "Engine is installed but fails to import")
