"""Where an export may be written: never over the source checkpoint or anything that holds it,
never inside it, and `--overwrite` only replaces a directory this tool exported before (it
carries MARKER).

Entry points: `check_export_target(out, source_dir, overwrite)` before building the export,
`mark_export(dir, fmt, source_dir)` on the finished temp dir before it is renamed into place.
"""

import os

from megatron_bdlora.checkpoint.files import write_json
from megatron_bdlora.errors import CheckpointError

MARKER = ".megatron-bdlora-export"


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_export_target(out: str, source_dir: str, overwrite: bool) -> None:
    """CheckpointError unless `out` is new, or a marked previous export and `overwrite` is set."""
    if _inside(_real(source_dir), _real(out)):
        raise CheckpointError(f"--out {out} is (or contains) the checkpoint being exported "
                         f"({source_dir}); choose a new output directory")
    if _inside(_real(out), _real(source_dir)):  # pruning that step later would delete the export
        raise CheckpointError(f"--out {out} is inside the checkpoint being exported "
                              f"({source_dir}); choose an output directory outside it")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise CheckpointError(f"output {out} already exists; pass --overwrite to replace a previous "
                         "export, or choose a new --out")
    if not os.path.isfile(os.path.join(out, MARKER)):
        raise CheckpointError(f"--overwrite refuses to replace {out}: it is not an export written by "
                         f"this tool (no {MARKER} file); delete it yourself or choose a new --out")


def mark_export(directory: str, fmt: str, source_dir: str) -> None:
    write_json(os.path.join(directory, MARKER), {"format": fmt, "source": _real(source_dir)})
