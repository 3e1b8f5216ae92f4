#!/usr/bin/env python
"""Kill sweep (not a CI test): SIGKILL a training job at random moments around its saves, resume
it with --load each time, and check that the final adapters equal an uninterrupted run's.

    python tools/kill_sweep.py --kills 20 --workdir /tmp/kill_sweep [--json result.json]

Each round starts pretrain_scripts/finetune_llama.sh (TP=2, a save every step, LoRA dropout so
the RNG state matters), waits for a new checkpoint, then kills the launcher and both ranks at
once: half the rounds the moment a save's temp directory appears (mid-save), half after a random
delay. After each kill the newest checkpoint must load; the next round resumes from it (the dead
job's lock is stale and taken over). Prints one line per round and a JSON summary.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from examples.run_commands import LAUNCHER, clean_env, descendants, make_demo_data  # noqa: E402
from megatron_bdlora.checkpoint.adapter_checkpoint import (  # noqa: E402
    AdapterCheckpoint,
    list_checkpoints,
)


def job_flags(work, save, iters, *extra):
    return ["--model-preset", "tiny", "--tokenizer", "data/tokenizer", "--data-path",
            "data/train.jsonl", "--seq-length", "32", "--micro-batch-size", "4",
            "--tensor-model-parallel-size", "2", "--lora-rank", "4", "--lora-dropout", "0.1",
            "--train-iters", str(iters), "--save-interval", "1", "--keep-last", "2",
            "--log-interval", "1000", "--data-cache-dir", os.path.join(work, "cache"),
            "--save", save, *extra]


def _kill_job(p) -> None:
    for pid in [p.pid, *descendants(p.pid)]:  # the launcher and its ranks at once
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout=60)


def one_round(work, save, iters, rng, mid_save: bool) -> dict:
    before = AdapterCheckpoint(save).step if list_checkpoints(save) else 0
    extra = ["--load", save] if before else []
    p = subprocess.Popen(["bash", LAUNCHER, *job_flags(work, save, iters, *extra)], cwd=work,
                         env=clean_env(NPROC=2), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and \
            (not list_checkpoints(save) or AdapterCheckpoint(save).step <= before):
        time.sleep(0.01)
    if mid_save:  # the moment the next save's temp dir exists, plus up to 20 ms
        while time.time() < deadline and p.poll() is None and \
                not any(e.startswith(".tmp-") for e in os.listdir(save)):
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.02))
    else:
        time.sleep(rng.uniform(0, 0.6))
    finished = p.poll() is not None
    _kill_job(p)
    ck = AdapterCheckpoint(save)  # must resolve and load after any kill
    ok = all(t.isfinite().all() for t in ck.tensors.values()) and ck.extra_state()["step"] == ck.step
    return {"from_step": before, "latest_step": ck.step, "mid_save": mid_save, "loads": bool(ok),
            "leftover_temp_dirs": sorted(e for e in os.listdir(save) if e.startswith(".tmp-")),
            "stale_lock": os.path.exists(os.path.join(save, ".lock")), "finished_early": finished}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--iters", type=int, default=300, help="steps of the whole run")
    ap.add_argument("--workdir", default="/tmp/kill_sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    make_demo_data(work, num_train=400, num_eval=16, num_pretrain=16)
    rng = random.Random(args.seed)
    full, killed = os.path.join(work, "uninterrupted"), os.path.join(work, "killed")
    subprocess.run(["bash", LAUNCHER, *job_flags(work, full, args.iters)], cwd=work,
                   env=clean_env(NPROC=2), check=True, capture_output=True)
    rounds = []
    for i in range(args.kills):
        r = one_round(work, killed, args.iters, rng, mid_save=i % 2 == 0)
        rounds.append(r)
        print(f"kill {i + 1:2d}: {'mid-save' if r['mid_save'] else 'random  '} step "
              f"{r['from_step']:3d} -> {r['latest_step']:3d}, loads {r['loads']}, temp dirs left "
              f"{len(r['leftover_temp_dirs'])}, stale lock {r['stale_lock']}", flush=True)
    subprocess.run(["bash", LAUNCHER, *job_flags(work, killed, args.iters, "--load", killed)],
                   cwd=work, env=clean_env(NPROC=2), check=True, capture_output=True)
    a, b = AdapterCheckpoint(full), AdapterCheckpoint(killed)
    equal = a.step == b.step == args.iters and a.tensors.keys() == b.tensors.keys() and \
        all(a.tensors[k].equal(b.tensors[k]) for k in a.tensors)
    summary = {"kills": args.kills, "loadable_after_kill": sum(r["loads"] for r in rounds),
               "mid_save_kills": sum(r["mid_save"] for r in rounds),
               "final_step": b.step, "final_adapters_bit_equal": bool(equal), "rounds": rounds}
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if equal and summary["loadable_after_kill"] == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
