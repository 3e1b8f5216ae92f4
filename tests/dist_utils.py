"""Run a function on N gloo ranks (spawned processes) with Megatron-Core parallel state set up.

The ranks of each world size start once per test session and serve every later call: starting a
rank (importing torch, Megatron-Core, transformers) costs seconds on 2 cores, more than most
checks. Each call sets up its TP x DP x PP groups and seeds as a fresh process would. Ranks are not
reused after a call that failed, tore the process group down (the trainer's train() does) or
rebound a global of the package (the TE stand-in, a monkeypatch it did not undo).
"""

import atexit
import gc
import importlib
import os
import pickle
import pkgutil
import queue
import sys
import threading
import traceback

import torch.multiprocessing as mp

from megatron_bdlora.parallel.distributed import free_port


def _package_globals() -> dict:
    """Every global of the imported megatron_bdlora modules (the objects, compared by identity)."""
    return {(name, k): v for name, m in list(sys.modules.items())
            if name.split(".")[0] == "megatron_bdlora" and m is not None for k, v in vars(m).items()}


def _serve(rank, world, port, tasks, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import megatron_bdlora
    from megatron_bdlora.parallel import destroy_distributed, init_distributed

    # every module imported up front, so that _package_globals sees each one before any call
    for m in pkgutil.walk_packages(megatron_bdlora.__path__, "megatron_bdlora."):
        try:
            importlib.import_module(m.name)
        except ModuleNotFoundError as e:  # a module of an optional extra (serving: vllm)
            if e.name == m.name:
                raise
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:  # the test session died without closing its ranks
                break
            continue
        if task is None:
            break
        fn, tp, pp, vpp, args = pickle.loads(task)
        before = {}
        try:
            init_distributed(tp, seed=1234, pipeline_parallel_size=pp, virtual_pipeline_size=vpp)
            before = _package_globals()
            # Plain pickle bytes: torch's queue pickler would share tensors through file
            # descriptors that vanish when this process exits before the parent has read them.
            status, value = "ok", pickle.dumps(fn(*args))
        except BaseException:
            status, value = "error", traceback.format_exc()
        after = _package_globals()
        reusable = status == "ok" and dist.is_initialized() and \
            all(after.get(k) is v for k, v in before.items())
        results.put((rank, status, value, reusable))
        del fn, args, before, after
        gc.collect()
        if not reusable:
            break
    destroy_distributed()


class _Ranks:
    """`world` spawned ranks in one gloo process group, each serving calls from its own queue."""

    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world, self.results = world, ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        port = free_port()
        # daemonic: an interpreter that exits without close_all (a crash) still ends them
        self.procs = [ctx.Process(target=_serve, args=(r, world, port, self.tasks[r], self.results),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, layout: tuple, args, timeout: float) -> tuple[list, bool]:
        """fn(*args)'s per-rank results (rank order) at `layout` (tp, pp, vpp) and whether every
        rank can serve again."""
        task = pickle.dumps((fn, *layout, args))
        for q in self.tasks:
            q.put(task)
        results, reusable = {}, True
        for _ in range(self.world):
            rank, status, value, ok = self.results.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
            reusable &= ok
        return [results[r] for r in range(self.world)], reusable

    def close(self, wait: float = 30):
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=wait)
            if p.is_alive():
                p.kill()
                p.join()


_IDLE: dict = {}  # world size -> _Ranks waiting for the next call, least recently used first
_LOCK = threading.Lock()
MAX_IDLE_RANKS = 7  # worlds 1, 2 and 4; an idle rank holds ~0.4 GB


def run_distributed(fn, world_size: int, tp: int | None = None, *args, pp: int = 1,
                    vpp: int | None = None, timeout: float = 600):
    """Run fn(*args) on every rank; return the list of per-rank results (rank order). `tp`
    (default: the world) x `pp` pipeline stages (`vpp` virtual stages per rank) x DP: the rest."""
    with _LOCK:  # taken out while in use: a concurrent call of the same size starts its own
        ranks = _IDLE.pop(world_size, None)
    ranks = ranks or _Ranks(world_size)
    reusable = False
    try:
        out, reusable = ranks.run(fn, (tp or world_size // pp, pp, vpp), args, timeout)
        return out
    finally:
        spare = []
        with _LOCK:
            if not reusable or world_size in _IDLE:
                spare.append(ranks)
            else:
                _IDLE[world_size] = ranks
            while sum(_IDLE) > MAX_IDLE_RANKS:
                spare.append(_IDLE.pop(next(iter(_IDLE))))
        for r in spare:
            # after a failure some ranks may wait in a collective for a peer that is gone
            r.close(wait=5 if r is ranks and not reusable else 30)


@atexit.register
def close_all():
    """Stop every idle rank (at the test session's end)."""
    with _LOCK:
        pools = list(_IDLE.values())
        _IDLE.clear()
    for ranks in pools:
        ranks.close()
