"""Files: what every reader checks in a file we did not write, and how every writer publishes.

No file is trusted (docs/reliability.md, threat model): HF checkpoints, PEFT adapters, data, YAML,
and our own checkpoints once copied from elsewhere. Readers:

    inside(directory, name, source)   a file name read from `source` -> a path inside `directory`
    read_json(path, fix)              bounded, strict JSON: NaN / Infinity / overflowing numbers
                                      refused; errors never quote the file
    whole_number(value, what, limit)  a count or size read from a file, checked before use
    excerpt(text)                     the most of a file's text an error may quote

Writers (one implementation of each; adapter checkpoints, exports, imports and the HF base all
use them): `write_json`, `write_tensors`, `write_atomic_text`, and `atomic_dir(target)`, a temp
dir next to `target` that is fsynced and renamed into place on success and removed on any error.
A disk that is full or read-only becomes one line naming the directory and its free space.
"""

import contextlib
import errno
import json
import math
import os
import re
import shutil

from megatron_bdlora.errors import CheckpointError

JSON_MAX_BYTES = 64 * 2**20  # far above any config, index or state file we read
_NAME = re.compile(r"^[\w./+-]{1,64}$")
# errno of a save that cannot succeed without the user freeing space or choosing another place
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


# ---- reading ------------------------------------------------------------------------------------
def excerpt(text) -> str:
    """What an error may quote of something read from a file: a short name-like string as is,
    anything else only by its length (it may be a secret, e.g. /proc/self/environ)."""
    text = str(text)
    if _NAME.match(text):
        return repr(text)
    return f"<{len(text)} characters, not shown>"


def inside(directory: str, name, source: str, follow_links: bool = True) -> str:
    """`directory/name` for a file name read from the file `source`; CheckpointError unless it
    stays inside `directory`: relative, no '..' out of it, and (follow_links=False, for our own
    checkpoints) no symbolic link leading out of it. HF hub snapshots link their files into the
    cache's blobs, so HF directories keep follow_links=True: the name alone is checked."""
    bad = None
    if not isinstance(name, str) or not name or "\0" in name:
        bad = "an empty or non-text file name"
    elif os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        bad = f"the file {excerpt(name)}, which is outside {directory}"
    path = os.path.join(directory, name) if bad is None else None
    if path is not None and not follow_links:
        real, top = os.path.realpath(path), os.path.realpath(directory)
        if not (real == top or real.startswith(top.rstrip(os.sep) + os.sep)):
            bad = f"{excerpt(name)}, a symbolic link out of {directory}"
    if bad:
        raise CheckpointError(f"{source} names {bad}; refused (a file name read from a file must "
                              "stay inside its directory): re-download or re-create it")
    return path


def _no_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"a number overflows to {value}")
    return value


def read_json(path: str, fix: str, max_bytes: int = JSON_MAX_BYTES, kind=dict):
    """The JSON value in `path`, of type `kind` (None: any). One-line CheckpointError naming the
    file, the problem and `fix` for a missing, empty, oversized, non-UTF-8, invalid or non-strict
    file (NaN, Infinity, a number that overflows); the message never quotes the file."""
    def fail(problem):
        return CheckpointError(f"{path} {problem}; {fix}")

    try:
        if not os.path.isfile(path):  # also refuses a FIFO or a device that would block or stream
            raise fail("is missing" if not os.path.lexists(path) else "is not a regular file")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise fail(f"cannot be read ({e.strerror or type(e).__name__})") from None
    if not data.strip():
        raise fail("is empty (a save or copy was cut short)")
    if len(data) > max_bytes:
        raise fail(f"is larger than {max_bytes // 2**20} MiB, too large for this kind of file")
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constant,
                           parse_float=_finite_float)
    except UnicodeDecodeError as e:
        raise fail(f"is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise fail(f"is not valid JSON ({e.msg}, line {e.lineno}; truncated?)") from None
    except ValueError as e:  # NaN / Infinity / an overflowing number
        raise fail(f"holds a non-finite number ({e})") from None
    except RecursionError:
        raise fail("nests too deeply") from None
    if kind is not None and not isinstance(value, kind):
        raise fail(f"holds a JSON {type(value).__name__}, not an object")
    return value


def whole_number(value, what: str, limit: int, fix: str, minimum: int = 1) -> int:
    """`value` as an int in [minimum, limit], else one line `what is ..., not ...; fix` (a float
    that is a whole number, e.g. 8.0, is accepted: JSON writers differ)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= limit:
        shown = f"{value:g}" if isinstance(value, float) else (
            value if isinstance(value, int) and abs(value) < 10**30 else excerpt(value))
        raise CheckpointError(f"{what} is {shown}, not a whole number in [{minimum}, {limit}]; {fix}")
    return value


# ---- writing ------------------------------------------------------------------------------------
def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file  # safetensors imports torch: only when writing

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
              metadata={"format": "pt", **(metadata or {})})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomic_text(path: str, text: str) -> None:
    """Replace a small file atomically (write temp, fsync, rename, fsync the directory)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _shareable(tree: str) -> None:
    """Modes as the umask allows (mkdtemp and safetensors write 0700 / 0600): a group sharing
    the runs can read them."""
    umask = os.umask(0)
    os.umask(umask)
    for d, _, files in os.walk(tree):
        os.chmod(d, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~umask)


def publish_dir(tmp: str, target: str) -> None:
    """Move a finished temp dir to `target` (fsynced first), replacing an existing one only
    after success."""
    parent = os.path.dirname(os.path.abspath(target))
    _shareable(tmp)
    fsync_dir(tmp)
    old = None
    if os.path.lexists(target):
        old = os.path.join(parent, f".old-{os.path.basename(target)}-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(parent)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def temp_dir_for(target: str) -> str:
    """The temp dir a save of `target` is built in (next to it, so the rename is atomic); a
    later save removes it if this process dies (adapter_checkpoint's pruning)."""
    return os.path.join(os.path.dirname(os.path.abspath(target)),
                        f".tmp-{os.path.basename(target)}-{os.getpid()}")


def disk_error(e: OSError, directory: str, flag: str) -> CheckpointError | None:
    """One line for a write the machine refused (disk full, read-only, no permission): the
    directory, its free space and the fix; None for other errors (a bug keeps its traceback)."""
    if e.errno not in _DISK_ERRORS:
        return None
    probe = directory
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        free = f"{shutil.disk_usage(probe or '/').free / 2**20:,.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return CheckpointError(f"cannot write to {directory}: {e.strerror or os.strerror(e.errno)} "
                           f"({free}); free some space or pass a writable {flag}")


@contextlib.contextmanager
def atomic_dir(target: str, flag: str = "--out"):
    """Yield a fresh temp dir next to `target`; on success it is published as `target` (fsync,
    rename), on any error removed, a disk error raised as one line (`disk_error`, `flag`)."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    tmp = temp_dir_for(target)
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        yield tmp
        publish_dir(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = disk_error(e, parent, flag)
        if error is None:
            raise
        raise error from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
