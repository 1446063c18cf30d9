"""Fetch adapters from a ``registry serve`` server: what a vLLM or LoRAX host calls before loading.

    from registry.client import fetch
    path = fetch("http://registry:8080", "math@prod", "/var/cache/adapters")
    # path is a PEFT directory: adapter_config.json + adapter_model.safetensors

Standard library only (urllib), so a serving host needs nothing but this package.

How it stays correct:

- the REF is resolved once (``GET /v1/adapters/{ref}``) to a version and a digest; the files are
  then downloaded by ``sha256:<digest>``, so an alias that moves mid-download never yields a mix
  of two versions;
- each file is hashed while it streams and compared with the digests the metadata named; the
  adapter digest is recomputed from the two; any mismatch raises ``IntegrityError`` and nothing
  is kept;
- files go to a temporary folder inside the cache that is renamed into place only when complete
  and verified, so a reader sees the whole directory or nothing;
- the cache is keyed by digest (``<cache>/adapters/<digest>/``). An immutable REF (``name@3``,
  ``sha256:...``) fetched before is answered from a small per-server map without any request; an
  alias or latest REF costs one metadata request, then reuses the cached directory;
- an interrupted download resumes with ``Range`` + ``If-Range`` (up to 3 attempts per file);
- every request is retried after a connection error or a 5xx answer (``RETRIES`` more times, the
  wait doubling from ``RETRY_BACKOFF``): urllib3's ``Retry(connect, read, status_forcelist=5xx,
  backoff_factor)`` policy, written out here so the client keeps to the standard library. A 4xx is
  an answer, never retried.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.parse import quote

from registry import faults
from registry.atomic import TEMP_PREFIX, atomic_write, fsync_dir, remove_stale, swap_directory
from registry.errors import IntegrityError, NotFound, RegistryError
from registry.refs import parse_ref, validate_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RECORD_FILE = "registry.json"
CHUNK = 1 << 20
ATTEMPTS = 3
RETRIES = 3  # extra tries of a request after a connection error or a 5xx
RETRY_BACKOFF = 0.25  # seconds before the first retry, doubled before each next one
DIGEST_CHARS = set("0123456789abcdef")


class ServerError(RegistryError):
    """The server answered with an error (its JSON ``error`` message is the text)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status = status


