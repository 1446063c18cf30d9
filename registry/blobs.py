"""Content-addressed blob stores: identical bytes are stored once, under their sha256.

Two implementations of one small interface (``BlobStore``):

- ``LocalBlobStore``: ``<home>/blobs/sha256/ab/<digest>`` (the default);
- ``S3BlobStore``: ``s3://bucket/prefix/sha256/ab/<digest>`` in any S3-compatible object store
  (``REGISTRY_BLOB_URL=s3://bucket/prefix``; endpoint and credentials from the usual AWS variables:
  ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``).
  Reads go through a local, size-limited cache (``<home>/blob-cache``, ``$REGISTRY_BLOB_CACHE_BYTES``,
  least recently used evicted first); every download is hashed before it enters the cache.

We use boto3 for S3: it is the reference client, reads the AWS variables and config files users
already have, presigns URLs, and its retries/timeouts are configurable. (obstore is faster but
young; s3fs adds a filesystem layer we do not need for whole-object puts and gets.)

Deleting a blob races an add that is about to reference it (the blob is written before the row
commits). On one machine ``guard()`` closes that with file locks. Object storage is shared by
machines that share no locks, so the S3 store also never deletes an object younger than a grace
period (``$REGISTRY_BLOB_GRACE_S``, default one hour), and an add that finds its bytes already
stored refreshes the object's age (a copy onto itself): an add in flight on another machine is
never younger than the grace period allows to delete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from urllib.parse import urlparse

from registry.atomic import TEMP_PREFIX, atomic_write
from registry.errors import IntegrityError, RegistryError

CHUNK = 1 << 20
DEFAULT_CACHE_BYTES = 4 << 30
DEFAULT_GRACE_S = 3600.0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _shard(digest: str) -> str:
    return f"sha256/{digest[:2]}/{digest}"


class BlobStore:
    """The interface both stores implement (``Registry.blobs``)."""

    location: str  # named in error messages

    @contextlib.contextmanager
    def guard(self, *, exclusive: bool = False):
        """Adds hold it shared from ``put`` until their row commits; deletions hold it exclusive.
        A waiting deletion blocks new adds (the ``intent`` lock), so adds cannot starve it."""
        from registry.locks import file_lock

        intent, main = self._lock_dir / ".delete-intent.lock", self._lock_dir / ".adds.lock"
        if exclusive:
            with file_lock(intent), file_lock(main):
                yield
            return
        with file_lock(intent, shared=True):
            pass  # wait while a deletion is queued
        with file_lock(main, shared=True):
            yield

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` if absent and return its digest (pass ``digest`` when just hashed)."""
        raise NotImplementedError

    def exists(self, digest: str) -> bool:
        raise NotImplementedError

    def local_path(self, digest: str) -> Path:
        """A local file holding the blob (the S3 store downloads it into its cache, verified)."""
        raise NotImplementedError

    def read(self, digest: str) -> bytes:
        """The blob's bytes, checked against ``digest`` (``IntegrityError`` if missing or corrupt)."""
        data = self.local_path(digest).read_bytes()
        if sha256_bytes(data) != digest:
            raise IntegrityError(f"blob {digest[:12]} in {self.location} does not match its digest: run `registry doctor`")
        return data

    def problem(self, digest: str) -> str | None:
        """``"missing"`` or ``"corrupt"`` after re-hashing the stored bytes, else None (doctor)."""
        raise NotImplementedError

    def restore(self, digest: str, data: bytes) -> None:
        """Overwrite a missing or corrupt blob with intact bytes (doctor --repair)."""
        raise NotImplementedError

    def all_digests(self) -> set[str]:
        raise NotImplementedError

    def delete_unreferenced(self, digest: str) -> bool:
        """Delete a blob the caller found unreferenced under ``guard(exclusive=True)``; False if kept."""
        raise NotImplementedError

    def partial_writes(self) -> list[Path]:
        """Temp files of interrupted writes (doctor)."""
        return []

    def presigned_url(self, digest: str, expires_s: int = 300) -> str | None:
        """A URL that serves the blob without this process (None where the store has none)."""
        return None


