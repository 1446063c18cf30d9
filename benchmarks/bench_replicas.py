"""Two `registry serve` replicas on one PostgreSQL and one S3 bucket: writes on one side, reads on the other.

    python benchmarks/bench_replicas.py --database-url postgresql+psycopg://... [--s3-endpoint URL]
        [--adds 30] [--readers 4]

What it does (every process on 127.0.0.1, everything it starts stopped by pid):

1. makes a fresh bucket (on ``--s3-endpoint``, else on a moto S3 server it starts) and empties
   nothing else: the database must be a throw-away one (its tables are used as they are);
2. starts replicas A and B (``registry serve``), each with its own home (index, caches) and the same
   ``REGISTRY_DATABASE_URL`` and ``REGISTRY_BLOB_URL``;
3. while ``--readers`` threads search, read metadata and download weights through B (every answer
   checked: statuses, digests, downloaded bytes hashed), this process adds ``--adds`` adapters
   (as a harvest worker would: same database and bucket) and moves each one's ``prod`` alias
   through A's HTTP API; for each it measures how long until B answers it (metadata with the right
   digest *and* a search for its prompt that returns it) and until B resolves the moved alias;
4. SIGKILLs replica A in the middle of a download and keeps reading through B.

Prints one JSON object: adds, reads, errors (must be 0), p50/p99 in ms of how long until B
resolves an add, until its search also returns it, until B sees a moved alias, and what one search
on B costs meanwhile (searches share one encoder: under the readers' load they queue). Exit status 0 only with zero errors and every add and alias seen by B.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_serve_load import HOST, free_port, percentile, random_lora, stop, wait_healthy, write_base_config  # noqa: E402

TOKEN = "replica-token"
VISIBLE_TIMEOUT_S = 30.0


def start_moto() -> tuple[str, subprocess.Popen]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return url, process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto's S3 server did not start")


def get(url: str, token: str | None = None, method: str = "GET", body: bytes | None = None):
    """(status, body bytes) of one request; (None, b"") when the server is unreachable."""
    request = urllib.request.Request(url, data=body, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return None, b""


class Readers:
    """Threads reading through one replica; every answer checked against what the writer stored."""

    def __init__(self, base_url: str, count: int):
        self.base_url, self.count = base_url, count
        self.known: list[dict] = []  # {name, digest, weights_sha256, prompt}, appended once visible
        self.reads = self.errors = 0
        self.search_seconds: list[float] = []
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(count)]

    def start(self):
        for thread in self._threads:
            thread.start()

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _fail(self, message: str):
        with self._lock:
            self.errors += 1
            if len(self.problems) < 20:
                self.problems.append(message)

    def _loop(self, seed: int):
        rng = random.Random(seed)
        while not self._stop.is_set():
            if not self.known:
                time.sleep(0.01)
                continue
            item = rng.choice(self.known)
            kind = rng.choice(["metadata", "weights", "search"])
            if kind == "metadata":
                status, body = get(f"{self.base_url}/v1/adapters/{item['name']}@1")
                ok = status == 200 and json.loads(body)["digest"] == item["digest"]
            elif kind == "weights":
                status, body = get(f"{self.base_url}/v1/adapters/sha256:{item['digest']}/files/adapter_model.safetensors")
                ok = status == 200 and hashlib.sha256(body).hexdigest() == item["weights_sha256"]
            else:
                query = urllib.parse.urlencode({"q": item["prompt"], "k": 3})
                start = time.monotonic()
                status, body = get(f"{self.base_url}/v1/search?{query}")
                self.search_seconds.append(time.monotonic() - start)
                ok = status == 200 and isinstance(json.loads(body), list)
            with self._lock:
                self.reads += 1
            if not ok:
                self._fail(f"{kind} {item['name']}: status {status}")


def resolvable_on(base_url: str, name: str, digest: str) -> bool:
    status, body = get(f"{base_url}/v1/adapters/{name}@1")
    return status == 200 and json.loads(body)["digest"] == digest


def searchable_on(base_url: str, name: str, prompt: str) -> bool:
    status, body = get(f"{base_url}/v1/search?{urllib.parse.urlencode({'q': prompt, 'k': 3})}")
    return status == 200 and name in [hit["name"] for hit in json.loads(body)]


def visible_on(base_url: str, name: str, digest: str, prompt: str) -> bool:
    return resolvable_on(base_url, name, digest) and searchable_on(base_url, name, prompt)


def wait_until(check, timeout: float = VISIBLE_TIMEOUT_S) -> float | None:
    """Seconds until ``check()`` is true (polled every 10 ms), or None after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def run(database_url: str, s3_endpoint: str | None, adds: int, readers: int, workdir: Path) -> dict:
    import boto3

    from registry.store import Registry

    moto = None
    if not s3_endpoint:
        s3_endpoint, moto = start_moto()
    env = dict(os.environ, AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
               AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"), AWS_DEFAULT_REGION="us-east-1",
               REGISTRY_DATABASE_URL=database_url, REGISTRY_TOKEN=TOKEN, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    bucket = f"replicas-{os.getpid()}-{int(time.time())}"
    env["REGISTRY_BLOB_URL"] = f"s3://{bucket}/blobs"
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")})
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    base = write_base_config(workdir / "base")
    writer = Registry.open(workdir / "writer-home", database_url, blob_url=env["REGISTRY_BLOB_URL"])
    state, config = random_lora(10_000)
    first = writer.add_weights("seed", state, config, kind="harvested", base=str(base), prompts=["a seed prompt"])
    replicas, ports = [], []
    readers_b = None
    try:
        for label in ("a", "b"):
            port = free_port()
            process = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--host", HOST, "--port", str(port),
                                        "--no-access-log"], cwd=ROOT,
                                       env=dict(env, REGISTRY_HOME=str(workdir / f"replica-{label}")),
                                       stdout=subprocess.DEVNULL, stderr=open(workdir / f"replica-{label}.log", "wb"))
            replicas.append(process)
            ports.append(port)
        for process, port in zip(replicas, ports):
            wait_healthy(port, process)
        url_a, url_b = (f"http://{HOST}:{port}" for port in ports)
        if wait_until(lambda: visible_on(url_b, "seed", first.digest, "a seed prompt"), 300) is None:
            raise RuntimeError("replica B never answered the seed adapter")  # (loads its encoder first)
        readers_b = Readers(url_b, readers)
        readers_b.known.append({"name": "seed", "digest": first.digest, "weights_sha256": first.weights_sha256,
                                "prompt": "a seed prompt"})
        readers_b.start()
        add_seen, resolve_seen, alias_seen, unseen = [], [], [], []
        for i in range(adds):
            name, prompt = f"adapter-{i:03d}", f"replica probe {i}: {random.Random(i).random():.6f}"
            state, config = random_lora(i)
            info = writer.add_weights(name, state, config, kind="harvested", base=str(base), prompts=[prompt])
            resolved = wait_until(lambda: resolvable_on(url_b, name, info.digest))
            seen = None if resolved is None else wait_until(lambda: searchable_on(url_b, name, prompt))
            if seen is None:
                unseen.append(name)
            else:
                resolve_seen.append(resolved)
                add_seen.append(resolved + seen)
            readers_b.known.append({"name": name, "digest": info.digest, "weights_sha256": info.weights_sha256,
                                    "prompt": prompt})
            status, _ = get(f"{url_a}/v1/adapters/{name}/aliases/prod", TOKEN, "PUT", json.dumps({"version": 1}).encode())
            if status != 200:
                unseen.append(f"{name}@prod (PUT on A: {status})")
                continue
            seen = wait_until(lambda: get(f"{url_b}/v1/adapters/{name}@prod")[0] == 200)
            (alias_seen.append(seen) if seen is not None else unseen.append(f"{name}@prod"))
        # Replica A dies in the middle of a download; B keeps answering.
        reads_before = readers_b.reads
        download = threading.Thread(target=get, args=(f"{url_a}/v1/adapters/seed@1/files/adapter_model.safetensors",))
        download.start()
        replicas[0].send_signal(signal.SIGKILL)
        download.join(timeout=30)
        time.sleep(2.0)
        readers_b.stop()
        def summary(seconds: list[float]) -> dict:
            ms = [s * 1000 for s in seconds]
            return {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": round(max(ms), 1) if ms else None}

        return {"adds": adds, "readers": readers, "reads_on_b": readers_b.reads, "errors": readers_b.errors,
                "reads_on_b_after_a_was_killed": readers_b.reads - reads_before,
                "not_seen_on_b": unseen, "problems": readers_b.problems,
                "add_resolvable_on_b_ms": summary(resolve_seen),  # GET /v1/adapters/NAME@1 with its digest
                "add_searchable_on_b_ms": summary(add_seen),  # ... and a search for its prompt returns it
                "alias_visible_on_b_ms": summary(alias_seen),
                "search_on_b_ms": summary(readers_b.search_seconds),  # what one search costs meanwhile
                "replica_a_exit": replicas[0].wait(timeout=10)}
    finally:
        if readers_b is not None:
            readers_b.stop()
        for process in replicas:
            stop(process)
        writer.close()
        if moto is not None:
            moto.kill()
            moto.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("REGISTRY_TEST_POSTGRES_URL"),
                        help="A throw-away PostgreSQL database (default: $REGISTRY_TEST_POSTGRES_URL).")
    parser.add_argument("--s3-endpoint", default=os.environ.get("REGISTRY_TEST_S3_ENDPOINT"),
                        help="An S3 API endpoint (default: a moto server started here).")
    parser.add_argument("--adds", type=int, default=30)
    parser.add_argument("--readers", type=int, default=4)
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url (or $REGISTRY_TEST_POSTGRES_URL) is required: replicas share one PostgreSQL")
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as workdir:
        result = run(args.database_url, args.s3_endpoint, args.adds, args.readers, Path(workdir))
    print(json.dumps(result, indent=2))
    clean = result["errors"] == 0 and not result["not_seen_on_b"]
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
