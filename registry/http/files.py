"""The files of an adapter as the server sends them: the canonical config bytes, the weights blob
(hashed once per process per (size, mtime)), and the deterministic uncompressed tar of the two."""

from __future__ import annotations

import os
import tarfile
import threading
from typing import Any

from registry import peft_io
from registry.blobs import sha256_bytes
from registry.errors import IntegrityError
from registry.http.cache import BoundedDict
from registry.http.replies import CHUNK

FILES = (peft_io.CONFIG_FILE, peft_io.WEIGHTS_FILE)


# --------------------------------------------------------------------------------------------
# The archive: a deterministic uncompressed tar of the two files
# --------------------------------------------------------------------------------------------


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o644, 0, "", ""
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _tar_padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def tar_size(config_size: int, weights_size: int) -> int:
    blocks = lambda n: n + (-n % tarfile.BLOCKSIZE)  # noqa: E731
    return 2 * tarfile.BLOCKSIZE + blocks(config_size) + blocks(weights_size) + 2 * tarfile.BLOCKSIZE


def tar_parts(config: bytes, weights_size: int) -> tuple[bytes, bytes]:
    """The archive's bytes before and after the weights."""
    before = (_tar_header(peft_io.CONFIG_FILE, len(config)) + config + _tar_padding(len(config))
              + _tar_header(peft_io.WEIGHTS_FILE, weights_size))
    return before, _tar_padding(weights_size) + b"\0" * (2 * tarfile.BLOCKSIZE)


# --------------------------------------------------------------------------------------------
# Files by digest, checked once per process
# --------------------------------------------------------------------------------------------


class AdapterFiles:
    """Where each served file's bytes come from, checked against its digest once per process."""

    def __init__(self, registry):
        self.registry = registry
        self._verified: dict[str, tuple[int, int]] = {}  # weights digest -> (size, mtime_ns) seen intact
        self._configs = BoundedDict(4096)  # config digest -> its verified canonical bytes
        self._lock = threading.Lock()

    def cached_config(self, info) -> bytes | None:
        return self._configs.get(info.config_sha256)

    def config_bytes(self, info) -> bytes:
        """The canonical JSON of the stored config: the bytes ``config_sha256`` is taken over
        (kept in memory by digest once checked: content-addressed, so never stale)."""
        from registry.schema import Adapter

        cached = self._configs.get(info.config_sha256)
        if cached is not None:
            return cached
        with self.registry.session() as session:
            config = dict(session.get(Adapter, info.id).peft_config)
        data = peft_io.canonical_json(config)
        if sha256_bytes(data) != info.config_sha256:
            raise IntegrityError(f"stored config of {info.ref} does not match its digest: run `registry doctor`")
        self._configs.put(info.config_sha256, data)
        return data

    def open_weights(self, info) -> tuple[Any, bool]:
        """The weights blob opened for reading, and whether it is known intact at its current
        (size, mtime); if not, ``verify`` must run (in a worker thread) before it is served."""
        try:
            path = self.registry.blobs.local_path(info.weights_sha256)  # S3: downloaded, verified, cached
            handle = open(path, "rb")  # noqa: SIM115 - closed by the reply
        except FileNotFoundError:
            raise IntegrityError(f"weights of {info.ref} are missing from the blob store: run `registry doctor`") from None
        stat = os.fstat(handle.fileno())
        return handle, self._verified.get(info.weights_sha256) == (stat.st_size, stat.st_mtime_ns)

    def verify(self, info, handle) -> None:
        """Hash the open blob; remember its (size, mtime) as intact, or raise ``IntegrityError``."""
        import hashlib

        stat = os.fstat(handle.fileno())
        hasher, position = hashlib.sha256(), 0
        while block := os.pread(handle.fileno(), CHUNK, position):
            hasher.update(block)
            position += len(block)
        if hasher.hexdigest() != info.weights_sha256:
            raise IntegrityError(f"weights of {info.ref} do not match their digest: run `registry doctor`")
        with self._lock:
            self._verified[info.weights_sha256] = (stat.st_size, stat.st_mtime_ns)
