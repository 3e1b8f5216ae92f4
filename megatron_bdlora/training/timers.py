"""Per-phase wall-clock timers (Megatron-LM's --timing-log-level): `Timers(level)` is the one
entry point; `timers("forward-backward")` is a context manager around a phase, and `collect()`
returns each phase's milliseconds since the last call (`time_<phase>_ms`) for the step's log.

Level 1: data, forward-backward, optimizer, save; level 2 adds evaluation. A phase above the
level costs nothing. On a GPU the device is synchronised at both ends of a timed phase (kernels
are asynchronous: without it the optimizer would be charged the backward's time), so timing
slows a run slightly: it is off (level 0) by default, as in Megatron-LM.
"""

import contextlib
import time

import torch

LEVELS = {"data": 1, "forward-backward": 1, "optimizer": 1, "save": 1, "eval": 2}


class Timers:
    def __init__(self, level: int = 0):
        self.level = level
        self.elapsed = {}

    @contextlib.contextmanager
    def _timed(self, name):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.elapsed[name] = self.elapsed.get(name, 0.0) + time.perf_counter() - t0

    def __call__(self, name: str):
        if LEVELS[name] > self.level:
            return contextlib.nullcontext()
        return self._timed(name)

    def collect(self) -> dict:
        out = {f"time_{name.replace('-', '_')}_ms": 1e3 * s for name, s in self.elapsed.items()}
        self.elapsed = {}
        return out
