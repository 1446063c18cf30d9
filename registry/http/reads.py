"""The hot reads of ``registry serve``, answered from memory in front of FastAPI.

``FastReads`` is an ASGI middleware that takes ``GET /v1/adapters/{ref}``, ``.../prompts``,
``GET|HEAD .../files/{file}`` and ``GET|HEAD .../archive`` off FastAPI's routing, validation and
thread-pool hop, which cost more than the answer itself once SQL is out of the way (everything
else, and any path of another shape, goes on to FastAPI unchanged). The FastAPI routes of the same
paths stay, for ``/docs`` and for servers that mount the app without this layer, and call the same
``Reads`` methods, so both give the same bytes, headers and errors.

Per request, a cached answer costs one change-stamp read (``registry.http.cache``) and a dict
lookup; a REF seen for the first time since the database last changed costs a few Core queries in
the thread pool. Content-addressed things are kept by digest for the life of the process: config
bytes (checked against ``config_sha256`` once), prompt lists by SQL id, and which weights blobs
were hashed intact at which (size, mtime) — a blob whose size or mtime changed is hashed again
before it is served, so a corrupted blob is never sent.

Weights go out zero-copy: when the protocol offers ``http.response.zerocopysend``
(``registry.http.zerocopy``), the open blob is handed to ``sendfile``; otherwise (another server, the
test client) a slice up to ``SMALL_BODY`` is read at once and larger ones stream in ``CHUNK``s.
ETag (= the file's sha256), ``If-None-Match`` (304), single ``Range``/``If-Range`` (206/416) and
HEAD behave the same on every path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from registry import peft_io
from registry.errors import NotFound, RegistryError
from registry.http.cache import BoundedDict, ChangeStamp, Miss, StampedCache, dumps, load_children, load_info
from registry.http.files import FILES, AdapterFiles, tar_parts, tar_size
from registry.http.replies import (Reply, _header_list, error_reply, etag_matches, etag_of, file_reply, json_reply,
                                   registry_error_reply, send_reply)
from registry.refs import parse_ref

log = logging.getLogger("registry.server")

IMMUTABLE_MAX_AGE = 365 * 24 * 3600
PREFIX = "/v1/adapters/"


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

    def __init__(self, registry, files: AdapterFiles, protect_reads: bool, redirect_downloads: bool = False):
        self.registry = registry
        self.files = files
        self.protect_reads = protect_reads
        self.redirect_downloads = redirect_downloads  # weights: 307 to the object store's presigned URL
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
        etag = etag_of(info.weights_sha256)
        if self.redirect_downloads and not etag_matches(request.get("if-none-match"), etag):
            url = self.registry.blobs.presigned_url(info.weights_sha256)
            if url:  # the bytes go from the object store; the client still checks them against the digest
                return Reply(307, _header_list(dict(headers, Location=url, ETag=etag, **{"Cache-Control": "no-store"}),
                                               None, 0))
        handle = await self._weights(info)
        return file_reply(request, etag, os.fstat(handle.fileno()).st_size,
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