class LocalBlobStore(BlobStore):
    """Immutable blobs in a local folder, addressed by their sha256."""

    def __init__(self, root: Path):
        self.root = root
        self.location = str(root)
        self._lock_dir = root

    def path(self, digest: str) -> Path:
        return self.root / _shard(digest)

    local_path = path

    def put(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or sha256_bytes(data)
        target = self.path(digest)
        if not target.exists():
            atomic_write(target, data)
        return digest

    def read(self, digest: str) -> bytes:
        if not self.path(digest).exists():
            raise IntegrityError(f"blob {digest[:12]} is missing from {self.location}: run `registry doctor`")
        return super().read(digest)

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def problem(self, digest: str) -> str | None:
        path = self.path(digest)
        if not path.exists():
            return "missing"
        return None if sha256_file(path) == digest else "corrupt"

    def restore(self, digest: str, data: bytes) -> None:
        atomic_write(self.path(digest), data)

    def all_digests(self) -> set[str]:
        base = self.root / "sha256"
        if not base.exists():
            return set()
        return {p.name for p in base.glob("??/*") if not p.name.startswith(TEMP_PREFIX)}

    def delete_unreferenced(self, digest: str) -> bool:
        self.path(digest).unlink(missing_ok=True)
        return True

    def partial_writes(self) -> list[Path]:
        base = self.root / "sha256"
        return sorted(base.glob(f"??/{TEMP_PREFIX}*")) if base.exists() else []


class S3BlobStore(BlobStore):
    """Blobs in an S3-compatible bucket under ``prefix``, read through a local verified cache."""

    def __init__(self, url: str, cache_root: Path, *, cache_bytes: int | None = None,
                 grace_s: float | None = None, client=None):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise RegistryError(f"blob URL must look like s3://bucket/prefix: {url!r}")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.cache_root = cache_root
        self.cache_bytes = cache_bytes if cache_bytes is not None else int(
            os.environ.get("REGISTRY_BLOB_CACHE_BYTES", DEFAULT_CACHE_BYTES))
        self.grace_s = grace_s if grace_s is not None else float(os.environ.get("REGISTRY_BLOB_GRACE_S", DEFAULT_GRACE_S))
        self._client = client
        self._lock_dir = cache_root
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        self.location = f"{url} at {self.endpoint}"

    # -- the S3 client, and errors as one line -----------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise RegistryError("S3 blob storage needs boto3: pip install 'lora-registry[s3]'") from None
            config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                            signature_version="s3v4")
            endpoint = None if self.endpoint == "AWS S3" else self.endpoint
            self._client = boto3.client("s3", endpoint_url=endpoint, config=config)
        return self._client

    def _call(self, method: str, **params):
        """``client.<method>(Bucket=..., **params)`` with every failure as one ``RegistryError`` line."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, **params)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound", "412", "PreconditionFailed"):
                raise
            message = err.response.get("Error", {}).get("Message") or code
            raise RegistryError(f"object store {self.endpoint} (bucket {self.bucket}): {code}: {message}") from None
        except BotoCoreError as err:
            raise RegistryError(f"object store {self.endpoint} (bucket {self.bucket}): {err}") from None

    @staticmethod
    def _code(err) -> str:
        return err.response.get("Error", {}).get("Code", "")

    def key(self, digest: str) -> str:
        return f"{self.prefix}/{_shard(digest)}" if self.prefix else _shard(digest)

    # -- the interface -------------------------------------------------------------------------------
    def put(self, data: bytes, digest: str | None = None) -> str:
        from botocore.exceptions import ClientError

        digest = digest or sha256_bytes(data)
        key = self.key(digest)
        try:
            self._call("put_object", Key=key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            if self._code(err) not in ("412", "PreconditionFailed"):
                raise
            # Already stored: refresh its age so a grace-period deletion cannot take it from this add.
            self._call("copy_object", Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                       MetadataDirective="REPLACE", Metadata={"touched": str(time.time())})
        return digest

    def exists(self, digest: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("head_object", Key=self.key(digest))
            return True
        except ClientError:
            return False

    def _download(self, digest: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            body = self._call("get_object", Key=self.key(digest))["Body"]
        except ClientError:
            raise IntegrityError(f"blob {digest[:12]} is missing from {self.location}: run `registry doctor`") from None
        with contextlib.closing(body):
            return body.read()

    def local_path(self, digest: str) -> Path:
        cached = self.cache_root / _shard(digest)
        if cached.exists():
            os.utime(cached)  # recently used: evicted last
            return cached
        data = self._download(digest)
        if sha256_bytes(data) != digest:
            raise IntegrityError(f"blob {digest[:12]} in {self.location} does not match its digest: run `registry doctor`")
        atomic_write(cached, data)
        evict_least_recent(sorted(self.cache_root.glob("sha256/??/*")), self.cache_bytes, keep=cached)
        return cached

    def problem(self, digest: str) -> str | None:
        try:
            data = self._download(digest)
        except IntegrityError:
            return "missing"
        return None if sha256_bytes(data) == digest else "corrupt"

    def restore(self, digest: str, data: bytes) -> None:
        self._call("put_object", Key=self.key(digest), Body=data)
        (self.cache_root / _shard(digest)).unlink(missing_ok=True)

    def _objects(self):
        """(digest, last-modified epoch seconds) of every blob under the prefix."""
        start = f"{self.prefix}/sha256/" if self.prefix else "sha256/"
        token = None
        while True:
            page = self._call("list_objects_v2", Prefix=start, **({"ContinuationToken": token} if token else {}))
            for item in page.get("Contents", []):
                yield item["Key"].rsplit("/", 1)[-1], item["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def all_digests(self) -> set[str]:
        return {digest for digest, _ in self._objects()}

    def delete_unreferenced(self, digest: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            head = self._call("head_object", Key=self.key(digest))
        except ClientError:
            return True  # already gone
        if time.time() - head["LastModified"].timestamp() < self.grace_s:
            return False  # young: may belong to an add in flight on another machine
        self._call("delete_object", Key=self.key(digest))
        (self.cache_root / _shard(digest)).unlink(missing_ok=True)
        return True

    def presigned_url(self, digest: str, expires_s: int = 300) -> str | None:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self.key(digest)},
                                                  ExpiresIn=expires_s)


def evict_least_recent(paths: list[Path], limit_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used of ``paths`` (files or folders, by mtime) until their total
    size is at most ``limit_bytes``; ``keep`` is never deleted. Returns what was deleted."""
    import shutil

    def size(path: Path) -> int:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size

    entries = []
    for path in paths:
        if path.name.startswith(TEMP_PREFIX):
            continue
        try:
            entries.append((path.stat().st_mtime, size(path), path))
        except OSError:
            continue  # deleted meanwhile
    total = sum(s for _, s, _ in entries)
    deleted = []
    for _, entry_size, path in sorted(entries, key=lambda e: e[0]):
        if total <= limit_bytes:
            break
        if keep is not None and path == keep:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        total -= entry_size
        deleted.append(path)
    return deleted


def open_blob_store(home: Path, url: str | None = None) -> BlobStore:
    """The registry's blob store: ``url`` / ``$REGISTRY_BLOB_URL`` (s3://...), else ``<home>/blobs``."""
    url = url or os.environ.get("REGISTRY_BLOB_URL")
    if not url or url.startswith("file:"):
        return LocalBlobStore(Path(urlparse(url).path) if url else home / "blobs")
    if url.startswith("s3://"):
        return S3BlobStore(url, home / "blob-cache")
    raise RegistryError(f"unsupported blob URL {url!r}: use s3://bucket/prefix (or leave REGISTRY_BLOB_URL unset)")
