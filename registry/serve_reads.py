"""The hot reads of ``registry serve``, answered from memory in front of FastAPI.

``FastReads`` is an ASGI middleware that takes ``GET /v1/adapters/{ref}``, ``.../prompts``,
``GET|HEAD .../files/{file}`` and ``GET|HEAD .../archive`` off FastAPI's routing, validation and
thread-pool hop, which cost more than the answer itself once SQL is out of the way (everything
else, and any path of another shape, goes on to FastAPI unchanged). The FastAPI routes of the same
paths stay, for ``/docs`` and for servers that mount the app without this layer, and call the same
``Reads`` methods, so both give the same bytes, headers and errors.

Per request, a cached answer costs one change-stamp read (``registry.serve_cache``) and a dict
lookup; a REF seen for the first time since the database last changed costs a few Core queries in
the thread pool. Content-addressed things are kept by digest for the life of the process: config
bytes (checked against ``config_sha256`` once), prompt lists by SQL id, and which weights blobs
were hashed intact at which (size, mtime) — a blob whose size or mtime changed is hashed again
before it is served, so a corrupted blob is never sent.

Weights go out zero-copy: when the protocol offers ``http.response.zerocopysend``
(``registry.serve_http``), the open blob is handed to ``sendfile``; otherwise (another server, the
test client) a slice up to ``SMALL_BODY`` is read at once and larger ones stream in ``CHUNK``s.
ETag (= the file's sha256), ``If-None-Match`` (304), single ``Range``/``If-Range`` (206/416) and
HEAD behave the same on every path.
"""

from __future__ import annotations

import logging
import os
import tarfile
import threading
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from registry import peft_io
from registry.blobs import sha256_bytes
from registry.errors import IntegrityError, InvalidName, NotFound, RegistryError
from registry.refs import parse_ref
from registry.serve_cache import BoundedDict, ChangeStamp, Miss, StampedCache, dumps, load_children, load_info
from registry.serve_http import ZEROCOPY

log = logging.getLogger("registry.server")

FILES = (peft_io.CONFIG_FILE, peft_io.WEIGHTS_FILE)
CHUNK = 1 << 20
SMALL_BODY = 16 << 20  # without zero-copy, bodies up to this size are read at once instead of streamed
IMMUTABLE_MAX_AGE = 365 * 24 * 3600
ERROR_STATUS = ((InvalidName, 400), (NotFound, 404), (IntegrityError, 500), (RegistryError, 400))
PREFIX = "/v1/adapters/"


# --------------------------------------------------------------------------------------------
# Replies: status, headers, then bytes and/or a slice of an open file
# --------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """A response: ``body``, then ``count`` bytes of ``handle`` from ``offset``, then ``suffix``."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    handle: Any = None
    offset: int = 0
    count: int = 0
    suffix: bytes = b""
    head: bool = False  # headers only (Content-Length still the full length)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _header_list(headers: dict, content_type: str | None, length: int | None) -> list[tuple[bytes, bytes]]:
    out = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]
    if content_type:
        out.append((b"content-type", content_type.encode("latin-1")))
    if length is not None:  # None for a 304, which has no body of its own
        out.append((b"content-length", str(length).encode()))
    return out


def json_reply(status: int, data, headers: dict | None = None) -> Reply:
    body = dumps(data)
    return Reply(status, _header_list(headers or {}, "application/json", len(body)), body)


def error_reply(status: int, message: str, headers: dict | None = None) -> Reply:
    return json_reply(status, {"error": message}, headers)


def registry_error_reply(err: RegistryError) -> Reply:
    status = next(code for cls, code in ERROR_STATUS if isinstance(err, cls))
    if status >= 500:
        log.error("integrity problem: %s", err)
    return error_reply(status, str(err))


