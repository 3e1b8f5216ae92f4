"""The project's one-line errors: bad user input (flags, files, data, checkpoints) and a run
that diverged.

Raise `InputError` (not ValueError) with one line that names the problem and the fix. The rank
that raises it prints that line and the job exits with status 2 (launch/rank.py). A run that
diverged (`DivergedError`: the input was fine, the training was not) exits 3 the same way. Any
other exception is a bug and keeps its traceback. InputError subclasses ValueError so existing
callers that catch ValueError keep working.
"""


class InputError(ValueError):
    """Bad user input; the message is one line naming the problem and the fix."""


class InputFileNotFound(InputError, FileNotFoundError):
    """A file or directory the user named does not exist (still a FileNotFoundError)."""


class CheckpointError(InputError):
    """A problem with checkpoint files or their compatibility; the message is one line."""


class DivergedError(RuntimeError):
    """Training diverged (a non-finite loss or gradient); the message names the step and the fix."""


EXIT_INPUT = 2  # argparse's status for bad command lines; every input error exits with it
EXIT_DIVERGED = 3  # a DivergedError: the flags and files were fine, the run was not
EXIT_RESUME = 75  # stopped early (signal, time or step limit) with its step saved: rerun to resume
#                  (75 is sysexits' EX_TEMPFAIL: a temporary failure, retry)
