"""uvicorn's HTTP/1.1 protocols plus the ASGI *zero-copy send* extension, so blobs go out by sendfile.

uvicorn has no ``http.response.zerocopysend`` (nor ``pathsend``): an ASGI app can only hand it
bytes, so a 1.8 MB weights file used to be read into Python, copied into the transport's buffer
and written in pieces. These subclasses of uvicorn's own protocols (h11 always, httptools when it
is installed: it parses requests several times faster) advertise the extension in every HTTP scope
and implement the message of the ASGI spec::

    {"type": "http.response.zerocopysend", "file": <file object>, "offset": 0, "count": N,
     "more_body": False}

by ``loop.sendfile(transport, file, offset, count)``: on a plain TCP socket that is
``os.sendfile`` from the page cache to the socket, with no copy through Python; on TLS or a loop
without ``sendfile`` asyncio (or the fallback here) reads and writes instead. Everything else
(headers, Content-Length bookkeeping, keep-alive, HEAD) stays uvicorn's: the file's bytes are
accounted for exactly as a body of ``count`` bytes would be (h11 is given a placeholder of that
length through ``send_with_data_passthrough``, which h11 provides for this purpose).

The request cycle of each new request gets the subclass by ``__class__`` assignment right after
uvicorn created it, before its task first runs. This leans on uvicorn internals (the cycle's
``send``, ``conn``/``expected_content_length``, ``flow``): ``protocol_class()`` returns None when
the classes are not there, the server then runs uvicorn's default protocol, and the app, seeing
no extension, sends bytes as before; the tests run the real protocol over loopback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

ZEROCOPY = "http.response.zerocopysend"
CHUNK = 1 << 20
COALESCE = 256 << 10  # headers and a body up to this size go out in one write
HEADER_TIMEOUT_S = 15.0  # a connection must send a whole request head this soon (idle/trickle guard)

log = logging.getLogger("registry.server")


class _FileSlice:
    """The placeholder h11 passes through in place of ``count`` body bytes."""

    __slots__ = ("count",)

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count


def _slice_of(message) -> tuple:
    file = message["file"]
    offset = int(message.get("offset") or 0)
    count = message.get("count")
    if count is None:
        count = os.fstat(file.fileno()).st_size - offset
    return file, offset, int(count)


async def _send_file(cycle, file, offset: int, count: int) -> bool:
    """Write ``count`` bytes of ``file`` from ``offset`` to the cycle's transport; False if the
    client went away (the transport is closed then, and the cycle marked disconnected)."""
    loop = asyncio.get_running_loop()
    transport = cycle.transport
    try:
        sock = transport.get_extra_info("socket")
        if sock is not None and not transport.get_write_buffer_size() and transport.get_extra_info("sslcontext") is None:
            # Nothing queued in the transport: try the whole slice at once. A reader keeping up
            # takes it in one call, and this skips asyncio's add/remove-writer round per file.
            try:
                sent = os.sendfile(sock.fileno(), file.fileno(), offset, count)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP):
                    raise
                sent = 0  # this file or socket does not sendfile: asyncio's path decides below
            offset, count = offset + sent, count - sent
            if not count:
                return True
        try:
            await loop.sendfile(transport, file, offset, count)
        except NotImplementedError:  # a loop without sendfile (e.g. uvloop): read and write
            position, end = offset, offset + count
            while position < end:
                block = os.pread(file.fileno(), min(CHUNK, end - position), position)
                if not block:
                    raise OSError(f"file ended {end - position} bytes early")
                transport.write(block)
                position += len(block)
                if cycle.flow.write_paused:
                    await cycle.flow.drain()
        return True
    except (OSError, RuntimeError) as err:  # reset by the peer, or the transport already closing
        log.debug("sendfile stopped: %s", err)
        cycle.disconnected = True
        transport.close()
        return False


class _Capture:
    """Stands in for the transport while uvicorn's own ``send`` runs: keeps its writes, so that
    the status line and headers go out in the same write as the body. ``close()`` (uvicorn closing
    a non-keep-alive connection) first writes what was kept, in order."""

    def __init__(self, transport, head: bytes = b""):
        self._transport = transport
        self.parts = [head] if head else []

    def write(self, data) -> None:
        if data:
            self.parts.append(data)

    def flush(self) -> None:
        parts, self.parts = self.parts, []
        if not parts:
            return
        if sum(len(p) for p in parts) <= COALESCE:
            self._transport.write(b"".join(parts))  # one send: one segment, one wake-up of the client
        else:
            for part in parts:  # a large body: no copy just to prepend the headers
                self._transport.write(part)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def _cork(transport, on: bool) -> bool:
    """TCP_CORK on the connection (Linux): the headers wait for the file's first bytes."""
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_CORK", None)
    if sock is None or option is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, 1 if on else 0)
        return True
    except OSError:  # not TCP (a Unix socket)
        return False