async def send_reply(scope, send, reply: Reply) -> None:
    """Send ``reply`` on an ASGI connection; the file slice by zero-copy when the server offers it."""
    try:
        await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
        if reply.head or reply.handle is None:
            await send({"type": "http.response.body", "body": b"" if reply.head else reply.body})
            return
        if reply.body:
            await send({"type": "http.response.body", "body": reply.body, "more_body": True})
        if ZEROCOPY in (scope.get("extensions") or {}):
            await send({"type": ZEROCOPY, "file": reply.handle, "offset": reply.offset, "count": reply.count,
                        "more_body": bool(reply.suffix)})
        elif reply.count <= SMALL_BODY:  # one read, one send: much cheaper than streaming small files
            fd = reply.handle.fileno()
            if reply.count <= CHUNK:
                data = os.pread(fd, reply.count, reply.offset)
            else:  # a read of megabytes: off the event loop
                data = await run_in_threadpool(os.pread, fd, reply.count, reply.offset)
            if len(data) != reply.count:
                raise OSError("the blob ended early")
            await send({"type": "http.response.body", "body": data, "more_body": bool(reply.suffix)})
        else:
            position, end = reply.offset, reply.offset + reply.count
            while position < end:
                block = await run_in_threadpool(os.pread, reply.handle.fileno(), min(CHUNK, end - position), position)
                if not block:
                    raise OSError("the blob ended early")
                position += len(block)
                await send({"type": "http.response.body", "body": block,
                            "more_body": position < end or bool(reply.suffix)})
        if reply.suffix:
            await send({"type": "http.response.body", "body": reply.suffix})
    finally:
        reply.close()


class ReplyResponse(Response):
    """A ``Reply`` returned from a FastAPI route."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.status_code = reply.status
        self.background = None

    @property
    def raw_headers(self):  # what Starlette middleware may read
        return self.reply.headers

    async def __call__(self, scope, receive, send) -> None:
        await send_reply(scope, send, self.reply)


# --------------------------------------------------------------------------------------------
# ETag, conditional GET, Range
# --------------------------------------------------------------------------------------------


def etag_of(digest: str) -> str:
    return f'"{digest}"'


def etag_matches(header: str | None, etag: str) -> bool:
    """``If-None-Match`` semantics: weak comparison, ``*`` matches anything."""
    if not header:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """One ``bytes=`` range as (start, end inclusive); None to serve it all; "unsatisfiable" for 416.

    Malformed headers and multi-range requests are ignored (the whole file is sent), as RFC 9110
    allows.
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) or not (first or last):
        return None
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - length), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        return "unsatisfiable"
    return start, min(int(last), size - 1) if last else size - 1


def file_reply(request: dict, etag: str, size: int, media_type: str, headers: dict,
               data: bytes | None = None, handle=None) -> Reply:
    """200/206/304/416 for a file of ``size`` bytes held in ``data`` or open as ``handle``."""
    headers = dict(headers, ETag=etag)
    headers["Accept-Ranges"] = "bytes"
    head = request.get("method") == "HEAD"
    if etag_matches(request.get("if-none-match"), etag):
        if handle is not None:
            handle.close()
        return Reply(304, _header_list(headers, None, None))  # a 304 has no Content-Length of its own
    wanted = parse_range(request.get("range"), size)
    if_range = request.get("if-range")
    if wanted is not None and if_range is not None and if_range.strip() != etag:
        wanted = None  # the client's partial copy is of other bytes: send everything
    if wanted == "unsatisfiable":
        if handle is not None:
            handle.close()
        return error_reply(416, f"range {request.get('range')!r} is outside the {size}-byte file",
                           dict(headers, **{"Content-Range": f"bytes */{size}"}))
    status, start, length = 200, 0, size
    if wanted is not None:
        start, end = wanted
        status, length = 206, end - start + 1
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    header_list = _header_list(headers, media_type, length)
    if handle is not None:
        if head:
            handle.close()
            return Reply(status, header_list, head=True)
        return Reply(status, header_list, handle=handle, offset=start, count=length)
    return Reply(status, header_list, data[start:start + length], head=head)


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
        path = self.registry.blobs.path(info.weights_sha256)
        try:
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


