"""Helpers for tests that run the launcher as a user would: demo data, a clean environment,
and the process tree of a launcher (to check that its ranks are gone)."""

import contextlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "pretrain_scripts", "finetune_llama.sh")


def make_demo_data(cwd, num_train=400, num_eval=64, num_pretrain=800) -> None:
    """examples/make_demo_data.py into cwd/data (records + tiny tokenizer)."""
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "make_demo_data.py"), "--out",
                    "data", "--seed", "0", "--num-train", str(num_train), "--num-eval",
                    str(num_eval), "--num-pretrain", str(num_pretrain)],
                   cwd=cwd, check=True, capture_output=True)


def clean_env(**extra) -> dict:
    """This environment without torchrun's / wandb's variables, one intra-op thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and
           k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CI="true", PYTHONUNBUFFERED="1", PYTHON=sys.executable,
               **{k: str(v) for k, v in extra.items()})
    return env


def descendants(pid: int) -> list:
    """All processes below pid (children first), from /proc."""
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{p}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
