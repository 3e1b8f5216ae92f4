"""Preemption through the launcher, as Slurm does it (issue 25): SIGTERM to the launcher, then to
the launcher and every rank at once followed by a flood of SIGTERM / SIGUSR1 (signals during the
save), each mid-run. Each time every rank finishes its step, the step is saved (no step lost),
the launcher exits 75 ("saved, resume me"), and the same command resumes; the adapter of the
last interrupted step equals an uninterrupted run's at that step bit for bit (the reference
saves every step), and so does every logged loss. The uninterrupted run also checks the logs a
Megatron-LM user reads (TensorBoard, timers, TFLOP/s). Tiny model, TP=2, 3 launches (the
reference beside the first attempt).
"""

import contextlib
import json
import os
import signal
import subprocess
import time

import torch

from examples.run_commands import LAUNCHER, clean_env, descendants
from megatron_bdlora.checkpoint.adapter_checkpoint import AdapterCheckpoint, list_checkpoints
from megatron_bdlora.errors import EXIT_RESUME

ITERS = 12


def job(save, *extra):
    """One command line, the same for every attempt (--load = --save: a rerun resumes)."""
    return ["bash", LAUNCHER, "--model-preset", "tiny", "--tokenizer", "data/tokenizer",
            "--data-path", "data/train.jsonl", "--seq-length", "32", "--micro-batch-size", "2",
            "--tensor-model-parallel-size", "2", "--lora-rank", "4", "--lora-dropout", "0.1",
            "--train-iters", str(ITERS), "--log-interval", "1", "--data-cache-dir", "cache",
            "--save", save, "--load", save, *map(str, extra)]


def records(save):
    path = os.path.join(save, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_step(save) -> int:
    return max((r["step"] for r in records(save) if "loss" in r), default=0)


def interrupt(cwd, cmd, save, after: int, everyone: bool, flood: bool = False):
    """Run `cmd`; once `after` more steps are logged, SIGTERM the launcher (and, `everyone`,
    every rank at once; `flood`: then SIGTERM / SIGUSR1 every 30 ms until it exits)."""
    start = last_step(os.path.join(cwd, save))
    p = subprocess.Popen(cmd, cwd=cwd, env=clean_env(NPROC=2), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while last_step(os.path.join(cwd, save)) < start + after:
            assert p.poll() is None and time.time() < deadline, p.communicate()[0][-3000:]
            time.sleep(0.02)
        signalled_at = last_step(os.path.join(cwd, save))
        n = 0
        while p.poll() is None and (n == 0 or flood):
            for pid in [p.pid, *(descendants(p.pid) if everyone else [])]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, (signal.SIGTERM, signal.SIGUSR1)[n % 2])
            n += 1
            time.sleep(0.03)
        out = p.communicate(timeout=240)[0]
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out, signalled_at, n


def test_preempted_run_saves_its_step_and_resumes_bit_exact(work):
    # the uninterrupted reference, with the logs a Megatron-LM user reads; it runs beside the
    # first attempt (an independent job)
    with open(work / "ref.log", "w") as log:
        ref = subprocess.Popen(job("ref", "--tensorboard-dir", "tb", "--timing-log-level", 1,
                                   "--log-throughput", "--save-interval", 1, "--keep-last", ITERS),
                               cwd=work, env=clean_env(NPROC=2), stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        # 1. SIGTERM to the launcher alone
        rc, out, at, _ = interrupt(work, job("run"), "run", after=3, everyone=False)
        ref.wait(timeout=400)
    finally:
        if ref.poll() is None:
            ref.kill()
    ref_out = (work / "ref.log").read_text()
    assert ref.returncode == 0, ref_out[-5000:]
    assert "defaults that differ from Megatron-LM's" in ref_out
    step2 = records(work / "ref")[1]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "time_data_ms",
            "time_forward_backward_ms", "time_optimizer_ms", "time_save_ms"} <= set(step2)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(work / "tb"))

    run = str(work / "run")
    assert rc == EXIT_RESUME, out[-3000:]
    first = AdapterCheckpoint(run).step
    assert first == last_step(run) < ITERS and first >= at  # the interrupted step, none lost
    assert records(run)[-1] == {"step": first, "exit": "SIGTERM",
                                "checkpoint": os.path.join("run", f"step_{first:08d}")}
    assert f"stopped after step {first} (SIGTERM); saved" in out

    # 2. the same command resumes; SIGTERM to every process at once, then a flood (the second
    #    and later signals land during the save, which saves every step here)
    rc, out, at, n = interrupt(work, job("run", "--save-interval", 1), "run", after=2,
                               everyone=True, flood=True)
    assert rc == EXIT_RESUME, out[-3000:]
    assert "resumed from" in out and f"step_{first:08d}" in out
    second = AdapterCheckpoint(run).step
    assert first < second == last_step(run) < ITERS and second >= at and n > 1
    for _, name in list_checkpoints(run):  # every checkpoint kept is complete and loads
        ck = AdapterCheckpoint(os.path.join(run, name))
        assert ck.tensors and ck.extra_state()["step"] == ck.step

    # the interrupted run equals the uninterrupted one: the adapter at the last
    # saved step, and every loss logged by the two attempts
    ref_ck, ck = AdapterCheckpoint(str(work / "ref" / f"step_{second:08d}")), AdapterCheckpoint(run)
    assert ref_ck.tensors.keys() == ck.tensors.keys()
    assert all(torch.equal(ref_ck.tensors[k], ck.tensors[k]) for k in ck.tensors)
    losses = lambda save: {r["step"]: r["loss"] for r in records(save) if "loss" in r}  # noqa: E731
    ref_losses = losses(work / "ref")
    assert losses(run) == {s: ref_losses[s] for s in range(1, second + 1)}
