"""PEFT import (tools/convert_checkpoint.py import): adapters written by PEFT itself (dense LoRA,
LoRA on q_proj+v_proj only, rsLoRA, PEFT's own BD-LoRA with 2 and 4 blocks) become checkpoints
whose logits at TP=1, 2 and 4 equal PEFT's, whose --eval-only loss equals PEFT's loss, that train
on from PEFT's loss, and that export back to the original PEFT tensors exactly. Every refusal is
one line, exit status 2, and leaves no output directory.

One spawned run per TP size covers all adapters; PEFT and the import run in this process.
"""

import json
import os

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.helpers import BD_SIDES, PEFT_SEQ as SEQ, PEFT_VOCAB, peft_records, save_peft

from megatron_bdlora.adapters.layout import HF_TARGETS

RTOL = 1e-5
ALL7 = list(HF_TARGETS)
# name -> LoraConfig kwargs (nblocks: PEFT's use_bdlora)
ADAPTERS = {
    "dense": dict(r=8, lora_alpha=16, target_modules=ALL7),
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=6, lora_alpha=4, use_rslora=True, target_modules=ALL7),  # TP=4: replicated
    "bd2": dict(r=8, lora_alpha=16, target_modules=ALL7, nblocks=2),
    "bd4": dict(r=8, lora_alpha=12, use_rslora=True, target_modules=ALL7, nblocks=4),
}


# ---- spawned ranks ------------------------------------------------------------------------------
def _run(base, ckpts, names, train):
    from megatron_bdlora.checkpoint.adapter_checkpoint import load_checkpoint
    from megatron_bdlora.checkpoint.hf_import import load_hf_llama
    from megatron_bdlora.models.llama import forward_logits, gather_logits, lm_loss

    ids = peft_records()
    out = {"logits": {}}
    for name in names:
        model = load_hf_llama(base)
        load_checkpoint(os.path.join(ckpts, name), model)
        with torch.no_grad():
            out["logits"][name] = gather_logits(forward_logits(model.eval(), ids), PEFT_VOCAB).clone()
    if train:  # continued training from an imported checkpoint: its first loss is PEFT's
        model = load_hf_llama(base)
        load_checkpoint(os.path.join(ckpts, train), model)
        model.train()
        labels = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            loss, _ = lm_loss(model, ids, labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        out["train_losses"] = losses
    return out


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base):
    from megatron_bdlora.checkpoint.peft_import import import_peft

    d = tmp_path_factory.mktemp("peft_import")
    base, ckpts = tiny_base, str(d / "ckpts")
    refs, msgs = {}, {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        refs[name] = save_peft(base, str(d / "peft" / name), kw, seed=10 + i)
        msgs[name] = import_peft(str(d / "peft" / name), base, os.path.join(ckpts, name))
    names = list(ADAPTERS)
    runs = {1: run_distributed(_run, 1, 1, base, ckpts, names, None)[0],
            2: run_distributed(_run, 2, 2, base, ckpts, names, "bd2")[0],
            4: run_distributed(_run, 4, 4, base, ckpts, [n for n in names if n != "bd2"], None)[0]}
    return dict(dir=d, base=base, ckpts=ckpts, refs=refs, runs=runs, msgs=msgs)


def _close(a, b, what):
    d = (a - b).abs().max().item()
    assert d <= RTOL * max(1.0, b.abs().max().item()), f"{what}: max |diff| {d:.3e}"
    return d


# ---- tests --------------------------------------------------------------------------------------
def test_import_records_adapter(env):
    from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint

    for name, kw in ADAPTERS.items():
        ck = AdapterCheckpoint(os.path.join(env["ckpts"], name))
        cfg = ck.adapter_config
        assert ck.step == 0 and ck.optimizer_state() == (None, None)
        assert (cfg.method, cfg.rank, cfg.alpha, cfg.rslora, cfg.layout) == (
            "bdlora" if "nblocks" in kw else "lora", kw["r"], kw["lora_alpha"],
            kw.get("use_rslora", False), "canonical")
        assert cfg.projections == tuple(kw["target_modules"])
        if "nblocks" in kw:
            assert cfg.nblocks == kw["nblocks"]
        assert ck.base_name_or_path == env["base"]
        assert ck.config["base_model"]["tokenizer_path"] == env["base"]
        assert ck.config["run_config"]["hf_checkpoint"] == env["base"]
    assert "loads at TP in [1, 2, 4]" in env["msgs"]["bd4"][1]
    assert "--bd-nblocks 2" in env["msgs"]["bd2"][2]


def test_logits_match_peft_at_tp_1_2_4(env):
    for tp, run in sorted(env["runs"].items()):
        for name, logits in run["logits"].items():
            d = _close(logits, env["refs"][name][0], f"{name} at TP={tp}")
            print(f"[peft import] {name} TP={tp}: max |ours - PEFT| = {d:.2e}")
    assert set(env["runs"][4]["logits"]) == set(ADAPTERS) - {"bd2"}


def test_export_reproduces_peft_tensors(env, tmp_path):
    from safetensors.torch import load_file

    from megatron_bdlora.checkpoint.export import export

    for name, kw in ADAPTERS.items():
        fmt = "hf-peft-bd" if "nblocks" in kw else "hf-peft"
        out = str(tmp_path / name)
        export(os.path.join(env["ckpts"], name), fmt, out)
        orig_dir = env["dir"] / "peft" / name
        orig, got = (load_file(os.path.join(p, "adapter_model.safetensors")) for p in (orig_dir, out))
        assert orig.keys() == got.keys(), name
        for k in orig:
            assert torch.equal(orig[k], got[k]), (name, k)
        a, b = (json.load(open(os.path.join(p, "adapter_config.json"))) for p in (orig_dir, out))
        for key in ("r", "lora_alpha", "use_rslora"):
            assert a[key] == b[key], (name, key)
        assert set(a["target_modules"]) == set(b["target_modules"]), name
        if "nblocks" in kw:
            assert b["use_bdlora"]["nblocks"] == a["use_bdlora"]["nblocks"] == kw["nblocks"]


def test_continued_training_starts_at_peft_loss(env):
    losses = env["runs"][2]["train_losses"]
    assert abs(losses[0] - env["refs"]["bd2"][1]) <= RTOL * abs(losses[0]), (losses, env["refs"]["bd2"][1])
    assert losses[-1] < losses[0], losses


def test_eval_only_loss_equals_peft(env, launch):
    data = env["dir"] / "eval.jsonl"
    data.write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n" for row in peft_records()))
    r = launch(["--tensor-model-parallel-size", 2, "--eval-only",
                "--load", os.path.join(env["ckpts"], "bd2"), "--hf-checkpoint", env["base"],
                "--eval-data-path", data, "--seq-length", SEQ, "--micro-batch-size", 2,
                "--eval-iters", 2, "--data-cache-dir", env["dir"] / "cache"], env["dir"], nproc=2)
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("{")]
    result = json.loads(line)
    assert result["tokens"] == 4 * (SEQ - 1)
    peft_loss = env["refs"]["bd2"][1]
    assert abs(result["loss"] - peft_loss) <= RTOL * result["loss"], (result, peft_loss)
    print(f"[peft import] --eval-only loss {result['loss']:.8f}, PEFT {peft_loss:.8f}")


