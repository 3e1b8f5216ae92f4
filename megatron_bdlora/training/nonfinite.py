"""A step whose gradient norm (hence loss) is not finite: stop the run naming the step, or skip
the step with --skip-nonfinite. The norm is global (reduced over TP and DP), so every rank takes
the same decision without a collective of its own."""

import math

from megatron_bdlora.errors import DivergedError


class NonFiniteError(DivergedError):
    """A non-finite gradient norm; the message names the step and the fix (exit status 3)."""


def skip_step(step: int, grad_norm, args) -> bool:
    """True when the optimizer step must be skipped; raises NonFiniteError to stop the run."""
    norm = float(grad_norm)
    if math.isfinite(norm):
        return False
    if args.skip_nonfinite:
        return True
    raise NonFiniteError(f"step {step}: the gradient norm is {norm} (the loss diverged); no "
                         "checkpoint was written for it - lower --lr, or pass --skip-nonfinite "
                         "to skip such steps")
