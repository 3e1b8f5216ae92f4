"""Targets by HF projection (q_proj, v_proj, ...): a packed module adapted in part.

Training at TP=1/2/4 against the dense transformers oracle (loss and every factor gradient), all
three strategies; BD's collectives equal the base's; merge, multi-adapter batches, checkpoints
(saved at TP=2, loaded at TP=1 and 4) and exports (PEFT dense / BD, merged HF, vLLM) of a
partial adapter reproduce its logits; parameter counts (against PEFT's own) and rank matching
follow the targets.
"""

import json
import os

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import batch, layouts, megatron_model, step
from tests.reference import random_factors, reference_loss_and_grads, tiny_hf

from megatron_bdlora.adapters import AdapterConfig, adapter_params, match_bd_rank

QV = ("q_proj", "v_proj")
CONFIGS = {
    "bd": AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=4, target_modules=QV),
    "slora": AdapterConfig(method="lora", rank=4, alpha=8, sharding="slora", target_modules=QV),
    "replicated": AdapterConfig(method="lora", rank=4, alpha=8, sharding="replicated",
                                target_modules=QV),
    # a partial linear_fc1 and a row layer, by HF name
    "bd-k-up-o": AdapterConfig(method="bdlora", rank=8, alpha=16, nblocks=2,
                               target_modules=("k_proj", "up_proj", "o_proj")),
}