def _cli(*argv):
    from tools import convert_checkpoint

    return convert_checkpoint.main([str(a) for a in argv])


def test_cli_import_and_inspect(env, tmp_path, capsys):
    out = tmp_path / "ck"
    assert _cli("import", "--peft", env["dir"] / "peft" / "bd4", "--hf-checkpoint", env["base"],
                "--out", out) == 0
    printed = capsys.readouterr().out
    assert "BD-LoRA, N=4" in printed and "--eval-only --load" in printed
    assert _cli("inspect", out) == 0
    text = capsys.readouterr().out
    for s in ("method:          bdlora", "nblocks (N):     4", "trained steps:   0", "(rsLoRA)"):
        assert s in text, (s, text)


def _refusals(d, good, bd):
    """name -> (adapter dir, needle in the error), each a copy of a good adapter with one defect."""
    import shutil

    from safetensors.torch import load_file, save_file

    cases = {}

    def case(name, src, needle, cfg_edit=None, tensor_edit=None):
        path = d / name
        shutil.copytree(src, path)
        if cfg_edit:
            cfg = json.load(open(path / "adapter_config.json"))
            cfg_edit(cfg)
            json.dump(cfg, open(path / "adapter_config.json", "w"))
        if tensor_edit:
            t = load_file(path / "adapter_model.safetensors")
            tensor_edit(t)
            save_file(t, path / "adapter_model.safetensors")
        cases[name] = (path, needle)

    case("dora", good, "DoRA", cfg_edit=lambda c: c.update(use_dora=True))
    case("bias", good, "bias='all'", cfg_edit=lambda c: c.update(bias="all"))
    case("modules_to_save", good, "modules_to_save", cfg_edit=lambda c: c.update(modules_to_save=["lm_head"]))
    case("rank_pattern", good, "rank_pattern", cfg_edit=lambda c: c.update(rank_pattern={"q_proj": 4}))
    case("alpha_pattern", good, "alpha_pattern", cfg_edit=lambda c: c.update(alpha_pattern={"o_proj": 1}))
    case("lm_head", good, "lm_head.lora_A.weight is not a LoRA factor of a Llama projection",
         tensor_edit=lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.ones(8, 64),
                                         "base_model.model.lm_head.lora_B.weight": torch.ones(PEFT_VOCAB, 8)}))
    case("bd_sides", bd, "use_bdlora makes A of q_proj block-diagonal",
         cfg_edit=lambda c: c["use_bdlora"].update(target_modules_bd_a=BD_SIDES["target_modules_bd_b"],
                                                   target_modules_bd_b=BD_SIDES["target_modules_bd_a"]))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    case("shape", good, "does not fit this base",
         tensor_edit=lambda t: t.update({key: torch.ones(t[key].shape[0] // 2, t[key].shape[1])}))
    case("missing", good, "adapter_model.safetensors is missing")
    os.remove(cases["missing"][0] / "adapter_model.safetensors")
    case("truncated", good, "truncated or corrupt")
    p = cases["truncated"][0] / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    return cases


def test_refusals_one_line_nothing_written(env, tmp_path, capsys):
    peft = env["dir"] / "peft"
    cases = _refusals(tmp_path / "in", peft / "dense", peft / "bd2")
    for name, (path, needle) in cases.items():
        out = tmp_path / f"out-{name}"
        assert _cli("import", "--peft", path, "--hf-checkpoint", env["base"], "--out", out) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (name, err)
        assert not os.path.exists(out), name
        print(f"[refused] {name}: {err.strip()}")
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
