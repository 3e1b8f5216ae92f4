"""End-to-end trainer tests through the launcher (pretrain_scripts/finetune_llama.sh + torchrun).

One module-scoped fixture pretrains a tiny base once (in conftest's `work`, the demo data);
every test runs the real launcher in a subprocess on CPU (gloo), the end to end run as two nodes. Small iters / batches: the file
takes a few minutes on 2 cores. Bad input through the launcher is tests/test_bad_inputs.py's.
"""

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from examples.run_commands import LAUNCHER, clean_env, descendants
from megatron_bdlora.checkpoint.adapter_checkpoint import (
    AdapterCheckpoint,
    list_checkpoints,
    resolve_checkpoint_dir,
)
from megatron_bdlora.parallel.distributed import free_port


def metrics(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def work(work, launch):
    """conftest's `work` (the demo data) with a tiny base pretrained in base_run/."""
    d = work
    launch(["--model-preset", "tiny", "--tokenizer", "data/tokenizer", "--adapter", "none",
            "--data-path", "data/pretrain.jsonl", "--pack-sequences", "--seq-length", 64,
            "--micro-batch-size", 16, "--train-iters", 30, "--lr", 3e-3, "--save", "base_run"], d)
    assert os.path.isfile(d / "base_run" / "hf" / "config.json")
    return d


# Fine-tuning flags shared by the resume runs (TP=2 -> N=2 blocks; loads at TP 1 or 2).
FT = ["--hf-checkpoint", "base_run/hf", "--adapter", "bdlora", "--lora-rank", 4, "--bd-nblocks", 2,
      "--data-path", "data/train.jsonl", "--seq-length", 32, "--micro-batch-size", 4,
      "--global-batch-size", 8, "--train-iters", 8, "--lr", 3e-3, "--log-interval", 1,
      "--lr-warmup-iters", 2]


def _tensors(path):
    return AdapterCheckpoint(path).tensors


# ---- end to end -------------------------------------------------------------------------------
def test_two_nodes_tp2_dp2_end_to_end_with_resume(work):
    """Two launchers as node 0 and node 1 (--nnodes 2, master 127.0.0.1): TP=2 in each node, DP=2
    across them, global 16 = 2 micro-steps x micro 4 x DP 2. The first run stops at step 6
    (--exit-after-iters); the same command resumes both nodes to step 12."""
    def both_nodes(*extra):
        port = str(free_port())
        procs = [subprocess.Popen(
            ["bash", LAUNCHER, "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", str(node),
             "--master-addr", "127.0.0.1", "--master-port", port,
             "--tensor-model-parallel-size", "2", "--hf-checkpoint", "base_run/hf",
             "--adapter", "bdlora", "--lora-rank", "8", "--bd-nblocks", "2",
             "--data-path", "data/train.jsonl", "--eval-data-path", "data/eval.jsonl",
             "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "16",
             "--train-iters", "12", "--lr", "1e-2", "--save", "e2e", "--load", "e2e",
             "--save-interval", "6", "--eval-interval", "6", "--eval-iters", "2",
             "--log-interval", "1", *extra],
            cwd=work, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for node in (0, 1)]
        outs = [p.communicate(timeout=400) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
        return outs[0][0]

    # --load X --save X on a first run: a fresh start with a notice (Megatron-LM's habit)
    out = both_nodes("--exit-after-iters", "6")
    assert "TP=2 PP=1 DP=2" in out and "no checkpoint in e2e yet: starting fresh" in out
    assert AdapterCheckpoint(str(work / "e2e")).step == 6
    out = both_nodes()
    assert "resumed from" in out
    m = [x for x in metrics(work / "e2e") if "loss" in x]  # the stop at 6 is a record of its own
    assert [x["step"] for x in m] == list(range(1, 13))
    losses = [x["loss"] for x in m]  # CPU + fixed seed: deterministic, not flaky
    assert losses[-1] < losses[0] and sum(losses[-3:]) < sum(losses[:3]) - 0.03, losses
    assert any("eval_loss" in x for x in metrics(work / "e2e"))
    ckpts = [name for _, name in list_checkpoints(str(work / "e2e"))]
    assert ckpts == ["step_00000006", "step_00000012"]
    assert (work / "e2e" / "latest").read_text().strip() == "step_00000012"
    ck = AdapterCheckpoint(str(work / "e2e"))
    assert ck.step == 12 and ck.config["saved_at_tp"] == 2
    assert ck.tensors and all(torch.isfinite(t).all() for t in ck.tensors.values())
    assert any(t.abs().sum() > 0 for k, t in ck.tensors.items() if "lora_B" in k)


# ---- resume -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resume_runs(work, launch, together):
    """Uninterrupted TP=2 runs with dropout (RNG: the same-TP resume) and without (cross-TP),
    each also saving step 4; then, at the same time, the resumes from step 4 (dropout at TP=2,
    no dropout at TP=1) and an --eval-only of the finished run without dropout. Returns the
    --eval-only run."""
    drop = ["--tensor-model-parallel-size", 2, *FT, "--lora-dropout", 0.1]
    together(lambda: launch([*drop, "--save", "full_drop", "--save-interval", 4], work, 2),
             lambda: launch(["--tensor-model-parallel-size", 2, *FT, "--save", "full_nodrop",
                             "--save-interval", 4], work, 2))
    return together(
        lambda: launch([*drop, "--save", "resumed_drop", "--load", "full_drop/step_00000004"],
                       work, 2),
        lambda: launch([*FT, "--save", "resumed_tp1", "--load", "full_nodrop/step_00000004"], work),
        lambda: launch(["--eval-only", "--load", "full_nodrop", "--hf-checkpoint", "base_run/hf",
                        "--eval-data-path", "data/eval.jsonl", "--seq-length", 32,
                        "--micro-batch-size", 4, "--eval-iters", 2], work))[2]


def test_resume_same_tp_bit_exact(work, resume_runs):
    assert AdapterCheckpoint(str(work / "full_drop" / "step_00000004")).step == 4
    a, b = _tensors(str(work / "full_drop")), _tensors(str(work / "resumed_drop"))
    assert AdapterCheckpoint(str(work / "resumed_drop")).step == 8
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The resumed run logged exactly steps 5..8, with the uninterrupted run's losses.
    full = {x["step"]: x["loss"] for x in metrics(work / "full_drop") if "loss" in x}
    res = {x["step"]: x["loss"] for x in metrics(work / "resumed_drop") if "loss" in x}
    assert sorted(res) == [5, 6, 7, 8]
    assert all(res[s] == full[s] for s in res)


def test_resume_at_other_tp_close(work, resume_runs):
    assert AdapterCheckpoint(str(work / "full_nodrop" / "step_00000004")).step == 4
    a, b = _tensors(str(work / "full_nodrop")), _tensors(str(work / "resumed_tp1"))
    assert a.keys() == b.keys()
    for k in a:
        rel = ((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)).item()
        assert rel < 1e-5, (k, rel)


def test_eval_only(resume_runs):
    lines = [l for l in resume_runs.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, resume_runs.stdout
    result = json.loads(lines[0])
    assert result["tokens"] > 0 and 0 < result["loss"] < 20


# ---- full fine-tuning resumes ---------------------------------------------------------------
def test_full_finetune_save_load_continues(work, launch):
    """--adapter none --save F --load F: a second run continues from the first one's step (the
    fixture's base run, TP=1, copied to F) at TP=2 with --bf16; SAVE/hf then holds the fp32 main
    weights (not bf16-rounded)."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(work / "base_run" / "hf", work / "full_ft" / "hf")
    r = launch(["--tensor-model-parallel-size", 2, "--model-preset", "tiny", "--tokenizer",
                "data/tokenizer", "--adapter", "none", "--bf16", "--data-path", "data/pretrain.jsonl",
                "--pack-sequences", "--seq-length", 64, "--micro-batch-size", 16, "--train-iters", 32,
                "--lr", 3e-3, "--log-interval", 1, "--save", "full_ft", "--load", "full_ft"], work, 2)
    assert "resumed from" in r.stdout and "at step 30" in r.stdout, r.stdout
    logged = {x["step"]: x["loss"] for x in metrics(work / "full_ft") if "loss" in x}
    assert sorted(logged) == [31, 32], logged
    first = [x["loss"] for x in metrics(work / "base_run") if "loss" in x]
    assert logged[32] < first[0] - 1, (logged, first)  # it went on from the trained model
    weights = load_file(str(work / "full_ft" / "hf" / "model.safetensors"))
    w = weights["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.float32 and not torch.equal(w.bfloat16().float(), w)


# ---- config + wandb ---------------------------------------------------------------------------
def test_yaml_config_cli_override_and_wandb_offline(work, launch):
    cfg = work / "run.yaml"
    cfg.write_text("train-iters: 3\nlr: 0.05\nlora_rank: 4\nbd-nblocks: 2\n"
                   "data-path: data/train.jsonl\nseq-length: 32\nmicro-batch-size: 4\n")
    launch(["--config", cfg, "--hf-checkpoint", "base_run/hf", "--lr", 0.002, "--save", "yaml_run",
            "--wandb-project", "demo", "--wandb-exp-name", "t1", "--log-interval", 1], work, 1)
    ck = AdapterCheckpoint(str(work / "yaml_run"))
    rc = ck.config["run_config"]
    assert ck.step == 3 and rc["train_iters"] == 3 and rc["lora_rank"] == 4
    assert rc["lr"] == 0.002 and rc["bd_nblocks"] == 2
    m = [x for x in metrics(work / "yaml_run") if "loss" in x]
    assert [x["step"] for x in m] == [1, 2, 3] and m[0]["lr"] == 0.002
    # wandb offline run dir under the save dir, holding the .wandb log with the metrics
    wb = work / "yaml_run" / "wandb"
    runs = [p for p in wb.iterdir() if p.name.startswith("offline-run-")]
    assert len(runs) == 1, list(wb.iterdir())
    files = list(runs[0].glob("*.wandb"))
    assert files and files[0].stat().st_size > 0
    blob = files[0].read_bytes()
    assert b"loss" in blob and b"grad_norm" in blob


# ---- crash during save ------------------------------------------------------------------------
def test_kill_during_save_leaves_loadable_checkpoint(work, launch):
    save = work / "killed"
    args = [*FT[:-4], "--train-iters", 10000, "--save", save, "--save-interval", 1,
            "--keep-last", 2]
    env = clean_env(NPROC=1)
    for attempt in range(3):
        p = subprocess.Popen(["bash", LAUNCHER, *map(str, args)], cwd=work, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and len(list_checkpoints(str(save))) < 1:
                time.sleep(0.05)
            # let several more saves start, then kill at an arbitrary point (likely mid-save)
            time.sleep(1.0 + 0.37 * attempt)
        finally:
            # torchrun starts its workers in their own session: kill the whole tree by pid,
            # the worker (the process that is saving) first
            for pid in reversed(descendants(p.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=60)
        if list_checkpoints(str(save)):
            break
    assert list_checkpoints(str(save)), "no checkpoint was written before the kill"
    latest = (save / "latest").read_text().strip()
    assert latest.startswith("step_") and (save / latest / "config.json").is_file()
    assert resolve_checkpoint_dir(str(save)) == str(save / latest)
    for _, name in list_checkpoints(str(save)):  # every complete-looking dir really is complete
        ck = AdapterCheckpoint(str(save / name))
        assert ck.tensors and ck.extra_state()["step"] == ck.step
    ck = AdapterCheckpoint(str(save))
    assert ck.step == int(latest.split("_")[1])
    # and training resumes from it
    launch([*FT[:-4], "--train-iters", ck.step + 1, "--save", save, "--load", save], work, 1)
    assert AdapterCheckpoint(str(save)).step == ck.step + 1
