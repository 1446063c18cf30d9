"""Content-addressed file store: ``<home>/blobs/sha256/ab/<digest>``; identical bytes are stored once."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BlobStore:
    """Immutable blobs addressed by their sha256."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (once) and return its digest; pass ``digest`` when the caller just hashed it."""
        digest = digest or sha256_bytes(data)
        target = self.path(digest)
        if not target.exists():
            atomic_write(target, data)
        return digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def all_digests(self) -> set[str]:
        base = self.root / "sha256"
        if not base.exists():
            return set()
        return {p.name for p in base.glob("??/*") if not p.name.startswith(".tmp-")}

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