# --------------------------------------------------------------------------------------------
# The reads
# --------------------------------------------------------------------------------------------


@dataclass
class _Meta:
    """A cached metadata answer (valid for one change stamp)."""

    body: bytes
    headers: list = field(default_factory=list)


class Reads:
    """The read endpoints' answers; ``request`` is a dict of the method and the few headers used."""

    def __init__(self, registry, files: AdapterFiles, protect_reads: bool):
        self.registry = registry
        self.files = files
        self.protect_reads = protect_reads
        self.stamp = ChangeStamp(registry.engine)
        self.moving = StampedCache(self.stamp)  # per REF: AdapterInfo and metadata bodies
        self._parsed = BoundedDict()  # REF text -> Ref (parsing is pure)
        self._prompts = BoundedDict()  # adapter id -> prompt list (immutable once added)

    def close(self) -> None:
        self.stamp.close()

    # -- resolving --------------------------------------------------------------------------------
    def parse(self, ref: str):
        parsed = self._parsed.get(ref)
        if parsed is None:
            parsed = parse_ref(ref)  # InvalidName (400) for anything that is not a REF: '..', '/', ...
            self._parsed.put(ref, parsed)
        return parsed

    @staticmethod
    def _immutable(parsed) -> bool:
        return parsed.digest is not None or parsed.version is not None

    async def _cached(self, kind: str, parsed, build):
        """The entry ``build(parsed)`` makes, kept for the current change stamp (misses too)."""
        stamp = self.moving.check()
        key = (kind, str(parsed))
        entry = self.moving.get(key)
        if entry is None:
            def load():
                try:
                    value = build(parsed)
                except NotFound as err:
                    value = Miss(str(err))
                self.moving.put(key, value, stamp)
                return value

            entry = await run_in_threadpool(load)
        if isinstance(entry, Miss):
            raise NotFound(entry.message)
        return entry

    def _load_info(self, parsed):
        with self.registry.engine.connect() as connection:
            return load_info(connection, parsed)

    async def info(self, ref: str):
        parsed = self.parse(ref)
        return await self._cached("info", parsed, self._load_info), self._immutable(parsed)

    def adapter_headers(self, info, immutable: bool) -> dict:
        if immutable:
            cache = f"{'private' if self.protect_reads else 'public'}, max-age={IMMUTABLE_MAX_AGE}, immutable"
        else:
            cache = "no-cache"
        return {"X-Registry-Ref": info.ref, "X-Registry-Digest": info.digest, "Cache-Control": cache}

    # -- endpoints --------------------------------------------------------------------------------
    def _load_meta(self, parsed) -> _Meta:
        with self.registry.engine.connect() as connection:
            info = load_info(connection, parsed)
            children = load_children(connection, info.id)
        data = info.to_dict()
        data["lineage"] = {"parents": info.parents, "children": children}
        data["files"] = {peft_io.CONFIG_FILE: info.config_sha256, peft_io.WEIGHTS_FILE: info.weights_sha256}
        headers = self.adapter_headers(info, False)  # no-cache: aliases and children of even a fixed version change
        body = dumps(data)
        return _Meta(body, _header_list(headers, "application/json", len(body)))

    async def metadata(self, ref: str) -> Reply:
        """Metadata of the version REF resolves to, with its lineage (parents and children)."""
        meta = await self._cached("meta", self.parse(ref), self._load_meta)
        return Reply(200, meta.headers, meta.body)

    async def prompts(self, ref: str) -> Reply:
        info, immutable = await self.info(ref)
        prompts = self._prompts.get(info.id)
        if prompts is None:
            prompts = await run_in_threadpool(self.registry.prompts, info.ref)
            self._prompts.put(info.id, prompts)
        return json_reply(200, {"ref": info.ref, "prompts": prompts}, self.adapter_headers(info, immutable))

    async def file(self, ref: str, file_name: str, request: dict) -> Reply:
        """One file of the PEFT directory; ETag = its sha256; conditional GET and single Range."""
        if file_name not in FILES:
            raise NotFound(f"unknown file {file_name!r}: one of {', '.join(FILES)}")
        info, immutable = await self.info(ref)
        headers = self.adapter_headers(info, immutable)
        if file_name == peft_io.CONFIG_FILE:
            data = self.files.cached_config(info) or await run_in_threadpool(self.files.config_bytes, info)
            return file_reply(request, etag_of(info.config_sha256), len(data), "application/json", headers, data=data)
        handle = await self._weights(info)
        return file_reply(request, etag_of(info.weights_sha256), os.fstat(handle.fileno()).st_size,
                          "application/octet-stream", headers, handle=handle)

    async def _weights(self, info):
        handle, intact = self.files.open_weights(info)
        if not intact:
            try:
                await run_in_threadpool(self.files.verify, info, handle)
            except BaseException:
                handle.close()
                raise
        return handle

    async def archive(self, ref: str, request: dict) -> Reply:
        """The PEFT directory (both files, at the archive's top level) as one uncompressed tar."""
        info, immutable = await self.info(ref)
        headers = self.adapter_headers(info, immutable)
        headers["Content-Disposition"] = f'attachment; filename="{info.name}-{info.version}.tar"'
        etag = etag_of(f"tar-{info.digest}")
        if etag_matches(request.get("if-none-match"), etag):
            return Reply(304, _header_list(dict(headers, ETag=etag), None, None))
        config = self.files.cached_config(info) or await run_in_threadpool(self.files.config_bytes, info)
        handle = await self._weights(info)
        size = os.fstat(handle.fileno()).st_size
        headers["ETag"] = etag
        header_list = _header_list(headers, "application/x-tar", tar_size(len(config), size))
        if request.get("method") == "HEAD":
            handle.close()
            return Reply(200, header_list, head=True)
        before, after = tar_parts(config, size)
        return Reply(200, header_list, before, handle=handle, offset=0, count=size, suffix=after)


