"""One job per output folder: a lock file held for the job's life.

`FolderLock(folder).acquire()` creates `folder/LOCK_NAME` holding the job's pid, host and start time, and takes an
exclusive `flock` on it. The operating system releases a flock when its process ends, however it ends (kill -9
included), so a lock file that can be locked again is stale: its holder is gone. It is then taken over, and the
message names the job that left it. A second job while the first runs is refused, naming the folder and the holder.
`release()` deletes the file; a job killed before that leaves it behind, stale.
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

LOCK_NAME = "ecellm.lock"


class FolderBusy(EcellmError, RuntimeError):
    """Another live job holds the folder's lock."""


def _holder(text: str) -> str:
    """A lock file's content in words: 'pid 123 on host h, started 2026-12-04 12:00:00 UTC'."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return f"an unreadable lock ({text[:80]!r})"


class FolderLock:
    """The lock of one output folder (see the module docstring).

    Args:
        folder: the output folder; created (with its parents) by `acquire`.
        job: what holds it, for the messages ("training run", "evaluation").
    """

    def __init__(self, folder: str | Path, job: str):
        self.path, self.job, self._fd = Path(folder) / LOCK_NAME, job, None

    def acquire(self, log: Callable[[str], None]) -> None:
        """Take the lock, or raise `FolderBusy` naming the folder and the job that holds it. A stale lock (its job
        ended without releasing it) is taken over and `log` says whose it was."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held_by = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                os.close(fd)
                raise FolderBusy(f"{self.path.parent} is in use by another {self.job}: {held_by} (lock file "
                                 f"{self.path}); wait for it to end, or choose another folder") from None
            # The file may have been released and deleted between our open and our flock: lock the one at the path.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        left = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if left:
            log(f"taking over the stale lock {self.path} of {_holder(left)}: that job ended without releasing it")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Delete the lock file and unlock (nothing to do when not held)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
