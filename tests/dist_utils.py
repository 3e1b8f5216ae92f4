"""Run a function on N gloo ranks (spawned processes) with Megatron-Core parallel state set up."""

import os
import pickle
import traceback

import torch.multiprocessing as mp

from megatron_bdlora.parallel.distributed import free_port


def _worker(rank, world, tp, port, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from megatron_bdlora.parallel import destroy_distributed, init_distributed

    try:
        init_distributed(tp, seed=1234)
        # Plain pickle bytes: torch's queue pickler would share tensors through file descriptors
        # that vanish when this process exits before the parent has read them.
        result = pickle.dumps(fn(*args))
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        destroy_distributed()


def run_distributed(fn, world_size: int, tp: int | None = None, *args, timeout: float = 600):
    """Run fn(*args) on every rank; return the list of per-rank results (rank order)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, tp or world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
