"""Test and benchmark helpers for the HTTP server: a uvicorn server in a thread, reading an archive.

Not part of the registry package (``registry/http/`` is what ``registry serve`` runs); benchmarks
import this module with the repository root on ``sys.path``.
"""

from __future__ import annotations

import io
import tarfile
import threading

from registry.errors import IntegrityError
from registry.http.app import uvicorn_options
from registry.http.files import FILES


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread on a free loopback port (tests, benchmarks).

        with ServerThread(create_app(reg)) as url:
            fetch(url, "math@prod", cache)

    ``zero_copy=False`` runs uvicorn's own protocol (no ``http.response.zerocopysend``).
    """

    def __init__(self, app, host: str = "127.0.0.1", zero_copy: bool = True):
        import socket

        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        options = uvicorn_options(access_log=False, log_level="warning")
        if not zero_copy:
            options["http"] = "auto"
        config = uvicorn.Config(app, lifespan="off", **options)
        self.app = app
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()
        reads = getattr(getattr(self.app, "state", None), "reads", None)
        if reads is not None:
            reads.close()  # the change-stamp connection (lifespan is off here)


def read_tar(data: bytes) -> dict[str, bytes]:
    """The files of an archive from ``/archive`` (used by tests and the load benchmark)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        for member in archive.getmembers():
            if not member.isfile() or member.name not in FILES:
                raise IntegrityError(f"unexpected archive member {member.name!r}")
            out[member.name] = archive.extractfile(member).read()
    return out
