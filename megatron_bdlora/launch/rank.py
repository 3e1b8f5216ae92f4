"""What every rank does around its work: die with its launcher, and end in one line.

`run_rank(fn, *args)` is the one entry point (launch/entry.py `main`):
- the rank asks the kernel for SIGKILL when its parent (torchrun's agent) dies, so a `kill -9`
  of the launcher leaves no orphans training and saving into the same directory;
- an `InputError` is printed as one line by the rank that raised it and every rank exits 2 at
  once (os._exit: no collective teardown that would wait for peers stuck in a collective;
  torchrun then stops the others). A non-zero rank waits a moment first, so that when every rank
  hit the same error only rank 0's line is printed (torchrun stops the waiting ranks); a
  `DivergedError` (a non-finite step) likewise, with exit status 3;
- a run that stopped early (`fn` returns {"exit_status": 75, ...}: a signal, a time or step
  limit, training/exit_conditions.py) has saved its step: every rank exits 75 (EXIT_RESUME);
- Ctrl-C (KeyboardInterrupt) prints one line from rank 0 (the step and the last checkpoint)
  and exits 130 (under torchrun the agent passes SIGINT on);
- an exception out of a collective (a peer died, NCCL init failed) is printed in full by rank 0
  and at most one line by the others; any other exception is a bug: its traceback is printed
  and the rank exits 1 at once.
"""

import ctypes
import json
import os
import signal
import sys
import time
import traceback

from megatron_bdlora.checkpoint.adapter_checkpoint import list_checkpoints
from megatron_bdlora.errors import EXIT_DIVERGED, EXIT_INPUT, DivergedError, InputError

PR_SET_PDEATHSIG = 1
_cleanups = []
_save_dir = [None]  # for the Ctrl-C line


def watch_save_dir(path: str | None) -> None:
    _save_dir[0] = path


def on_exit(fn) -> None:
    """Run `fn` before the rank exits on an error or interrupt (release a lock, ...)."""
    _cleanups.append(fn)


def die_with_parent() -> None:
    """SIGKILL this process when its parent, torchrun's agent, exits (Linux; only under torchrun:
    a rank started from a shell must survive the shell)."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _exit(status: int) -> None:
    for fn in reversed(_cleanups):
        try:
            fn()
        except Exception:  # noqa: BLE001 - exiting anyway; the original error matters
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def interrupted_line(save: str | None) -> str:
    """'interrupted at step N; last checkpoint: DIR' from what the run left in --save."""
    step, found = "?", list_checkpoints(save) if save else []
    try:
        with open(os.path.join(save, "metrics.jsonl")) as f:
            step = max(json.loads(line)["step"] for line in f if line.strip())
    except (OSError, TypeError, ValueError, KeyError):
        pass
    last = os.path.join(save, found[-1][1]) if found else "none"
    return f"interrupted at step {step}; last checkpoint: {last}" + \
        (f" (resume with --load {save})" if found else "")


def _in_collective(e: BaseException) -> bool:
    """Raised inside torch.distributed (a collective or barrier), typically as a peer exited."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename


def run_rank(fn, *args):
    die_with_parent()
    try:
        result = fn(*args)
        status = result.get("exit_status", 0) if isinstance(result, dict) else 0
        if status:  # stopped early and saved: "rerun to resume" (rank 0 printed the line)
            _exit(status)
        return result
    except (InputError, DivergedError) as e:
        if _rank() != 0:
            time.sleep(2.0)  # rank 0's line wins when it hit the same error
        print(f"error: {e}", file=sys.stderr, flush=True)
        _exit(EXIT_INPUT if isinstance(e, InputError) else EXIT_DIVERGED)
    except KeyboardInterrupt:
        if _rank() == 0:
            print(interrupted_line(_save_dir[0]), file=sys.stderr, flush=True)
        _exit(130)
    except SystemExit:
        raise
    except BaseException as e:
        collective = _in_collective(e)
        if collective:
            # A peer died (it printed why): torchrun stops this rank within the wait. If not,
            # every rank failed the same way (NCCL init): rank 0, waiting least, prints it in
            # full and the others one line (torchrun usually stops them first).
            time.sleep(2.0 if _rank() == 0 else 5.0)
        if collective and _rank() != 0:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"error: rank {_rank()}: a collective failed ({first[:200]}); rank 0 or the "
                  "failing rank printed the error", file=sys.stderr, flush=True)
        else:  # a bug, or rank 0's collective / CUDA failure: the whole traceback, peers not kept
            traceback.print_exc()
        _exit(1)
