"""Drive the launcher and the torchrun tools from Python, for the examples (demo.py,
finetune_real.py, param_efficiency/run.py); not the launcher itself (megatron_bdlora/launch).

Everything runs as a subprocess, exactly as a user would type it, so an experiment exercises the
same code path as `pretrain_scripts/finetune_llama.sh` on a cluster.
"""

import contextlib
import json
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "pretrain_scripts", "finetune_llama.sh")


def run(cmd, env=None, capture=False, log=None) -> str | None:
    """Run `cmd`; its output is shown, or returned (capture), or written to the file `log` and
    returned. A failure raises with the log's path, so a sweep names the run that broke."""
    print("+", " ".join(cmd), flush=True)
    full_env = {**os.environ, **(env or {})}
    if log is None:
        out = subprocess.run(cmd, env=full_env, check=True, text=True,
                             stdout=subprocess.PIPE if capture else None)
        return out.stdout if capture else None
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=full_env, text=True, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"command failed (exit {proc.returncode}); see {log}")
    with open(log) as f:
        return f.read()


def finetune(flags, nproc=1, env=None, log=None) -> str | None:
    """pretrain_scripts/finetune_llama.sh with `flags` on `nproc` local ranks."""
    return run([LAUNCHER, *map(str, flags)], env={"NPROC": str(nproc), **(env or {})}, log=log)


def torchrun(nproc, script, *args, env=None, log=None) -> str:
    """A torchrun tool script (tools/*.py) on this node (standalone: a free port of its own);
    returns its stdout."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(nproc), script, *map(str, args)], env=env, capture=log is None, log=log)


def last_json(text: str) -> dict:
    """The last JSON line a tool printed (its result)."""
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def run_parallel(jobs, fn, workers: int, first_port: int = 29600) -> list:
    """fn(job, env) for every job, `workers` at a time; each concurrent job gets its own master
    port and one intra-op thread, as two multi-threaded jobs on the same cores slow each other
    down many times over (OpenMP threads spin while waiting)."""
    ports = queue.Queue()
    for i in range(workers):
        ports.put(first_port + i)

    def one(job):
        port = ports.get()
        try:
            return fn(job, {"MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
        finally:
            ports.put(port)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


# For the tests and tools/kill_sweep.py, which run the launcher as a user would: demo data, a
# clean environment, the process tree of a launcher (to check that its ranks are gone).
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
