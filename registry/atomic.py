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
    """Replace the folder ``target`` with ``staging`` (same parent): the old one is moved aside, the
    new one renamed in, the old one removed. A reader sees one complete folder or the other."""
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_dir(target.parent)