@dataclass
class Fetched:
    """A fetched adapter: its PEFT directory in the cache and what the REF resolved to."""

    path: Path
    ref: str  # name@version
    name: str
    version: int
    digest: str
    from_cache: bool
    requests: int  # HTTP requests this fetch made (0 for an immutable REF already cached)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def default_cache_dir() -> Path:
    """``$REGISTRY_CLIENT_CACHE``, else ``$XDG_CACHE_HOME/lora-registry/client`` (``~/.cache``)."""
    if os.environ.get("REGISTRY_CLIENT_CACHE"):
        return Path(os.environ["REGISTRY_CLIENT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora-registry" / "client"


def fetch(base_url: str, ref: str, cache_dir: str | os.PathLike | None = None, token: str | None = None,
          *, timeout: float = 60.0) -> Path:
    """A verified PEFT directory for ``ref`` from the server at ``base_url``, cached by digest.

    ``token`` defaults to ``$REGISTRY_TOKEN`` (needed only when the server protects reads).
    Raises ``NotFound`` for an unknown REF, ``IntegrityError`` when bytes do not match their
    digest, ``ServerError``/``RegistryError`` for other failures; nothing partial is left behind.
    """
    return fetch_adapter(base_url, ref, cache_dir, token, timeout=timeout).path


def fetch_adapter(base_url: str, ref: str, cache_dir: str | os.PathLike | None = None,
                  token: str | None = None, *, timeout: float = 60.0) -> Fetched:
    """``fetch`` with the details: the resolved version and digest, and whether the cache answered."""
    parsed = parse_ref(ref)  # refuse malformed REFs before any request
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    http = _Http(base_url, token if token is not None else os.environ.get("REGISTRY_TOKEN"), timeout)
    immutable = parsed.digest is not None or parsed.version is not None
    ref_file = _ref_file(cache, http.base_url, parsed)

    if immutable:
        digest = parsed.digest if parsed.digest and len(parsed.digest) == 64 else _read_ref_file(ref_file)
        if digest and (record := _read_record(cache, digest)) is not None:
            return _fetched(cache, record, from_cache=True, requests=0)

    meta = http.json(f"/v1/adapters/{quote(str(parsed), safe='@:')}")
    expected = _expected(meta)
    _check_answers(parsed, expected)
    digest = expected["digest"]
    record = _read_record(cache, digest)
    from_cache = record is not None
    if record is None:
        record = _download(http, cache, expected)
    if immutable:
        atomic_write(ref_file, json.dumps({"digest": digest}).encode())
    return _fetched(cache, record, from_cache=from_cache, requests=http.requests)


def sync_vllm(base_url: str, refs: list[str], directory: str | os.PathLike,
              cache_dir: str | os.PathLike | None = None, token: str | None = None,
              *, timeout: float = 60.0) -> list[dict]:
    """Keep a vLLM/LoRAX resolver directory (``<directory>/<name>/adapter_config.json``) in sync.

    Each REF is fetched through the cache; ``<directory>/<name>`` is replaced (a staging folder
    swapped in) only when its ``registry.json`` names another digest. Returns one record per REF
    with ``changed``. Two REFs of the same name are refused.
    """
    root = Path(directory).expanduser()
    fetched = [fetch_adapter(base_url, ref, cache_dir, token, timeout=timeout) for ref in refs]
    names: dict[str, str] = {}
    for ref, item in zip(refs, fetched):
        if item.name in names:
            raise RegistryError(f"{names[item.name]} and {ref} both resolve to adapters named {item.name}: "
                                "a resolver directory holds one version per name")
        names[item.name] = ref
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)  # folders a killed sync left (older than an hour)
    results = []
    for ref, item in zip(refs, fetched):
        target = root / validate_name(item.name)
        current = _read_json(target / RECORD_FILE) or {}
        changed = not (current.get("digest") == item.digest and (target / CONFIG_FILE).is_file()
                       and (target / WEIGHTS_FILE).is_file())
        if changed:
            staging = Path(tempfile.mkdtemp(dir=root, prefix=TEMP_PREFIX))
            try:
                for name in (CONFIG_FILE, WEIGHTS_FILE):
                    shutil.copyfile(item.path / name, staging / name)
                (staging / RECORD_FILE).write_text(json.dumps({"ref": item.ref, "digest": item.digest,
                                                                "server": base_url.rstrip("/")}))
                swap_directory(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        results.append({"requested": ref, "ref": item.ref, "digest": item.digest, "path": str(target),
                        "changed": changed})
    return results


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


class _SameOriginAuth(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never send the registry's token to another host (a presigned
    object-store URL carries its own credentials and refuses a second Authorization)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _redirected(http: "_Http", response) -> bool:
    """Whether ``response`` came from another origin than the registry server (a redirect)."""
    return not response.geturl().startswith(http.base_url + "/")


class _Http:
    def __init__(self, base_url: str, token: str | None, timeout: float):
        if not base_url.startswith(("http://", "https://")):
            raise RegistryError(f"server URL must start with http:// or https://: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.requests = 0
        self._opener = urllib.request.build_opener(_SameOriginAuth)

    def open(self, path: str, headers: dict | None = None):
        request = urllib.request.Request(self.base_url + path, headers=dict(headers or {}))
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        for attempt in range(RETRIES + 1):
            self.requests += 1
            last = attempt == RETRIES
            try:
                return self._opener.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as err:
                if err.code < 500 or last:
                    raise _server_error(err) from None
                err.close()  # a 5xx: the server may be restarting or overloaded
            except (urllib.error.URLError, OSError, HTTPException) as err:
                if last:
                    reason = getattr(err, "reason", err)
                    raise RegistryError(f"cannot reach {self.base_url}: {reason}") from None
            time.sleep(RETRY_BACKOFF * 2 ** attempt)

    def json(self, path: str) -> dict:
        with self.open(path, {"Accept": "application/json"}) as response:
            try:
                return json.loads(response.read(1 << 24))
            except ValueError:
                raise RegistryError(f"{self.base_url}{path} did not answer JSON") from None


def _server_error(err: urllib.error.HTTPError) -> RegistryError:
    try:
        message = json.loads(err.read(1 << 16)).get("error") or err.reason
    except (ValueError, AttributeError, OSError):
        message = err.reason
    finally:
        err.close()
    if err.code == 404:
        return NotFound(str(message))
    if err.code in (401, 403):
        return ServerError(err.code, f"{message} (pass a token or set REGISTRY_TOKEN)")
    return ServerError(err.code, str(message))


# --------------------------------------------------------------------------------------------
# Verifying and caching
# --------------------------------------------------------------------------------------------


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= DIGEST_CHARS


def _expected(meta: dict) -> dict:
    """What the files must hash to, from the metadata; refuses anything malformed or inconsistent."""
    try:
        expected = {key: meta[key] for key in ("ref", "name", "version", "digest", "config_sha256",
                                               "weights_sha256", "size_bytes")}
    except (KeyError, TypeError):
        raise IntegrityError("the server's metadata lacks the adapter's digests") from None
    if not all(_is_digest(expected[k]) for k in ("digest", "config_sha256", "weights_sha256")):
        raise IntegrityError("the server's metadata holds malformed digests")
    validate_name(expected["name"])
    if not isinstance(expected["version"], int) or not isinstance(expected["size_bytes"], int):
        raise IntegrityError("the server's metadata holds a malformed version or size")
    combined = hashlib.sha256(f"{expected['config_sha256']}:{expected['weights_sha256']}".encode()).hexdigest()
    if combined != expected["digest"]:
        raise IntegrityError(f"the server's digests for {expected['ref']} are inconsistent")
    expected["base_model"] = meta.get("base_model")
    return expected


def _check_answers(parsed, expected: dict) -> None:
    """The metadata must be for the REF asked about (it decides what gets cached under that REF)."""
    if parsed.digest:
        ok = expected["digest"].startswith(parsed.digest) or expected["weights_sha256"].startswith(parsed.digest)
    else:
        ok = expected["name"] == parsed.name and (parsed.version is None or expected["version"] == parsed.version)
    if not ok:
        raise IntegrityError(f"the server answered {expected['ref']} (sha256:{expected['digest'][:12]}) for {parsed}")


def _download(http: _Http, cache: Path, expected: dict) -> dict:
    """Download both files by digest into a staging folder, verify, rename into place."""
    digest = expected["digest"]
    adapters = cache / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    remove_stale(adapters)  # downloads a killed client left (older than an hour)
    staging = Path(tempfile.mkdtemp(dir=adapters, prefix=TEMP_PREFIX))
    try:
        for name, sha, size in ((CONFIG_FILE, expected["config_sha256"], None),
                                (WEIGHTS_FILE, expected["weights_sha256"], expected["size_bytes"])):
            _download_file(http, f"/v1/adapters/sha256:{digest}/files/{name}", staging / name, sha, size)
        record = {key: expected[key] for key in ("ref", "name", "version", "digest", "config_sha256",
                                                 "weights_sha256", "size_bytes", "base_model")}
        record["server"] = http.base_url
        atomic_write(staging / RECORD_FILE, json.dumps(record, indent=2).encode())
        fsync_dir(staging)
        target = adapters / digest
        try:
            os.rename(staging, target)
        except OSError:
            if _read_record(cache, digest) is None:  # not a concurrent fetch that won the race
                raise
            shutil.rmtree(staging, ignore_errors=True)
        return record
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _download_file(http: _Http, path: str, dest: Path, sha: str, size: int | None) -> None:
    """Stream one file, hashing as it comes; resume with Range after a dropped connection."""
    hasher, written = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        for attempt in range(ATTEMPTS):
            headers = {"Range": f"bytes={written}-", "If-Range": f'"{sha}"'} if written else {}
            try:
                with http.open(path, headers) as response:
                    etag = response.headers.get("ETag")  # the sha256 from our server; an object store's is its own
                    if etag and etag.strip('"') != sha and not _redirected(http, response):
                        raise IntegrityError(f"{path}: the server sent {etag}, expected sha256 {sha[:12]}")
                    if written and (response.status != 206 or _range_start(response) != written):
                        out.seek(0)  # the server sent the whole file (or another range): restart
                        out.truncate()
                        hasher, written = hashlib.sha256(), 0
                    length = response.headers.get("Content-Length", "")
                    end = written + int(length) if length.isdigit() else None
                    while block := response.read(CHUNK):
                        hasher.update(block)
                        out.write(block)
                        written += len(block)
                        faults.point("client.mid_download")
                        if size is not None and written > size:
                            raise IntegrityError(f"{path}: more bytes than the {size} the metadata named")
                    if end is not None and written < end:
                        raise _Truncated(f"connection closed after {written} of {end} bytes")
                break
            except (OSError, HTTPException, _Truncated) as err:  # dropped mid-body: resume
                if attempt == ATTEMPTS - 1:
                    raise RegistryError(f"download of {path} failed: {err}") from None
        out.flush()
        os.fsync(out.fileno())
    if hasher.hexdigest() != sha or (size is not None and written != size):
        raise IntegrityError(f"{path}: downloaded bytes do not match sha256 {sha[:12]} "
                             f"(got {hasher.hexdigest()[:12]}, {written} bytes): refused")


class _Truncated(Exception):
    """A response body shorter than its Content-Length."""


def _range_start(response) -> int | None:
    """The first byte of a 206 response (``Content-Range: bytes START-END/SIZE``)."""
    value = response.headers.get("Content-Range", "")
    unit, _, spec = value.partition(" ")
    start = spec.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _read_record(cache: Path, digest: str) -> dict | None:
    """The cached adapter's record if its directory is complete (it appears only by rename)."""
    if not _is_digest(digest):
        return None
    directory = cache / "adapters" / digest
    record = _read_json(directory / RECORD_FILE)
    if not record or record.get("digest") != digest:
        return None
    weights = directory / WEIGHTS_FILE
    if not (directory / CONFIG_FILE).is_file() or not weights.is_file():
        return None
    if weights.stat().st_size != record.get("size_bytes"):
        return None
    return record


def _fetched(cache: Path, record: dict, *, from_cache: bool, requests: int) -> Fetched:
    return Fetched(path=cache / "adapters" / record["digest"], ref=record["ref"], name=record["name"],
                   version=record["version"], digest=record["digest"], from_cache=from_cache, requests=requests)


def _ref_file(cache: Path, base_url: str, parsed) -> Path:
    """Where an immutable REF's digest is remembered: per server, since versions are per registry."""
    server = hashlib.sha256(base_url.encode()).hexdigest()[:16]
    if parsed.digest:
        return cache / "refs" / server / "sha256" / parsed.digest
    return cache / "refs" / server / "names" / f"{parsed.name}@{parsed.version}"


def _read_ref_file(path: Path) -> str | None:
    data = _read_json(path)
    return data.get("digest") if data else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


__all__ = ["fetch", "fetch_adapter", "sync_vllm", "Fetched", "ServerError", "default_cache_dir"]
