"""HTTP replies of the read endpoints: status, headers, then bytes and/or a slice of an open file.

``file_reply`` answers conditional GET and single byte ranges by content: ``ETag`` is the file's
sha256, ``If-None-Match`` gives 304, one ``Range`` (with ``If-Range``) gives 206 or 416, and a
multi-range or malformed ``Range`` gets the whole file. ``send_reply`` sends a ``Reply`` on an ASGI
connection, the file slice by ``sendfile`` when the protocol offers ``http.response.zerocopysend``
(``registry.http.zerocopy``).

Why not Starlette's ``FileResponse`` (it parses Range / If-Range too): it streams the file in
64 KiB chunks read in the thread pool (uvicorn offers no ``pathsend``), where this path hands the
open blob to one ``sendfile`` with the headers in the same TCP segment (``benchmarks/
bench_serve_load.py`` measures it); it answers a multi-range request with ``multipart/byteranges``
where this server sends the whole file (tested); and it takes a path, where the reads here hold an
already verified open handle (a blob swapped after its check is never served). Measured with
``benchmarks/bench_file_response.py --mb 32 --requests 10`` (same uvicorn protocol, loopback, a
loaded 2-core machine): whole 32 MiB GETs 841 vs 192 MB/s (12 vs 93 ms server CPU per request),
1 MiB Range GETs 1619 vs 186 MB/s (0.3 vs 4.4 ms). So it would be slower and answer differently;
the hand-written path stays.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from registry.errors import IntegrityError, InvalidName, NotFound, RegistryError
from registry.http.cache import dumps
from registry.http.zerocopy import ZEROCOPY

log = logging.getLogger("registry.server")

CHUNK = 1 << 20
SMALL_BODY = 16 << 20  # without zero-copy, bodies up to this size are read at once instead of streamed
ERROR_STATUS = ((InvalidName, 400), (NotFound, 404), (IntegrityError, 500), (RegistryError, 400))


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
