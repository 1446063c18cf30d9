"""Crash-safe file writes: the one way this project replaces a file or a folder.

A reader sees the old file or the new one, never a torn one: the bytes go to a temp file in the
same folder, are fsynced, renamed over the target, and the folder is fsynced so the rename itself
survives a power cut. ``swap_directory`` does the same for a whole folder (a fetched adapter, an
exported vLLM directory).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from registry import faults

TEMP_PREFIX = ".tmp-"  # ``registry doctor`` and the blob store recognise partial writes by it


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (str as UTF-8) to ``path``: temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        faults.point("atomic_write.before_rename")  # crash tests: a torn write must never be seen
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj, **dumps_options) -> None:
    """``atomic_write`` of ``json.dumps(obj, **dumps_options)``."""
    atomic_write(path, json.dumps(obj, **dumps_options))


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (tensors made contiguous and moved to the CPU)."""
    from safetensors.torch import save

    atomic_write(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def swap_directory(staging: Path, target: Path) -> None:
    """Replace the folder ``target`` with ``staging`` (same parent). Its files are flushed first; on
    Linux the two are exchanged in one ``renameat2(RENAME_EXCHANGE)``, so a reader (or a crash) sees
    the old complete folder or the new one, never neither; elsewhere the old one is moved aside
    first. What is left behind by a crash is named ``.tmp-*`` / ``.old-*`` (``remove_stale``)."""
    from registry import faults

    for path in staging.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(staging)
    if target.exists() and _exchange(staging, target):
        faults.point("swap.after_exchange")
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old folder
    elif target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        faults.point("swap.between_renames")
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_dir(target.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where the
    platform or file system cannot."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def remove_stale(directory: Path, prefixes: tuple[str, ...] = (TEMP_PREFIX, ".old-"), age_s: float = 3600.0) -> list[Path]:
    """Delete entries of ``directory`` named with ``prefixes`` and untouched for ``age_s`` (what a
    killed writer left; a live one's are younger). Returns what was deleted."""
    import time

    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        try:
            stale = path.name.startswith(prefixes) and time.time() - path.lstat().st_mtime > age_s
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed
