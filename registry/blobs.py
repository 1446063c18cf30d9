"""Content-addressed file store: ``<home>/blobs/sha256/ab/<digest>``; identical bytes are stored once."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from registry.atomic import TEMP_PREFIX, atomic_write

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class BlobStore:
    """Immutable blobs addressed by their sha256.

    A blob is written before the SQL row that references it commits, so deleting one that looks
    unreferenced could race an add in flight. ``guard()`` closes that: an add holds it shared from
    ``put`` until its row is committed, a deletion (``remove``, ``doctor --repair``) holds it
    exclusive while it re-checks SQL and unlinks. A waiting deletion blocks new adds (the
    ``intent`` lock), so a steady stream of adds cannot starve it.
    """

    def __init__(self, root: Path):
        self.root = root

    @contextlib.contextmanager
    def guard(self, *, exclusive: bool = False):
        """Shared: blobs put inside the block survive until it ends. Exclusive: no add is in flight."""
        from registry.locks import file_lock

        intent, main = self.root / ".delete-intent.lock", self.root / ".adds.lock"
        if exclusive:
            with file_lock(intent), file_lock(main):
                yield
            return
        with file_lock(intent, shared=True):
            pass  # wait while a deletion is queued
        with file_lock(main, shared=True):
            yield

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
        return {p.name for p in base.glob("??/*") if not p.name.startswith(TEMP_PREFIX)}

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
