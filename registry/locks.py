"""Cross-process locks on files (``fcntl.flock``): what serialises the writers SQL cannot.

Four things take one: the FAISS index (its save is a merge with SQL, ``registry.search``), blob
deletion against adds in flight (``registry.store``: an add holds the blob lock shared from writing
its blob until its row is committed; a deletion holds it exclusive), a SQLite migration
(``registry.db``) and a harvest's work folder (``harvest.service``). A lock is released when its
holder exits, SIGKILL included, so a killed writer never leaves one behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path


class LockBusy(RuntimeError):
    """The lock was not free within the timeout."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, shared: bool = False, timeout: float | None = None):
    """Hold ``path``'s lock (created if needed) for the block; ``timeout`` None waits for ever,
    else ``LockBusy`` after ``timeout`` seconds (0: try once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        if timeout is None:
            fcntl.flock(fd, mode)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockBusy(f"{path} is held by another process") from None
                    time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