def request_of(scope) -> dict:
    """The method and the three request headers the file endpoints read."""
    wanted = {"method": scope["method"]}
    for key, value in scope["headers"]:
        if key in (b"range", b"if-range", b"if-none-match"):
            wanted[key.decode("latin-1")] = value.decode("latin-1")
    return wanted


class FastReads:
    """ASGI middleware: the hot reads straight to ``Reads``, everything else to the app."""

    def __init__(self, app, reads: Reads):
        self.app = app
        self.reads = reads

    def _route(self, scope):
        """(handler, args) for the paths taken here, or None (FastAPI answers, 404/405 included)."""
        method, path = scope["method"], scope["path"]
        if method not in ("GET", "HEAD") or not path.startswith(PREFIX):
            return None
        parts = path[len(PREFIX):].split("/")
        if not all(parts):
            return None
        reads = self.reads
        if len(parts) == 1 and method == "GET":
            return reads.metadata, (parts[0],)
        if len(parts) == 2 and parts[1] == "prompts" and method == "GET":
            return reads.prompts, (parts[0],)
        if len(parts) == 2 and parts[1] == "archive":
            return reads.archive, (parts[0], request_of(scope))
        if len(parts) == 3 and parts[1] == "files":
            return reads.file, (parts[0], parts[2], request_of(scope))
        return None

    async def __call__(self, scope, receive, send):
        route = self._route(scope) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        handler, args = route
        try:
            reply = await handler(*args)
        except RegistryError as err:
            reply = registry_error_reply(err)
        except Exception as err:  # noqa: BLE001 - a JSON 500, never a traceback to the client
            log.exception("unexpected error")
            reply = error_reply(500, f"internal error ({type(err).__name__}); see the server log")
        await send_reply(scope, send, reply)