def _worker(hf, sd, factors, ckpt_root):
    from megatron_bdlora.adapters import (global_adapter_state, load_global_adapter_state,
                                          merge_adapters, trainable_param_count)
    from megatron_bdlora.checkpoint.adapter_checkpoint import load_checkpoint, save_checkpoint
    from megatron_bdlora.inference import adapter_batch, load_adapter_stack
    from megatron_bdlora.models.llama import forward_logits, gather_logits
    from megatron_bdlora.parallel import count_collectives, tp_rank_size

    def logits(model, ids):
        with torch.no_grad():
            return gather_logits(forward_logits(model, ids), hf["vocab_size"])

    ids, labels = batch()
    tp = tp_rank_size()[1]
    base = megatron_model(hf, sd)
    base.embedding.word_embeddings.weight.requires_grad_(True)
    with count_collectives() as c:
        step(base, ids, labels, c)
    out = {"base_counts": c.as_dict()}
    for name, cfg in CONFIGS.items():
        if cfg.strategy == "bd" and cfg.nblocks % tp:
            continue
        model = megatron_model(hf, sd, cfg)
        load_global_adapter_state(model, factors[name])
        model.embedding.word_embeddings.weight.requires_grad_(True)
        with count_collectives() as c:
            loss = step(model, ids, labels, c)
        r = {"loss": loss.item(), "counts": c.as_dict(),
             "grads": global_adapter_state(model, lambda p: p.grad),
             "trainable": trainable_param_count(model) - model.embedding.word_embeddings.weight.numel()}
        saved = os.path.join(ckpt_root, name)
        if tp != 2 and os.path.isdir(saved):  # the TP=2 checkpoint, loaded at this TP
            fresh = megatron_model(hf, sd)
            load_checkpoint(saved, fresh)
            r["loaded_logits"] = logits(fresh, ids)
        if tp == 2:
            r["logits"] = logits(model, ids)
            # two adapters per batch: request 0 uses this one, request 1 a zero adapter
            zero = {k: torch.zeros_like(v) for k, v in factors[name].items()}
            load_adapter_stack(model, [factors[name], zero])
            with adapter_batch(model, torch.tensor([0, 1])):
                r["multi"] = logits(model, ids)
            r["base_logits"] = logits(base, ids)
            save_checkpoint(os.path.join(ckpt_root, name), model, extra_state={"step": 1})
            merge_adapters(model)
            r["merged"] = logits(model, ids)
        out[name] = r
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama, together):
    hf, sd, hf_model = tiny_llama
    root = tmp_path_factory.mktemp("partial")
    base_dir = str(root / "base")
    hf_model.save_pretrained(base_dir)
    factors = {n: random_factors(lay, seed=i) for i, (n, lay) in enumerate(layouts(hf, CONFIGS).items())}
    def run(tp):
        return run_distributed(_worker, tp, tp, hf, sd, factors, str(root / "ckpt"))[0]

    results = {2: run(2)}  # first: it saves the checkpoints the others load
    results[1], results[4] = together(lambda: run(1), lambda: run(4))
    return hf, sd, hf_model, factors, results, base_dir, str(root / "ckpt")


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_matches_dense_oracle(setup, name, tp):
    hf, sd, hf_model, factors, results, *_ = setup
    if name not in results[tp]:
        pytest.skip(f"TP={tp} does not divide N={CONFIGS[name].nblocks}")
    ids, labels = batch()
    ref_loss, _, ref_grads = reference_loss_and_grads(hf_model, sd, factors[name], CONFIGS[name],
                                                      ids, labels)
    r = results[tp][name]
    assert abs(r["loss"] - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert set(r["grads"]) == set(ref_grads)
    assert not any("k_proj" in k for k in r["grads"]) or name == "bd-k-up-o"
    for k, g in ref_grads.items():
        assert g.abs().max() > 0 and (r["grads"][k] - g).abs().max() <= 2e-5 * g.abs().max() + 1e-7, k


@pytest.mark.parametrize("tp", [2, 4])
def test_bd_collectives_equal_base(setup, tp):
    *_, results, _, _ = setup
    assert results[tp]["bd"]["counts"] == results[tp]["base_counts"]  # calls and bytes, fwd + bwd


def test_counts_follow_targets(setup):
    from peft import LoraConfig, get_peft_model

    hf, *_, results, _, _ = setup
    for name, cfg in CONFIGS.items():
        assert results[1][name]["trainable"] == adapter_params(hf, cfg)
        if cfg.strategy == "bd":  # each BD parameter lives on one TP rank
            assert results[2][name]["trainable"] * 2 == adapter_params(hf, cfg)
    _, _, peft_base = tiny_hf()
    peft = get_peft_model(peft_base, LoraConfig(r=4, target_modules=list(QV)))
    assert adapter_params(hf, CONFIGS["slora"]) == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    # rank matching on the partial targets: the largest BD rank not above LoRA's count
    lora = AdapterConfig(method="lora", rank=4, target_modules=QV)
    rank = match_bd_rank(hf, lora, 4)
    bd = [adapter_params(hf, AdapterConfig(rank=k, nblocks=4, target_modules=QV)) for k in (rank, rank + 4)]
    assert bd[0] <= adapter_params(hf, lora) < bd[1]
    assert adapter_params(hf, lora) < adapter_params(hf, AdapterConfig(method="lora", rank=4))


def test_merge_and_multi_adapter(setup):
    *_, results, _, _ = setup
    for name, r in results[2].items():
        if name == "base_counts":
            continue
        assert torch.allclose(r["merged"], r["logits"], rtol=1e-5, atol=1e-5), name
        assert torch.allclose(r["multi"][0], r["logits"][0], rtol=1e-5, atol=1e-5), name
        assert torch.allclose(r["multi"][1], r["base_logits"][1], rtol=1e-5, atol=1e-5), name
        assert not torch.allclose(r["logits"], r["base_logits"], atol=1e-3), name


def test_checkpoint_loads_at_other_tp(setup):
    *_, results, _, _ = setup
    loaded = 0
    for tp in (1, 4):
        for name, r in results[tp].items():
            if name != "base_counts" and "loaded_logits" in r:
                ours = results[2][name]["logits"]
                assert (r["loaded_logits"] - ours).abs().max() <= 1e-5 * ours.abs().max(), (tp, name)
                loaded += 1
    assert loaded >= 6  # bd and both LoRA shardings at TP=1 and 4, bd-k-up-o at TP=1


def test_exports_reproduce_logits(setup, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from megatron_bdlora.checkpoint.export import export

    *_, results, base_dir, ckpt_root = setup
    ids, _ = batch()
    for name in ("bd", "slora"):
        cfg, ours = CONFIGS[name], results[2][name]["logits"]
        formats = ("hf-peft", "hf-merged", "vllm") + (("hf-peft-bd",) if cfg.strategy == "bd" else ())
        for fmt in formats:
            out = str(tmp_path / f"{name}-{fmt}")
            export(os.path.join(ckpt_root, name), fmt, out, hf_checkpoint=base_dir)
            model = LlamaForCausalLM.from_pretrained(base_dir if fmt != "hf-merged" else out,
                                                     dtype=torch.float32)
            if fmt != "hf-merged":
                adapter_cfg = json.load(open(os.path.join(out, "adapter_config.json")))
                assert adapter_cfg["target_modules"] == list(QV), fmt
                model = PeftModel.from_pretrained(model, out)
            with torch.no_grad():
                got = model.eval()(ids).logits
            assert (got - ours).abs().max() <= 1e-5 * max(1.0, ours.abs().max().item()), (name, fmt)


def test_config_normalises_targets():
    full = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    assert AdapterConfig().target_modules == full  # older checkpoints' form
    hf_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert AdapterConfig(target_modules=hf_names).target_modules == full
    cfg = AdapterConfig(target_modules=("v_proj", "q_proj", "linear_fc2", "o_proj"))
    assert cfg.target_modules == ("q_proj", "v_proj", "linear_proj", "linear_fc2")
    assert cfg.modules == ("linear_qkv", "linear_proj", "linear_fc2")
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="fused layout .* use --lora-layout canonical") as e:
        AdapterConfig(layout="fused", target_modules=QV)
    assert "\n" not in str(e.value)
    AdapterConfig(layout="fused", target_modules=("q_proj", "k_proj", "v_proj"))  # whole module
    with pytest.raises(ValueError, match="unknown target modules"):
        AdapterConfig(target_modules=("qproj",))
