"""One job per output folder: the folder itself locked for the job's life, and a lock file saying who holds it.

`FolderLock(folder, job).acquire(log)` takes an exclusive `flock` on the folder (on a descriptor of the directory, so
renaming or deleting anything inside it changes nothing), then writes `folder/LOCK_NAME` afresh with the job's kind,
pid, host and start time. The operating system releases a flock when its process ends, however it ends (kill -9
included), so a lock file found when the folder's lock is free is stale: its job is gone, and the message names it.
A second job while the first runs is refused, naming the folder and the holder (or saying the lock file was deleted).
`release()` deletes the file and unlocks the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from .errors import EcellmError
from .files import refuse_link, write_text_atomically

LOCK_NAME = "ecellm.lock"


class FolderBusy(EcellmError, RuntimeError):
    """Another live job holds the folder's lock."""


def _holder(path: Path) -> tuple[str, str]:
    """The lock file at `path` in words: its job's kind and who it is ('training run', 'pid 123 on host h, started
    2026-12-04 12:00:00 UTC')."""
    try:
        text = refuse_link(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "job", f"unknown (its lock file {path} was deleted)"
    try:
        info = json.loads(text)
        return info.get("job", "ecellm job"), f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "ecellm job", f"an unreadable lock ({text[:80]!r})"


class FolderLock:
    """The lock of one output folder (see the module docstring).

    Args:
        folder: the output folder; created (with its parents) by `acquire`.
        job: what holds it, for the lock file and the messages ("training run", "evaluation", "data build").
    """

    def __init__(self, folder: str | Path, job: str):
        self.folder, self.job, self._fd = Path(folder), job, None
        self.path = self.folder / LOCK_NAME

    def acquire(self, log: Callable[[str], None]) -> None:
        """Lock the folder, or raise `FolderBusy` naming the folder and the job that holds it. A stale lock file (its
        job ended without releasing it) is replaced and `log` says whose it was. A symbolic link where the lock file
        goes is refused (`ecellm.files.LinkRefused`), before anything is written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            job, who = _holder(self.path)
            raise FolderBusy(f"{self.folder} is in use by another {job}: {who} (lock file {self.path}); wait for it "
                             "to end, or choose another folder") from None
        try:
            if refuse_link(self.path).exists():
                log(f"taking over the stale lock {self.path} of {_holder(self.path)[1]}: that job ended without "
                    "releasing it")
            me = {"job": self.job, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            write_text_atomically(self.path, json.dumps(me))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Delete the lock file and unlock the folder (nothing to do when not held)."""
        if self._fd is None:
            return
        if not self.path.is_symlink():
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
