"""When a run stops before --train-iters: Megatron-LM's exit flags as one check per step.

`ExitConditions(args).should_stop(step)` is the one entry point, called by every rank after each
step; it returns the reason to stop (the trainer then saves that step and exits with
errors.EXIT_RESUME, "saved, resume me") or None:
- `--exit-signal-handler` (on by default): SIGTERM or SIGUSR1 is recorded instead of killing
  the rank (Slurm sends SIGTERM at a time limit or preemption, `--signal=USR1@T` before it);
  a second signal during the save is recorded too and changes nothing;
- `--exit-duration-in-mins`: minutes since the rank started training;
- `--exit-interval`: the first step divisible by it; `--exit-after-iters`: that step.
The ranks agree as Megatron-LM's DistributedSignalHandler does: one all-reduce (MAX) of two
integers over the world group per step, only when a signal handler or a duration is on (ranks
get a signal at different moments; a deadline passes at different moments): every rank stops
after the same step.
"""

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from megatron_bdlora.errors import EXIT_RESUME
from megatron_bdlora.parallel import device
from megatron_bdlora.training.flags import EXIT_SIGNALS

SIGNALS = tuple(getattr(signal, name) for name in EXIT_SIGNALS)
AFTER_ITERS = "exit-after-iters"  # the one reason that ends with status 0 (a test's planned stop)


class SignalFlag:
    """Records the first of `signals` (and counts all) instead of the default action."""

    def __init__(self, signals=SIGNALS):
        self.signum = 0
        self.count = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # only it receives signals
            self._previous = {s: signal.signal(s, self._record) for s in signals}

    def _record(self, signum, frame):
        self.count += 1
        self.signum = self.signum or signum

    def release(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class ExitConditions:
    def __init__(self, args, clock=time.monotonic):
        self.clock = clock
        self.start = clock()
        self.deadline_s = args.exit_duration_in_mins * 60 if args.exit_duration_in_mins else None
        self.interval = args.exit_interval
        self.after_iters = args.exit_after_iters
        self.signals = SignalFlag() if args.exit_signal_handler else None

    def should_stop(self, step: int) -> str | None:
        """The reason to stop after `step` ("SIGTERM", "exit-duration-in-mins", ...) or None; the
        same on every rank (collective when a signal handler or a duration is on)."""
        if self.signals is not None or self.deadline_s is not None:
            timed_out = self.deadline_s is not None and self.clock() - self.start >= self.deadline_s
            flags = torch.tensor([self.signals.signum if self.signals else 0, int(timed_out)],
                                 dtype=torch.int64, device=device())
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum, timed_out = flags.tolist()
            if signum:
                return signal.Signals(signum).name
            if timed_out:
                return "exit-duration-in-mins"
        if self.interval and step % self.interval == 0:
            return "exit-interval"
        if self.after_iters is not None and step >= self.after_iters:
            return AFTER_ITERS
        return None

    def close(self) -> None:
        """The previous signal handlers again (the trainer keeps its handlers until the rank
        exits; an in-process caller restores its own)."""
        if self.signals is not None:
            self.signals.release()


def exit_status(reason: str | None, saved: bool = True) -> int:
    """The rank's exit status after stopping for `reason` (None: finished): 75 "saved, resume
    me"; without a checkpoint (no --save) a signal's usual 128 + N, another reason 0."""
    if reason in (None, AFTER_ITERS):
        return 0
    if saved:
        return EXIT_RESUME
    return 128 + signal.Signals[reason] if reason in signal.Signals.__members__ else 0


def stopped_line(reason: str, step: int, checkpoint: str | None) -> str:
    """Rank 0's line when the run stops early (a signal, --exit-duration-in-mins, ...)."""
    if checkpoint is None:
        return f"stopped after step {step} ({reason}); nothing saved (no --save)"
    return (f"stopped after step {step} ({reason}); saved {checkpoint}; rerun the same command "
            f"(--load {os.path.dirname(checkpoint)}) to resume (exit status {EXIT_RESUME})")
