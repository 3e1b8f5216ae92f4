"""The project's error for bad user input (flags, files, data, checkpoints).

Raise `InputError` (not ValueError) with one line that names the problem and the fix. The rank
that raises it prints that line and the job exits with status 2 (launch/rank.py); any other
exception is a bug and keeps its traceback. It subclasses ValueError so existing callers that
catch ValueError keep working.
"""


class InputError(ValueError):
    """Bad user input; the message is one line naming the problem and the fix."""


class InputFileNotFound(InputError, FileNotFoundError):
    """A file or directory the user named does not exist (still a FileNotFoundError)."""


EXIT_INPUT = 2  # argparse's status for bad command lines; every input error exits with it
