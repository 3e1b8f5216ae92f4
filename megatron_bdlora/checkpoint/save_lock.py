"""One writer per save directory: ROOT/.lock holds the writing job's host, pid and start time.

`SaveLock(root).acquire()` (rank 0, before training) refuses a second job with one line naming
the first; a lock whose process is gone (same host, pid dead or reused) is stale and taken over.
`check_unlocked(root)` is the read-only form the launcher's pre-flight uses.
"""

import json
import os
import re
import socket
import time

from megatron_bdlora.errors import InputError

LOCK = ".lock"
# what the error may quote of a lock file's fields (it is read, so not trusted)
_SHOWN = {"host": r"[\w.-]{1,64}", "pid": r"\d{1,10}", "since": r"[\d: -]{1,19}"}


def _stat(pid: int) -> list | None:
    """The fields of /proc/PID/stat after the command name (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (tells a reused pid apart)."""
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell from here: the message says how to clear it
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    fields = _stat(pid)
    # a dead rank that nobody has reaped yet is a zombie: gone for our purposes
    if fields is None or fields[0] == "Z":
        return False
    return owner.get("start") is None or owner.get("start") == int(fields[19])


def _owner(path: str) -> dict | None:
    try:
        with open(path) as f:
            owner = json.loads(f.read(4096))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: stale (the lock is written whole, by link)
    return owner if isinstance(owner, dict) else {}


def check_unlocked(root: str) -> None:
    """InputError if a live job holds ROOT's lock."""
    path = os.path.join(root, LOCK)
    owner = _owner(path)
    if owner and _alive(owner):
        shown = {k: str(owner.get(k)) if re.fullmatch(p, str(owner.get(k))) else "?"
                 for k, p in _SHOWN.items()}
        raise InputError(f"--save {root} is in use by another job (host {shown['host']}, pid "
                         f"{shown['pid']}, since {shown['since']}); stop that job or save "
                         f"elsewhere (if it is gone, delete {path})")


class SaveLock:
    def __init__(self, root: str):
        self.path = os.path.join(root, LOCK)
        self.root = root
        self.held = False

    def acquire(self) -> "SaveLock":
        os.makedirs(self.root, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_ticks(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(me, f)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic: the lock appears complete or not at all
                    self.held = True
                    return self
                except FileExistsError:
                    check_unlocked(self.root)
                    os.remove(self.path)  # stale: its process is gone
            check_unlocked(self.root)
            raise InputError(f"cannot take the lock {self.path}; delete it if no job uses {self.root}")
        finally:
            os.remove(tmp)

    def release(self) -> None:
        if self.held and (_owner(self.path) or {}).get("pid") == os.getpid():
            os.remove(self.path)
        self.held = False
