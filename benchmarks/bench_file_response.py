"""Sending a weights file: the server's own path (``registry.http.replies``: ``file_reply`` +
``send_reply``, zero-copy ``sendfile`` through ``registry.http.zerocopy``) vs Starlette's
``FileResponse`` (64 KiB chunks read in the thread pool), both on uvicorn with the same protocol.

    python benchmarks/bench_file_response.py --mb 64 --requests 20

Prints MB/s and CPU seconds of the server process side (this process) for whole-file GETs and for
1 MiB Range GETs. The registry keeps its own path while this shows it ahead (see the
``registry.http.replies`` docstring for the other reasons: multi-range answers, open handles).
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ETAG = '"bench"'


def ours(path: Path):
    from registry.http.replies import file_reply, send_reply

    async def app(scope, receive, send):
        request = {"method": scope["method"]}
        for key, value in scope["headers"]:
            if key in (b"range", b"if-range", b"if-none-match"):
                request[key.decode()] = value.decode()
        handle = open(path, "rb")  # noqa: SIM115 - closed by send_reply
        reply = file_reply(request, ETAG, os.fstat(handle.fileno()).st_size, "application/octet-stream", {},
                           handle=handle)
        await send_reply(scope, send, reply)

    return app


def starlette(path: Path):
    from starlette.responses import FileResponse

    async def app(scope, receive, send):
        await FileResponse(path, headers={"ETag": ETAG})(scope, receive, send)

    return app


def run(app, requests: int, size: int, ranged: bool) -> tuple[float, float]:
    """(MB/s, server-side CPU seconds per request) over ``requests`` GETs on one keep-alive connection."""
    import uvicorn

    from registry.http.zerocopy import protocol_class

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=protocol_class() or "auto", lifespan="off", log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    connection = http.client.HTTPConnection("127.0.0.1", port)
    received, client_cpu, cpu_before = 0, time.thread_time(), time.process_time()
    start = time.perf_counter()
    for i in range(requests):
        first = (i << 20) % max(1, size - (1 << 20))  # a different MiB each time
        headers = {"Range": f"bytes={first}-{first + (1 << 20) - 1}"} if ranged else {}
        connection.request("GET", "/file", headers=headers)
        response = connection.getresponse()
        while block := response.read(1 << 20):
            received += len(block)
    elapsed = time.perf_counter() - start
    process_cpu = time.process_time() - cpu_before - (time.thread_time() - client_cpu)  # minus the client thread
    connection.close()
    server.should_exit = True
    thread.join(10)
    sock.close()
    return received / elapsed / 1e6, process_cpu / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=64, help="file size in MiB")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adapter_model.safetensors"
        path.write_bytes(os.urandom(args.mb << 20))
        size = path.stat().st_size
        for ranged in (False, True):
            best = {}
            for _ in range(args.rounds):
                for name, make in (("registry (sendfile)", ours), ("starlette FileResponse", starlette)):
                    rate, cpu = run(make(path), args.requests, size, ranged)
                    if name not in best or rate > best[name][0]:
                        best[name] = (rate, cpu)
            what = "1 MiB Range GETs" if ranged else f"whole {args.mb} MiB GETs"
            for name, (rate, cpu) in best.items():
                print(f"{what:>20}  {name:<24} {rate:8.0f} MB/s  {1000 * cpu:7.2f} ms server CPU/request")


if __name__ == "__main__":
    main()
