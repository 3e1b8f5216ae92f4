"""Checkpoints: HF import, TP-independent adapter checkpoints, exports (PEFT dense / BD, merged,
vLLM) checked against transformers + PEFT, and one-line errors for bad input.

Three spawned runs (TP=2, then TP=1 and TP=4) do all the distributed work; exports and the
transformers/PEFT references run in this process. `pytest -s` prints the measured differences.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 500  # pads to 512 in Megatron: the padding is exercised
SEQ = 12
RTOL = 1e-5

# name -> AdapterConfig kwargs; all on the 4-KV-head model
ADAPTERS = {
    "bd2": dict(method="bdlora", rank=8, nblocks=2, alpha=16.0,
                target_modules=("linear_qkv", "linear_fc2")),
    "bd4": dict(method="bdlora", rank=8, nblocks=4, alpha=12.0),
    "bd4_fused": dict(method="bdlora", rank=8, nblocks=4, alpha=16.0, layout="fused"),
    "bd2_fused_rs": dict(method="bdlora", rank=4, nblocks=2, alpha=4.0, layout="fused", rslora=True),
    # rank 6: S-LoRA at TP=4 cannot split it; load_checkpoint then runs it replicated
    "slora": dict(method="lora", rank=6, alpha=16.0, sharding="slora"),
    "replicated": dict(method="lora", rank=5, alpha=8.0, sharding="replicated", layout="fused",
                       rslora=True),
}


# ---- helpers that run on spawned ranks (module level: picklable) ----------------------------------
def _ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))


def _logits(model):
    from megatron_bdlora.models.llama import forward_logits, gather_logits

    with torch.no_grad():
        return gather_logits(forward_logits(model.eval(), _ids()), model.info.hf_config["vocab_size"]).clone()


def _random_factors(model, seed):
    from megatron_bdlora.adapters import adapter_modules

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in sorted(adapter_modules(model).items()):
        for k, (shape, _, _) in sorted(m.global_layout().items()):
            out[f"{n}.{k}"] = torch.randn(shape, generator=gen) * 0.3
    return out


def _err(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        return f"{type(e).__name__}: {e}"
    return None


def _run_tp2(dirs, ckpt_root):
    """TP=2: base logits of both models; each adapter with random factors -> logits + checkpoint."""
    import torch.distributed as dist

    from megatron_bdlora.adapters import AdapterConfig, apply_adapters, load_global_adapter_state
    from megatron_bdlora.checkpoint.adapter_checkpoint import save_checkpoint
    from megatron_bdlora.checkpoint.hf_import import load_hf_llama

    out = {"base": {k: _logits(load_hf_llama(d, tp=2)) for k, d in dirs.items()}, "adapters": {}}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        model = load_hf_llama(dirs["kv4"], tp=2)
        apply_adapters(model, AdapterConfig(**kw))
        factors = _random_factors(model, seed=100 + i)
        load_global_adapter_state(model, factors)
        out["adapters"][name] = _logits(model)
        extra = {"step": 7, "rng": {"torch": torch.get_rng_state()}, "data": {"epoch": 1, "offset": 123},
                 "scheduler": {"last_epoch": 7, "base_lrs": [1e-3]}}
        opt = {f"{k}.exp_avg": v * 0.5 for k, v in factors.items()} if name == "bd4" else None
        save_checkpoint(os.path.join(ckpt_root, name), model, extra_state=extra,
                        run_config={"lr": 1e-3, "tp": 2, "name": name}, optimizer_tensors=opt,
                        optimizer_meta={"type": "adamw", "betas": [0.9, 0.999]} if opt else None)
        if name == "bd4":
            out["bd4_factors"] = factors
            out["bd4_rng"] = extra["rng"]["torch"]
    dist.barrier()
    return out if dist.get_rank() == 0 else None


def _run_tp1(dirs, ckpt_root, scratch):
    """TP=1: base logits; every checkpoint loaded at TP=1; atomic-save behaviour; load errors."""
    from megatron_bdlora.adapters import AdapterConfig, apply_adapters
    from megatron_bdlora.checkpoint import adapter_checkpoint as ac
    from megatron_bdlora.checkpoint.hf_import import load_hf_llama

    out = {"base": {k: _logits(load_hf_llama(d, tp=1)) for k, d in dirs.items()}, "adapters": {}}
    for name in ADAPTERS:
        model = load_hf_llama(dirs["kv4"])
        info = ac.load_checkpoint(os.path.join(ckpt_root, name), model)
        out["adapters"][name] = _logits(model)
        if name == "bd4":
            out["bd4_info"] = {k: getattr(info, k) for k in ("step", "extra_state", "optimizer_tensors",
                                                    "optimizer_meta", "run_config")}

    # atomic saves: keep-last-K, a crash mid-save keeps the previous checkpoint and `latest`
    root = os.path.join(scratch, "atomic")
    model = load_hf_llama(dirs["kv4"])
    apply_adapters(model, AdapterConfig(method="bdlora", rank=4, nblocks=2))
    for step in (1, 2, 3):
        ac.save_checkpoint(root, model, extra_state={"step": step}, keep_last=2)
    out["after_keep2"] = sorted(os.listdir(root))
    import safetensors.torch as st

    real_save, calls = st.save_file, []

    def crashing_save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated crash: disk full")
        return real_save(*a, **k)

    st.save_file = crashing_save
    try:
        out["crash_err"] = _err(ac.save_checkpoint, root, model, extra_state={"step": 4, "t": torch.ones(2)})
    finally:
        st.save_file = real_save
    # a save killed hard leaves a temp dir behind; the next save removes it
    os.makedirs(os.path.join(root, ".tmp-step_00000009-999999999"))
    out["after_crash"] = sorted(os.listdir(root))
    with open(os.path.join(root, "latest")) as f:
        out["latest_after_crash"] = f.read().strip()
    out["resolved_after_crash"] = os.path.basename(ac.resolve_checkpoint_dir(root))
    ac.save_checkpoint(root, model, extra_state={"step": 5}, keep_last=2)
    out["after_resave"] = sorted(os.listdir(root))

    # a big-rank LoRA for the vLLM rank check (rank 1024 > 512)
    big = load_hf_llama(dirs["kv4"])
    apply_adapters(big, AdapterConfig(method="lora", rank=1024, alpha=16, target_modules=("linear_proj",)))
    ac.save_checkpoint(os.path.join(scratch, "big"), big, extra_state={"step": 1})

    # load errors, each one line
    errs = {}
    m = load_hf_llama(dirs["kv4"])
    apply_adapters(m, AdapterConfig(method="bdlora", rank=4, nblocks=2, alpha=16.0))
    errs["rank_mismatch"] = _err(ac.load_checkpoint, os.path.join(ckpt_root, "bd2"), m)
    errs["base_mismatch"] = _err(ac.load_checkpoint, os.path.join(ckpt_root, "bd4"), load_hf_llama(dirs["kv2"]))
    broken = os.path.join(scratch, "broken")
    shutil.copytree(os.path.join(ckpt_root, "bd4"), broken)
    step_dir = ac.resolve_checkpoint_dir(broken)
    os.remove(os.path.join(step_dir, "adapter.safetensors"))
    errs["missing_file"] = _err(ac.load_checkpoint, broken, load_hf_llama(dirs["kv4"]))
    errs["no_checkpoint"] = _err(ac.load_checkpoint, scratch, load_hf_llama(dirs["kv4"]))
    out["errors"] = errs
    return out


def _run_tp4(dirs, ckpt_root):
    """TP=4: base logits; N=4 BD and LoRA checkpoints load at TP=4; N=2 must not."""
    import torch.distributed as dist

    from megatron_bdlora.adapters import global_adapter_state
    from megatron_bdlora.checkpoint.adapter_checkpoint import load_checkpoint
    from megatron_bdlora.checkpoint.hf_import import load_hf_llama

    out = {"base": {"kv4": _logits(load_hf_llama(dirs["kv4"], tp=4))}, "adapters": {}}
    for name in ("bd4", "bd4_fused", "slora", "replicated"):
        model = load_hf_llama(dirs["kv4"], tp=4)
        load_checkpoint(os.path.join(ckpt_root, name), model)
        out["adapters"][name] = _logits(model)
        if name == "bd4":  # the global factors round-trip bit-exactly through TP=2 -> disk -> TP=4
            out["bd4_global"] = global_adapter_state(model)
        if name == "slora":
            out["slora_strategy"] = model.info.adapter_config.strategy
    out["tp_err"] = _err(load_checkpoint, os.path.join(ckpt_root, "bd2"), load_hf_llama(dirs["kv4"], tp=4))
    dist.barrier()
    return out if dist.get_rank() == 0 else None


# ---- fixtures -----------------------------------------------------------------------------------
def _save_hf(path, seed, max_shard_size=None, v4_config=False, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bdlora.models.presets import get_preset

    hf = {**get_preset("tiny"), "vocab_size": VOCAB, **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**hf)).float().eval()
    with torch.no_grad():  # norms away from 1 so a wrong norm mapping shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(path, fname), "w") as f:
            json.dump({"fake": fname}, f)
    if v4_config:  # the hub's transformers-4 keys: rope_theta + rope_scaling
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
    with torch.no_grad():
        ref = model(_ids()).logits.detach().clone()
    return ref


@pytest.fixture(scope="module")
def env(tmp_path_factory, together):
    base = tmp_path_factory.mktemp("ckpt")
    dirs = {"kv2": str(base / "hf_kv2"), "kv4": str(base / "hf_kv4")}
    refs = {
        # 8 heads / 2 KV heads, tied embeddings, one file, transformers-4 style rope keys
        "kv2": _save_hf(dirs["kv2"], 0, num_key_value_heads=2, tie_word_embeddings=True, v4_config=True),
        # 8 heads / 4 KV heads, untied, sharded with an index, transformers-5 rope_parameters
        "kv4": _save_hf(dirs["kv4"], 1, max_shard_size="40KB", num_key_value_heads=4,
                        tie_word_embeddings=False),
    }
    assert os.path.isfile(os.path.join(dirs["kv4"], "model.safetensors.index.json"))
    assert "rope_scaling" in json.load(open(os.path.join(dirs["kv2"], "config.json")))
    ckpt_root, scratch = str(base / "ckpts"), str(base / "scratch")
    os.makedirs(scratch)
    tp2 = run_distributed(_run_tp2, 2, 2, dirs, ckpt_root)[0]
    tp1, tp4 = together(lambda: run_distributed(_run_tp1, 1, 1, dirs, ckpt_root, scratch)[0],
                        lambda: run_distributed(_run_tp4, 4, 4, dirs, ckpt_root)[0])
    return dict(base=base, dirs=dirs, refs=refs, ckpts=ckpt_root, scratch=scratch,
                runs={1: tp1, 2: tp2, 4: tp4})


def _maxdiff(a, b):
    return (a - b).abs().max().item()


def _close(a, b, what):
    scale = max(1.0, b.abs().max().item())
    d = _maxdiff(a, b)
    assert d <= RTOL * scale, f"{what}: max |diff| {d:.3e} (scale {scale:.3g})"
    return d


def _one_line(msg):
    assert msg is not None, "expected an error"
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    return msg


# ---- HF import ----------------------------------------------------------------------------------
def test_hf_import_matches_transformers(env):
    for tp, run in sorted(env["runs"].items()):
        for name, logits in run["base"].items():
            d = _close(logits, env["refs"][name], f"{name} at TP={tp}")
            print(f"[hf import] {name} TP={tp}: max |ours - transformers| = {d:.2e}")


def test_hf_import_errors(env, tmp_path):
    from megatron_bdlora.checkpoint.hf_import import CheckpointError, check_hf_checkpoint, load_hf_llama

    src = env["dirs"]["kv4"]

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(src, d)
        edit(str(d))
        with pytest.raises(CheckpointError) as e:
            check_hf_checkpoint(str(d))
        with pytest.raises(CheckpointError):  # load_hf_llama fails before building anything
            load_hf_llama(str(d), tp=1)
        return _one_line(str(e.value))

    def shard(d, i=3):
        return os.path.join(d, sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[i])

    def truncate(d):
        p = shard(d)
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 64)

    def corrupt(d):
        with open(shard(d), "wb") as f:
            f.write(b"\xff" * 32)

    def drop_index_entry(d):
        p = os.path.join(d, "model.safetensors.index.json")
        idx = json.load(open(p))
        del idx["weight_map"]["model.layers.1.mlp.up_proj.weight"]
        json.dump(idx, open(p, "w"))

    def wrong_shape(d):
        p = os.path.join(d, "config.json")
        cfg = json.load(open(p))
        cfg["intermediate_size"] = 96
        json.dump(cfg, open(p, "w"))

    def no_weights(d):
        for f in os.listdir(d):
            if "safetensors" in f:
                os.remove(os.path.join(d, f))

    msgs = {
        "no config": broken("noconfig", lambda d: os.remove(os.path.join(d, "config.json"))),
        "no safetensors": broken("noweights", no_weights),
        "missing shard": broken("missingshard", lambda d: os.remove(shard(d))),
        "truncated": broken("truncated", truncate),
        "corrupt": broken("corrupt", corrupt),
        "index entry": broken("index", drop_index_entry),
        "shape": broken("shape", wrong_shape),
    }
    assert "config.json" in msgs["no config"]
    assert "no *.safetensors" in msgs["no safetensors"]
    assert "missing" in msgs["missing shard"]
    for k in ("truncated", "corrupt"):
        assert "truncated or corrupt" in msgs[k] and ".safetensors" in msgs[k] and "re-download" in msgs[k]
    assert "model.layers.1.mlp.up_proj.weight" in msgs["index entry"]
    assert "shape" in msgs["shape"] and "config.json" in msgs["shape"]
    with pytest.raises(CheckpointError, match="does not exist"):
        check_hf_checkpoint(str(tmp_path / "no" / "such" / "dir"))
    # an `org/name` that is not a local path goes to the hub (faked here: no network in tests)
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kw):
        calls.append(repo_id)
        return src

    orig = huggingface_hub.snapshot_download
    huggingface_hub.snapshot_download = fake_download
    try:
        assert check_hf_checkpoint("some-org/llama-tiny")[0] == src and calls == ["some-org/llama-tiny"]
    finally:
        huggingface_hub.snapshot_download = orig
    for k, m in msgs.items():
        print(f"[hf import error] {k}: {m}")


# ---- adapter checkpoints ------------------------------------------------------------------------
def test_checkpoint_tp_independent(env):
    tp1, tp2, tp4 = (env["runs"][t]["adapters"] for t in (1, 2, 4))
    for name in ADAPTERS:
        # the adapter changes the output noticeably (B is non-zero) ...
        assert _maxdiff(tp2[name], env["runs"][2]["base"]["kv4"]) > 1e-2
        # ... and the checkpoint saved at TP=2 gives the same logits at TP=1 and TP=4
        d1 = _close(tp1[name], tp2[name], f"{name} TP=1 vs TP=2")
        msg = f"[tp-independence] {name}: TP1 vs TP2 {d1:.2e}"
        if name in tp4:
            msg += f", TP4 vs TP2 {_close(tp4[name], tp2[name], f'{name} TP=4 vs TP=2'):.2e}"
        print(msg)
    assert "loads at tensor-model-parallel-size in [1, 2], not 4" in _one_line(env["runs"][4]["tp_err"])
    saved, loaded = env["runs"][2]["bd4_factors"], env["runs"][4]["bd4_global"]
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert env["runs"][4]["slora_strategy"] == "replicated"


def test_checkpoint_state_roundtrip(env):
    info = env["runs"][1]["bd4_info"]
    assert info["step"] == 7
    extra = info["extra_state"]
    assert extra["data"] == {"epoch": 1, "offset": 123}
    assert extra["scheduler"] == {"last_epoch": 7, "base_lrs": [1e-3]}
    assert torch.equal(extra["rng"]["torch"], env["runs"][2]["bd4_rng"])
    assert info["optimizer_meta"] == {"type": "adamw", "betas": [0.9, 0.999]}
    factors = env["runs"][2]["bd4_factors"]
    assert set(info["optimizer_tensors"]) == {f"{k}.exp_avg" for k in factors}
    for k, v in factors.items():
        assert torch.equal(info["optimizer_tensors"][f"{k}.exp_avg"], v * 0.5)
    assert info["run_config"]["name"] == "bd4"
    step = os.path.join(env["ckpts"], "bd4", "step_00000007")
    assert open(os.path.join(env["ckpts"], "bd4", "latest")).read().strip() == "step_00000007"
    cfg = json.load(open(os.path.join(step, "config.json")))
    assert cfg["format_version"] == 1 and cfg["saved_at_tp"] == 2 and cfg["adapter"]["nblocks"] == 4
    assert cfg["base_model"]["config"]["num_key_value_heads"] == 4
    assert cfg["base_model"]["name_or_path"] == os.path.abspath(env["dirs"]["kv4"])
    # nothing pickled anywhere
    assert all(f.endswith((".json", ".safetensors")) for f in os.listdir(step))


def test_atomic_save(env):
    r = env["runs"][1]
    assert r["after_keep2"] == ["latest", "step_00000002", "step_00000003"]
    assert "simulated crash" in r["crash_err"]
    # the failed save left nothing but the (simulated) stale temp dir; previous checkpoint intact
    assert r["after_crash"] == [".tmp-step_00000009-999999999", "latest", "step_00000002", "step_00000003"]
    assert r["latest_after_crash"] == "step_00000003" == r["resolved_after_crash"]
    assert r["after_resave"] == ["latest", "step_00000003", "step_00000005"]


def test_load_errors(env):
    errs = env["runs"][1]["errors"]
    for k, m in errs.items():
        print(f"[load error] {k}: {_one_line(m)}")
    assert "adapter config mismatch" in errs["rank_mismatch"] and "rank=8" in errs["rank_mismatch"]
    assert "different base model" in errs["base_mismatch"] and "num_key_value_heads" in errs["base_mismatch"]
    assert "adapter.safetensors is missing" in errs["missing_file"]
    assert "no checkpoint in" in errs["no_checkpoint"]


# ---- exports vs transformers + PEFT -------------------------------------------------------------
def _peft_logits(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(_ids()).logits


def _hf_logits(model_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(_ids()).logits


def _assert_zero_off_diagonal(adapter_dir, nblocks):
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    checked = 0
    for k, t in tensors.items():
        if any(p in k for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) and ".lora_B." in k:
            mat = t  # (out, r): B block-diagonal
        elif any(p in k for p in ("o_proj", "down_proj")) and ".lora_A." in k:
            mat = t  # (r, in): A block-diagonal
        else:
            continue
        ro, co = mat.shape[0] // nblocks, mat.shape[1] // nblocks
        mask = torch.block_diag(*[torch.ones(ro, co, dtype=torch.bool)] * nblocks)
        assert torch.count_nonzero(mat[~mask]) == 0, f"{k}: non-zero off-diagonal blocks"
        assert torch.count_nonzero(mat[mask]) == mask.sum(), f"{k}: zero diagonal entries"
        checked += 1
    assert checked > 0


def test_exports_match_peft(env, tmp_path):
    from megatron_bdlora.checkpoint.export import check_vllm_adapter, export

    kv4 = env["dirs"]["kv4"]
    ours = env["runs"][2]["adapters"]
    report = {}
    for name, kw in ADAPTERS.items():
        ckpt = os.path.join(env["ckpts"], name)
        bd = kw["method"] == "bdlora"
        formats = ["hf-peft", "hf-merged", "vllm"] + (["hf-peft-bd"] if bd else [])
        for fmt in formats:
            out = str(tmp_path / f"{name}-{fmt}")
            export(ckpt, fmt, out, hf_checkpoint=kv4 if fmt == "hf-merged" and name == "bd4" else None)
            if fmt == "hf-merged":
                got = _hf_logits(out)
                assert json.load(open(os.path.join(out, "tokenizer.json"))) == {"fake": "tokenizer.json"}
            else:
                got = _peft_logits(kv4, out)
            report[(name, fmt)] = _close(got, ours[name], f"{name} {fmt}")
            if fmt == "hf-peft-bd":
                cfg = json.load(open(os.path.join(out, "adapter_config.json")))
                assert cfg["use_bdlora"]["nblocks"] == kw["nblocks"]
            if fmt in ("hf-peft", "vllm") and bd:
                _assert_zero_off_diagonal(out, kw["nblocks"])
            if fmt == "vllm":
                check_vllm_adapter(out, 8)
                readme = open(os.path.join(out, "README.md")).read()
                assert f"--lora-modules {name}-vllm={out}" in readme and "--max-lora-rank 8" in readme
                if bd:
                    report[(name, "vllm bd/")] = _close(_peft_logits(kv4, os.path.join(out, "bd")),
                                                        ours[name], f"{name} vllm bd/")
                    assert "MEGATRON_BDLORA_VLLM=1 vllm serve" in readme
                    assert f"--tensor-parallel-size {kw['nblocks']}" in readme
                else:
                    assert not os.path.exists(os.path.join(out, "bd"))
    worst = {}
    for (name, fmt), d in sorted(report.items()):
        print(f"[export] {name:14s} {fmt:11s} max |transformers+PEFT - ours(TP=2)| = {d:.2e} "
              f"(max |logit| {ours[name].abs().max().item():.2f})")
        worst[fmt] = max(worst.get(fmt, 0.0), d)
    for fmt, d in sorted(worst.items()):
        print(f"[export] largest difference, {fmt}: {d:.2e}")
    # every export lands atomically: no temp dirs next to the outputs
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_export_errors_leave_nothing(env, tmp_path):
    from megatron_bdlora.checkpoint.export import export
    from megatron_bdlora.checkpoint.hf_import import CheckpointError

    ck = env["ckpts"]

    def fails(match, *args, **kwargs):
        out = args[2]
        before = set(os.listdir(tmp_path))
        with pytest.raises(CheckpointError, match=match) as e:
            export(*args, **kwargs)
        assert set(os.listdir(tmp_path)) == before or not os.path.exists(out)
        assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or f.startswith(".old-")]
        return _one_line(str(e.value))

    msgs = {}
    msgs["vllm rank"] = fails("exceeds vLLM's largest --max-lora-rank 512",
                              os.path.join(env["scratch"], "big"), "vllm", str(tmp_path / "v"))
    assert not os.path.exists(tmp_path / "v")
    msgs["plain lora bd"] = fails("needs a BD-LoRA adapter", os.path.join(ck, "slora"), "hf-peft-bd",
                                  str(tmp_path / "p"))
    msgs["base mismatch"] = fails("does not match the base", os.path.join(ck, "bd4"), "hf-merged",
                                  str(tmp_path / "m"), hf_checkpoint=env["dirs"]["kv2"])
    # a truncated adapter file
    bad = tmp_path / "badckpt"
    shutil.copytree(os.path.join(ck, "bd2"), bad)
    p = os.path.join(bad, "step_00000007", "adapter.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    msgs["truncated adapter"] = fails("truncated or corrupt", str(bad), "hf-peft", str(tmp_path / "t"))
    os.remove(p)
    msgs["missing adapter"] = fails("adapter.safetensors is missing", str(bad), "hf-peft", str(tmp_path / "t"))
    # an adapter config that does not match the recorded base (hand-edited rank)
    cfgp = os.path.join(bad, "step_00000007", "config.json")
    shutil.copy(os.path.join(ck, "bd2", "step_00000007", "adapter.safetensors"), p)
    cfg = json.load(open(cfgp))
    cfg["adapter"]["rank"] = 16
    json.dump(cfg, open(cfgp, "w"))
    msgs["config mismatch"] = fails(r"has shape \(3, 8, 64\), expected \(3, 16, 64\)", str(bad),
                                    "hf-peft", str(tmp_path / "t"))
    # existing output dir: error unless --overwrite, contents untouched
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    msgs["exists"] = fails("already exists; pass --overwrite", os.path.join(ck, "bd2"), "hf-peft", str(existing))
    assert (existing / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a previous export of this tool (marked), never other data
    msgs["not an export"] = fails("not an export written by this tool", os.path.join(ck, "bd2"),
                                  "hf-peft", str(existing), overwrite=True)
    assert (existing / "keep.txt").read_text() == "mine"
    prev = str(tmp_path / "prev")
    export(os.path.join(ck, "bd2"), "vllm", prev)
    export(os.path.join(ck, "bd2"), "hf-peft", prev, overwrite=True)
    assert sorted(os.listdir(prev)) == [".megatron-bdlora-export", "adapter_config.json",
                                        "adapter_model.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or f.startswith(".old-")]
    for k, m in msgs.items():
        print(f"[export error] {k}: {m}")


# ---- CLI ----------------------------------------------------------------------------------------
def _cli(*argv):
    from tools import convert_checkpoint

    return convert_checkpoint.main(list(argv))


def test_cli(env, tmp_path, capsys):
    ck = os.path.join(env["ckpts"], "bd4_fused")
    assert _cli("inspect", ck) == 0
    text = capsys.readouterr().out
    for s in ("method:          bdlora", "rank:            8", "nblocks (N):     4", "layout:          fused",
              "sharding:        bd", "linear_qkv", "q_proj", "fused layout", "trained steps:   7"):
        assert s in text, (s, text)
    from megatron_bdlora.adapters import AdapterConfig
    from megatron_bdlora.adapters.param_count import adapter_params
    from megatron_bdlora.checkpoint.hf_import import read_hf_config

    n = adapter_params(read_hf_config(env["dirs"]["kv4"]), AdapterConfig(**ADAPTERS["bd4_fused"]))
    assert f"parameters:      {n:,} (fused layout)" in text
    with capsys.disabled():
        print(text)

    out = str(tmp_path / "vllm")
    assert _cli("export", "--load", ck, "--format", "vllm", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "--max-lora-rank 8" in printed and os.path.isfile(os.path.join(out, "bd", "adapter_config.json"))
    assert _cli("export", "--load", ck, "--format", "vllm", "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
    assert _cli("export", "--load", ck, "--format", "hf-peft", "--out", out, "--overwrite",
                "--dtype", "bfloat16") == 0
    assert not os.path.exists(os.path.join(out, "bd"))
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(os.path.join(out, "adapter_model.safetensors")).values()} == {torch.bfloat16}

    helps = {}
    for sub in ("export", "inspect"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), sub, "--help"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout
        helps[sub] = r.stdout
    assert "--hf-checkpoint" in helps["export"] and "hf-peft-bd" in helps["export"]
    assert "CKPT" in helps["inspect"]
