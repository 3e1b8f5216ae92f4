"""Drive the launcher and the torchrun tools from Python, for the examples (demo.py,
finetune_real.py, param_efficiency/run.py); not the launcher itself (megatron_bdlora/launch).

Everything runs as a subprocess, exactly as a user would type it, so an experiment exercises the
same code path as `pretrain_scripts/finetune_llama.sh` on a cluster.
"""

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