def _upgraded(protocol_module):
    """The module's ``RequestResponseCycle`` with the zero-copy message and one write per small
    response (uvicorn writes the headers and the body separately: two sends, two segments on the
    wire, two wake-ups of the reader; here the headers wait for the first body message)."""
    base = protocol_module.RequestResponseCycle
    h11 = protocol_module.__name__.endswith("h11_impl")

    class ZeroCopyCycle(base):
        _head = b""  # the status line and headers, until the first body message

        async def _base_send(self, message, head: bytes = b"", keep: bool = False) -> _Capture:
            """uvicorn's ``send`` with its writes kept; written out at the end (also when it
            raises half-way, as uvicorn would have written them) unless ``keep``."""
            capture = _Capture(self.transport, head)
            self.transport = capture
            try:
                await super().send(message)
            finally:
                self.transport = capture._transport
                if not keep:
                    capture.flush()
            return capture

        async def send(self, message):
            kind = message["type"]
            if kind == "http.response.start" and not self.response_started:
                capture = await self._base_send(message, keep=True)
                self._head = b"".join(capture.parts)
                return
            if kind == "http.response.body" and self.response_started:
                head, self._head = self._head, b""
                await self._base_send(message, head)
                return
            if kind != ZEROCOPY:
                return await super().send(message)
            if self.flow.write_paused and not self.disconnected:
                await self.flow.drain()
            if self.disconnected:
                return
            if not self.response_started or self.response_complete:
                raise RuntimeError(f"unexpected ASGI message {ZEROCOPY!r} outside a response body")
            file, offset, count = _slice_of(message)
            head, self._head = self._head, b""
            if count and self.scope["method"] != "HEAD":
                if h11:
                    import h11 as h11_module

                    parts = self.conn.send_with_data_passthrough(h11_module.Data(data=_FileSlice(count)))
                elif self.chunked_encoding:
                    parts = [b"%x\r\n" % count, _FileSlice(count), b"\r\n"]
                else:
                    if count > self.expected_content_length:
                        raise RuntimeError("Response content longer than Content-Length")
                    self.expected_content_length -= count
                    parts = [_FileSlice(count)]
                corked = _cork(self.transport, True)
                try:
                    for part in parts:
                        if isinstance(part, _FileSlice):
                            if head:
                                self.transport.write(head)
                                head = b""
                            if not await _send_file(self, file, offset, count):
                                return
                        else:
                            head += part
                    if head:
                        self.transport.write(head)
                        head = b""
                finally:
                    if corked and not self.transport.is_closing():
                        _cork(self.transport, False)
            await self._base_send({"type": "http.response.body", "body": b"",
                                   "more_body": bool(message.get("more_body", False))}, head)

    ZeroCopyCycle.__name__ = ZeroCopyCycle.__qualname__ = f"ZeroCopy{base.__name__}"
    return base, ZeroCopyCycle


def _upgrade(cycle, base, upgraded) -> None:
    if cycle is not None and type(cycle) is base:
        cycle.__class__ = upgraded
        cycle.scope.setdefault("extensions", {})[ZEROCOPY] = {}


def header_timeout_s() -> float:
    """Seconds a connection may take to send a request's headers (``$REGISTRY_HEADER_TIMEOUT_S``)."""
    return float(os.environ.get("REGISTRY_HEADER_TIMEOUT_S", HEADER_TIMEOUT_S))


class _HeaderDeadline:
    """Close a connection that has not sent a whole request head within ``header_timeout`` of
    opening or of its last response (uvicorn has no such timeout: a connection that sends nothing,
    or trickles its headers a byte at a time, would otherwise be held for ever). The deadline does
    not move as bytes arrive, so trickling does not extend it; it is lifted once the head is in."""

    header_timeout = HEADER_TIMEOUT_S
    _header_deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc) -> None:
        self._lift_header_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_deadline()  # (a pipelined request already started keeps it lifted)

    def _arm_header_deadline(self) -> None:
        self._lift_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_deadline_passed)

    def _lift_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.info("closing a connection that sent no complete request head in %.0f s", self.header_timeout)
            self.transport.close()


def _h11_protocol():
    from uvicorn.protocols.http import h11_impl

    base, upgraded = _upgraded(h11_impl)

    class ZeroCopyH11Protocol(_HeaderDeadline, h11_impl.H11Protocol):
        """uvicorn's h11 protocol with ``http.response.zerocopysend`` and a request-head deadline."""

        header_timeout = header_timeout_s()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before and self.cycle is not None:
                self._lift_header_deadline()  # a new request's head is in
            _upgrade(self.cycle, base, upgraded)

    return ZeroCopyH11Protocol


def _httptools_protocol():
    from uvicorn.protocols.http import httptools_impl

    base, upgraded = _upgraded(httptools_impl)

    class ZeroCopyHttpToolsProtocol(_HeaderDeadline, httptools_impl.HttpToolsProtocol):
        """uvicorn's httptools protocol with ``http.response.zerocopysend`` and a request-head deadline."""

        header_timeout = header_timeout_s()

        def on_headers_complete(self) -> None:
            self._lift_header_deadline()
            super().on_headers_complete()
            _upgrade(self.cycle, base, upgraded)

    return ZeroCopyHttpToolsProtocol


def protocol_class(parser: str = "auto"):
    """The zero-copy protocol for ``parser`` ("auto": httptools if installed, else h11), or None
    when this uvicorn lacks the classes the subclasses extend (then run uvicorn's own)."""
    import importlib.util

    try:
        if parser in ("auto", "httptools"):
            if importlib.util.find_spec("httptools") is not None:
                return _httptools_protocol()
            if parser == "httptools":
                return None
        return _h11_protocol()
    except (ImportError, AttributeError):
        return None
