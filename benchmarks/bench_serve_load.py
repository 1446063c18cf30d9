"""Load test of `registry serve` on loopback: bounded, self-stopping, every response checked.

    python benchmarks/bench_serve_load.py --seconds 10 --clients 8 --adapters 20

What it does:

1. makes a throw-away registry in a temp folder and seeds it with N adapters shaped like a rank-8
   q/v LoRA of SmolLM2-135M (30 layers, hidden 576: 1.8 MB of float32 weights each), each with
   a ``prod`` alias;
2. starts ``registry serve`` in a subprocess on a free port of 127.0.0.1 (never another address),
   with the access log off;
3. runs three phases, each of ``--seconds`` and at most ``--max-requests`` requests per client,
   with ``--clients`` threads that each hold one keep-alive connection:

   - ``metadata``: only ``GET /v1/adapters/{ref}``, the REFs cycling through ``name@prod``,
     ``name``, ``name@1`` and ``sha256:<16 hex>`` of every seeded adapter; each answer is checked
     (its digests consistent, ``X-Registry-Digest`` equal to the body's, the name the one asked);
     prints req/s, p50, p99 (the issue's figures: 172 req/s, p50 44 ms, p99 133 ms at 8 threads);
   - ``weights``: only ``GET /v1/adapters/sha256:<digest>/files/adapter_model.safetensors``; each
     body is compared byte for byte with a copy verified against its sha256 before the phase;
     prints MB/s (the issue's figure: 335 MB/s);
   - ``mixed``: a writer subprocess adds a new version through the library every
     ``--add-interval`` s and moves a ``prod`` alias through ``PUT /v1/adapters/{name}/aliases/prod``
     every ``--writer-interval`` s (then probes ``POST /v1/generate`` once: a 4xx, as this registry
     has no generator), while the clients mix metadata by alias, whole files by digest and by
     alias, byte ranges, archives, conditional GETs (expect 304) and ``registry.client.fetch``
     calls; files are checked against their ETag and the metadata's digests, ranges against
     verified full copies, alias answers for a (config, weights) pair matching
     ``X-Registry-Digest`` — a mismatch is a *corrupt read*;

   before the timed loop of a phase every target is requested once (untimed), as a serving host
   asks for the same adapters again and again. The two focused phases use ``LeanConnection``, a
   minimal keep-alive HTTP/1.1 client, because on a 2-core machine every CPU-millisecond the client
   spends is one the server does not get (``http.client`` costs about 1.5 ms per 1.8 MB file
   here, ``LeanConnection`` about 0.9 ms); the mixed phase uses ``http.client`` and
   ``registry.client`` as before. Each phase reports the CPU seconds the server process and the
   client process used, so figures from a loaded machine can be read per request;
4. stops everything it started (by pid) and prints one line per phase.

``--phases`` picks some of them. Exit status 0 only with zero errors and zero corrupt reads.
The machine's other load matters on a 2-core box: the clients share the CPU with the server, and
the line printed first says the load average at the start.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"  # loopback only
TOKEN = "bench-token"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
OPS = {  # operation -> weight in the mix
    "meta_alias": 3,
    "weights_by_digest": 3,
    "config_by_alias": 2,
    "weights_by_alias": 2,
    "range": 3,
    "archive_by_alias": 2,
    "conditional": 3,
    "client_fetch": 1,
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------


def write_base_config(directory: Path) -> Path:
    """A config-only HF folder shaped like SmolLM2-135M (no weights are needed to store adapters)."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    return directory


def random_lora(seed: int, rank: int = 8) -> tuple[dict, dict]:
    """A random rank-``rank`` LoRA on q_proj and v_proj of every layer (PEFT key names)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (576, 576), "v_proj": (192, 576)}  # (out, in); v has 3 KV heads x 64
    state = {}
    for layer in range(30):
        for module, (out_features, in_features) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.02
            state[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.02
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
              "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    return state, config


def seed_registry(home: Path, base: Path, count: int) -> list[str]:
    from registry.store import Registry

    names = [f"task-{i:03d}" for i in range(count)]
    with Registry.open(home) as reg, reg.bulk():
        for i, name in enumerate(names):
            state, config = random_lora(i)
            reg.add_weights(name, state, config, kind="harvested", base=str(base), task=name)
            reg.set_alias(f"{name}@1", "prod")
    return names


# --------------------------------------------------------------------------------------------
# The writer process
# --------------------------------------------------------------------------------------------


def run_writer(args) -> None:
    """Until the deadline: move a ``prod`` alias every ``--writer-interval`` s (HTTP PUT, with the
    token) and add a new version every ``--add-interval`` s (library, as another process would)."""
    from registry import base_models
    from registry.store import Registry

    base_models.linear_module_shapes(base_models.load_base_config(args.base))  # warm up imports first
    random_lora(0)
    print("ready", flush=True)
    deadline = time.monotonic() + args.seconds
    rng = random.Random(1)
    names = args.names.split(",")
    latest = {name: 1 for name in names}
    stats = {"added": 0, "alias_moves": 0, "alias_move_errors": 0}
    alias_ms, add_s = [], []
    seed, next_add = 10_000, time.monotonic()
    with Registry.open(args.home) as reg:
        while time.monotonic() < deadline:
            if time.monotonic() >= next_add:
                name = rng.choice(names)
                state, config = random_lora(seed)
                seed += 1
                started = time.perf_counter()
                info = reg.add_weights(name, state, config, kind="harvested", base=args.base, task=name)
                add_s.append(time.perf_counter() - started)
                latest[name] = info.version
                stats["added"] += 1
                next_add = time.monotonic() + args.add_interval
            name = rng.choice(names)
            version = rng.randint(1, latest[name])
            put = urllib.request.Request(f"{args.url}/v1/adapters/{name}/aliases/prod", method="PUT",
                                         data=json.dumps({"version": version}).encode(),
                                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(put, timeout=30) as response:
                    response.read()
                stats["alias_moves"] += 1
            except Exception:  # noqa: BLE001 - counted and reported
                stats["alias_move_errors"] += 1
            alias_ms.append((time.perf_counter() - started) * 1000)
            time.sleep(args.writer_interval)
    stats["alias_p50_ms"], stats["alias_p99_ms"] = percentile(alias_ms, 50), percentile(alias_ms, 99)
    stats["add_p50_s"] = percentile(add_s, 50)
    # generation needs a trained generator, which this throw-away registry has not: probe the endpoint once
    probe = urllib.request.Request(f"{args.url}/v1/generate", method="POST",
                                   data=json.dumps({"prompts": ["What is 2 + 2?"], "name": "gen"}).encode(),
                                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(probe, timeout=120) as response:
            stats["generate_probe"] = f"{response.status}"
    except urllib.error.HTTPError as err:
        stats["generate_probe"] = f"{err.code} {json.loads(err.read() or b'{}').get('error', '')}"
    except OSError as err:
        stats["generate_probe"] = f"failed: {err}"
    print(json.dumps(stats), flush=True)


# --------------------------------------------------------------------------------------------
# The readers
# --------------------------------------------------------------------------------------------


class Known:
    """What readers have verified: digest -> (config sha, weights sha) and full weights bytes."""

    def __init__(self):
        self.lock = threading.RLock()
        self.pairs: dict[str, tuple[str, str]] = {}
        self.weights: dict[str, bytes] = {}
        self.digest_of: dict[str, str] = {}  # name@version -> adapter digest

    def learn(self, meta: dict) -> bool:
        """Record a metadata answer; False if its digests are inconsistent (a corrupt read)."""
        digest, config_sha, weights_sha = meta["digest"], meta["config_sha256"], meta["weights_sha256"]
        if sha(f"{config_sha}:{weights_sha}".encode()) != digest:
            return False
        with self.lock:
            self.pairs[digest] = (config_sha, weights_sha)
            if "ref" in meta:
                self.digest_of[meta["ref"]] = digest
        return True

    def some_digest(self, rng: random.Random) -> str:
        with self.lock:
            return rng.choice(list(self.pairs))


class Reader(threading.Thread):
    def __init__(self, index: int, port: int, names: list[str], known: Known, deadline: float, cache: Path,
                 max_operations: int):
        super().__init__(daemon=True)
        self.port, self.names, self.known, self.deadline, self.cache = port, names, known, deadline, cache
        self.max_operations = max_operations
        self.rng = random.Random(index)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.bytes = 0
        self.requests = 0
        self.errors: list[str] = []
        self.corrupt: list[str] = []
        self.connection = None

    # one request on the keep-alive connection (reopened after any failure)
    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            self.connection.request("GET", path, headers=headers or {})
            response = self.connection.getresponse()
            body = response.read()
        except Exception:
            self.connection.close()
            self.connection = None
            raise
        self.requests += 1
        self.bytes += len(body)
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body

    def expect(self, status: int, wanted: int, what: str, body: bytes) -> bool:
        if status != wanted:
            self.errors.append(f"{what}: HTTP {status} {body[:120]!r}")
            return False
        return True

    def check_pair(self, what: str, digest: str, config_sha: str | None, weights_sha: str | None) -> None:
        """A file served for an alias must belong to the version named in X-Registry-Digest."""
        with self.known.lock:
            pair = self.known.pairs.get(digest)
        if pair is None:
            status, _, body = self.get(f"/v1/adapters/sha256:{digest}")
            if not self.expect(status, 200, f"{what} meta", body) or not self.known.learn(json.loads(body)):
                self.corrupt.append(f"{what}: inconsistent metadata for {digest[:12]}")
                return
            pair = self.known.pairs[digest]
        if (config_sha and config_sha != pair[0]) or (weights_sha and weights_sha != pair[1]):
            self.corrupt.append(f"{what}: bytes of another version than X-Registry-Digest {digest[:12]}")

    def op_meta_alias(self):
        name = self.rng.choice(self.names)
        status, headers, body = self.get(f"/v1/adapters/{name}@prod")
        if self.expect(status, 200, "meta", body):
            meta = json.loads(body)
            if not self.known.learn(meta) or headers["x-registry-digest"] != meta["digest"]:
                self.corrupt.append(f"meta {name}@prod: inconsistent digests")

    def op_weights_by_digest(self):
        digest = self.known.some_digest(self.rng)
        status, headers, body = self.get(f"/v1/adapters/sha256:{digest}/files/{WEIGHTS}")
        if self.expect(status, 200, "weights", body):
            if sha(body) != self.known.pairs[digest][1] or headers["etag"] != f'"{sha(body)}"':
                self.corrupt.append(f"weights sha256:{digest[:12]}: digest mismatch")
            else:
                with self.known.lock:
                    self.known.weights.setdefault(digest, body)

    def op_file_by_alias(self, file_name: str):
        name = self.rng.choice(self.names)
        status, headers, body = self.get(f"/v1/adapters/{name}@prod/files/{file_name}")
        if self.expect(status, 200, f"{file_name} by alias", body):
            if headers["etag"] != f'"{sha(body)}"':
                self.corrupt.append(f"{file_name} {name}@prod: body does not match its ETag")
            elif file_name == CONFIG:
                self.check_pair(f"config {name}@prod", headers["x-registry-digest"], sha(body), None)
            else:
                self.check_pair(f"weights {name}@prod", headers["x-registry-digest"], None, sha(body))

    def op_range(self):
        with self.known.lock:
            candidates = list(self.known.weights)
        if not candidates:
            return self.op_weights_by_digest()
        digest = self.rng.choice(candidates)
        full = self.known.weights[digest]
        start = self.rng.randrange(len(full))
        end = min(len(full) - 1, start + self.rng.randrange(1, 256 * 1024))
        status, headers, body = self.get(f"/v1/adapters/sha256:{digest}/files/{WEIGHTS}",
                                         {"Range": f"bytes={start}-{end}"})
        if self.expect(status, 206, "range", body):
            if body != full[start:end + 1] or headers["content-range"] != f"bytes {start}-{end}/{len(full)}":
                self.corrupt.append(f"range {start}-{end} of sha256:{digest[:12]}: wrong bytes")

    def op_archive_by_alias(self):
        from tests.server_helpers import read_tar

        name = self.rng.choice(self.names)
        status, headers, body = self.get(f"/v1/adapters/{name}@prod/archive")
        if self.expect(status, 200, "archive", body):
            files = read_tar(body)
            config_sha, weights_sha = sha(files[CONFIG]), sha(files[WEIGHTS])
            if sha(f"{config_sha}:{weights_sha}".encode()) != headers["x-registry-digest"]:
                self.corrupt.append(f"archive {name}@prod: files are not the version in X-Registry-Digest")

    def op_conditional(self):
        digest = self.known.some_digest(self.rng)
        config_sha, weights_sha = self.known.pairs[digest]
        file_name, etag = self.rng.choice([(CONFIG, config_sha), (WEIGHTS, weights_sha)])
        status, _, body = self.get(f"/v1/adapters/sha256:{digest}/files/{file_name}", {"If-None-Match": f'"{etag}"'})
        if self.expect(status, 304, "conditional", body) and body:
            self.corrupt.append("conditional: a 304 with a body")

    def op_client_fetch(self):
        from registry.client import fetch_adapter

        name = self.rng.choice(self.names)
        fetched = fetch_adapter(f"http://{HOST}:{self.port}", f"{name}@prod", self.cache, timeout=30)
        config_sha = sha((fetched.path / CONFIG).read_bytes())
        weights = (fetched.path / WEIGHTS).read_bytes()
        self.bytes += 0 if fetched.from_cache else len(weights)
        if sha(f"{config_sha}:{sha(weights)}".encode()) != fetched.digest:
            self.corrupt.append(f"client fetch {name}@prod: cached directory does not match its digest")

    def run(self):
        ops = [op for op, weight in OPS.items() for _ in range(weight)]
        handlers = {"meta_alias": self.op_meta_alias, "weights_by_digest": self.op_weights_by_digest,
                    "config_by_alias": lambda: self.op_file_by_alias(CONFIG),
                    "weights_by_alias": lambda: self.op_file_by_alias(WEIGHTS), "range": self.op_range,
                    "archive_by_alias": self.op_archive_by_alias, "conditional": self.op_conditional,
                    "client_fetch": self.op_client_fetch}
        for _ in range(self.max_operations):
            if time.monotonic() >= self.deadline:
                break
            op = self.rng.choice(ops)
            started = time.perf_counter()
            try:
                handlers[op]()
            except Exception as err:  # noqa: BLE001 - every failure is counted and shown
                self.errors.append(f"{op}: {type(err).__name__}: {err}")
            self.latencies[op].append((time.perf_counter() - started) * 1000)
        if self.connection is not None:
            self.connection.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return round(values[index], 2)


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


class LeanConnection:
    """A minimal HTTP/1.1 keep-alive client for the focused phases: one ``sendall`` per request,
    the headers parsed from the first reads, the body read with ``recv_into`` into a buffer of
    exactly its length that the thread reuses. ``http.client`` costs about 1.5 ms of CPU per
    1.8 MB file here against about 0.9 ms for this, and on a 2-core machine the client's CPU is
    the server's. It checks what it relies on: a status line, a Content-Length (or a 304), no
    byte beyond the body; anything else raises and is counted as an error."""

    LARGE = 256 << 10

    def __init__(self, port: int):
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Blocking mode with kernel timeouts (30 s each way, so nothing waits forever): no poll()
        # before every recv, as Python's own socket timeouts need.
        self.sock.settimeout(None)
        limit = struct.pack("ll", 30, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self.buffers: dict[int, bytearray] = {}

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes | bytearray]:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n".encode("latin-1"))
        head = bytearray()
        while (end := head.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection before the headers")
            head += chunk
            if len(head) > (1 << 20):
                raise ValueError("headers over 1 MiB")
        lines = head[:end].decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {lines[0]!r}")
        answer = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            answer[key.strip().lower()] = value.strip()
        status = int(status)
        if status == 304 or status < 200:
            length = 0
        elif "content-length" in answer:
            length = int(answer["content-length"])
        else:
            raise ValueError(f"HTTP {status} without a Content-Length")
        have = memoryview(head)[end + 4:]
        if len(have) > length:
            raise ValueError("bytes beyond the Content-Length")
        if length < self.LARGE:
            body = bytes(have)
            while len(body) < length:
                chunk = self.sock.recv(length - len(body))
                if not chunk:
                    raise ConnectionError(f"the body ended after {len(body)} of {length} bytes")
                body += chunk
        else:
            body = self.buffers.get(length)
            if body is None:
                body = self.buffers[length] = bytearray(length)
            view, got = memoryview(body), len(have)
            view[:got] = have
            while got < length:
                n = self.sock.recv_into(view[got:])
                if not n:
                    raise ConnectionError(f"the body ended after {got} of {length} bytes")
                got += n
        if answer.get("connection", "").lower() == "close":
            self.close()
        return status, answer, body

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Hammer(threading.Thread):
    """One client thread of a focused phase: one keep-alive connection, the same kind of request
    over and over (bounded by ``deadline`` and ``max_requests``), every answer checked."""

    def __init__(self, index: int, port: int, targets: list, deadline: float, max_requests: int):
        super().__init__(daemon=True)
        self.port, self.deadline, self.max_requests = port, deadline, max_requests
        self.targets = targets[index % len(targets):] + targets[:index % len(targets)]  # spread the threads
        self.latencies: list[float] = []
        self.bytes = 0
        self.errors: list[str] = []
        self.corrupt: list[str] = []

    def run(self):
        connection = None
        count = 0
        while count < self.max_requests and time.monotonic() < self.deadline:
            path, check = self.targets[count % len(self.targets)]
            count += 1
            started = time.perf_counter()
            try:
                if connection is None or connection.sock is None:
                    connection = LeanConnection(self.port)
                status, headers, body = connection.get(path)
                self.latencies.append((time.perf_counter() - started) * 1000)
                self.bytes += len(body)
                problem = check(status, headers, body)
                if problem:
                    (self.errors if problem.startswith("HTTP") else self.corrupt).append(f"{path}: {problem}")
            except Exception as err:  # noqa: BLE001 - every failure is counted and shown
                self.errors.append(f"{path}: {type(err).__name__}: {err}")
                if connection is not None:
                    connection.close()
                connection = None
        if connection is not None:
            connection.close()


def metadata_targets(names: list[str], known: Known) -> list:
    """(path, check) for GET /v1/adapters/{ref}: alias, latest, version and digest REFs of each name."""

    def check_meta(name: str):
        def check(status, headers, body):
            if status != 200:
                return f"HTTP {status} {bytes(body[:120])!r}"
            meta = json.loads(body)
            if meta.get("name") != name or headers.get("x-registry-digest") != meta.get("digest"):
                return "answer for another adapter than asked, or X-Registry-Digest differs from the body"
            if sha(f"{meta['config_sha256']}:{meta['weights_sha256']}".encode()) != meta["digest"]:
                return "inconsistent digests"
            return None
        return check

    targets = []
    for name in names:
        digest = known.digest_of.get(f"{name}@1")
        targets += [(f"/v1/adapters/{name}@prod", check_meta(name)), (f"/v1/adapters/{name}", check_meta(name)),
                    (f"/v1/adapters/{name}@1", check_meta(name))]
        if digest:
            targets.append((f"/v1/adapters/sha256:{digest[:16]}", check_meta(name)))
    return targets


def weights_targets(port: int, known: Known) -> list:
    """(path, check) for the weights of every seeded adapter by digest; each body is compared with
    a copy fetched once here and verified against the sha256 in the metadata."""
    targets = []
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        with known.lock:
            pairs = dict(known.pairs)
        for digest, (_config_sha, weights_sha) in sorted(pairs.items()):
            path = f"/v1/adapters/sha256:{digest}/files/{WEIGHTS}"
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200 or sha(body) != weights_sha:
                raise RuntimeError(f"{path}: HTTP {response.status}, or bytes that do not match their digest")

            def check(status, headers, got, expected=body, etag=f'"{weights_sha}"'):
                if status != 200:
                    return f"HTTP {status} {bytes(got[:120])!r}"
                if headers.get("etag") != etag:
                    return f"ETag {headers.get('etag')} is not the weights' sha256"
                return None if got == expected else "bytes differ from the verified copy"
            targets.append((path, check))
    finally:
        connection.close()
    return targets


def process_cpu_s(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds the process has used so far, from /proc (None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, ValueError, IndexError):
        return None


def run_focused(port: int, targets: list, args, server_pid: int) -> dict:
    """One focused phase: every target once untimed (warm-up), then ``--clients`` threads."""
    warm = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        for path, _check in targets:
            warm.request("GET", path)
            warm.getresponse().read()
    finally:
        warm.close()
    deadline = time.monotonic() + args.seconds
    hammers = [Hammer(i, port, targets, deadline, args.max_requests) for i in range(args.clients)]
    cpu_started, server_started, started = os.times(), process_cpu_s(server_pid), time.perf_counter()
    for hammer in hammers:
        hammer.start()
    for hammer in hammers:
        hammer.join(timeout=args.seconds + 120)
    elapsed = time.perf_counter() - started
    latencies = [v for h in hammers for v in h.latencies]
    errors = [e for h in hammers for e in h.errors]
    corrupt = [c for h in hammers for c in h.corrupt]
    total = sum(h.bytes for h in hammers)
    cpu, server_cpu = os.times(), process_cpu_s(server_pid)
    return {
        "seconds": round(elapsed, 2), "clients": args.clients, "targets": len(targets),
        "requests": len(latencies), "req_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "MB_per_s": round(total / elapsed / 1e6, 1), "MB_total": round(total / 1e6, 1),
        "client_cpu_s": round((cpu.user - cpu_started.user) + (cpu.system - cpu_started.system), 2),
        "server_cpu_s": round(sum(server_cpu) - sum(server_started), 2) if server_cpu else None,
        "server_system_cpu_s": round(server_cpu[1] - server_started[1], 2) if server_cpu else None,
        "client_system_cpu_s": round(cpu.system - cpu_started.system, 2),
        "errors": len(errors), "corrupt_reads": len(corrupt), "hung_clients": sum(h.is_alive() for h in hammers),
        "error_samples": errors[:10], "corrupt_samples": corrupt[:10],
    }


def run_mixed(port: int, home: Path, base: Path, names: list[str], known: Known, env: dict, args,
              workdir: Path, server_pid: int) -> dict:
    """The mixed phase: every kind of read while a writer process adds versions and moves aliases."""
    writer = subprocess.Popen([sys.executable, __file__, "--role", "writer", "--home", str(home),
                               "--base", str(base), "--url", f"http://{HOST}:{port}", "--names", ",".join(names),
                               "--seconds", str(args.seconds), "--writer-interval", str(args.writer_interval),
                               "--add-interval", str(args.add_interval)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_ready(writer)
        deadline = time.monotonic() + args.seconds
        readers = [Reader(i, port, names, known, deadline, workdir / "client-cache" / str(i), args.max_requests)
                   for i in range(args.clients)]
        run_started, server_started = time.perf_counter(), process_cpu_s(server_pid)
        for reader in readers:
            reader.start()
        join_deadline = time.monotonic() + args.seconds + 120
        for reader in readers:
            reader.join(timeout=max(0.0, join_deadline - time.monotonic()))
        elapsed, server_cpu = time.perf_counter() - run_started, process_cpu_s(server_pid)
        hung = sum(reader.is_alive() for reader in readers)
        try:
            writer_out, writer_err = writer.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            writer_out, writer_err = b"", b"the writer did not finish in time"
        try:
            writer_stats = json.loads(writer_out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            writer_stats = {"error": "the writer did not report", "stderr": writer_err.decode()[-2000:]}
    finally:
        stop(writer)

    latencies = defaultdict(list)
    for reader in readers:
        for op, values in reader.latencies.items():
            latencies[op].extend(values)
    everything = [v for values in latencies.values() for v in values]
    errors = [e for reader in readers for e in reader.errors]
    corrupt = [c for reader in readers for c in reader.corrupt]
    total_bytes = sum(reader.bytes for reader in readers)
    return {
        "seconds": round(elapsed, 1), "clients": args.clients,
        "operations": len(everything), "http_requests": sum(reader.requests for reader in readers),
        "ops_per_s": round(len(everything) / elapsed, 1),
        "p50_ms": percentile(everything, 50), "p99_ms": percentile(everything, 99),
        "MB_per_s": round(total_bytes / elapsed / 1e6, 2), "MB_total": round(total_bytes / 1e6, 1),
        "errors": len(errors), "corrupt_reads": len(corrupt), "hung_clients": hung,
        "server_cpu_s": round(sum(server_cpu) - sum(server_started), 2) if server_cpu and server_started else None,
        "per_op": {op: {"n": len(v), "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99)}
                   for op, v in sorted(latencies.items())},
        "writer": writer_stats,
        "error_samples": errors[:10], "corrupt_samples": corrupt[:10],
    }


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not become healthy in time")


def wait_ready(process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait for the writer's "ready" line (it has imported torch/transformers and can add at once)."""
    import select

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 1.0)
        if readable:
            line = process.stdout.readline()
            if line.strip() == b"ready":
                return
            if not line:
                break
        if process.poll() is not None:
            break
    raise RuntimeError("the writer process did not get ready")


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def run_benchmark(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    home, base = workdir / "home", write_base_config(workdir / "base")
    python_path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, REGISTRY_TOKEN=TOKEN, REGISTRY_HOME=str(home), PYTHONPATH=python_path,
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("REGISTRY_DATABASE_URL", None)
    env.pop("REGISTRY_PROTECT_READS", None)
    server = None
    server_log = workdir / "server.log"
    results = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
               "clients": args.clients, "seconds_per_phase": args.seconds, "seeded_adapters": args.adapters}
    try:
        started = time.perf_counter()
        names = seed_registry(home, base, args.adapters)
        results["seed_seconds"] = round(time.perf_counter() - started, 1)
        port = free_port()
        with open(server_log, "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--host", HOST, "--port", str(port),
                                       "--home", str(home), "--no-access-log"], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(port, server)
        known = Known()
        with urllib.request.urlopen(f"http://{HOST}:{port}/v1/adapters", timeout=30) as response:
            for meta in json.loads(response.read()):
                known.learn(meta)
        if "metadata" in args.phases:
            results["metadata"] = run_focused(port, metadata_targets(names, known), args, server.pid)
        if "weights" in args.phases:
            results["weights"] = run_focused(port, weights_targets(port, known), args, server.pid)
        if "mixed" in args.phases:
            results["mixed"] = run_mixed(port, home, base, names, known, env, args, workdir, server.pid)
    finally:
        stop(server)
    log_text = server_log.read_text(errors="replace") if server_log.exists() else ""
    results["server_tracebacks"] = log_text.count("Traceback")
    results["server_protocol"] = next((line.split("protocol:", 1)[1].strip() for line in log_text.splitlines()
                                       if "protocol:" in line), "not logged")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        results["workdir"] = str(workdir)
    return results


def summary(results: dict) -> list[str]:
    lines = [f"load average at start {results['load_average_at_start']} on {results['cpus']} CPUs; "
             f"{results['clients']} client threads on 127.0.0.1, {results['seconds_per_phase']} s per phase; "
             f"server protocol: {results['server_protocol']}"]
    if (m := results.get("metadata")) is not None:
        lines.append(f"metadata GET /v1/adapters/{{ref}}: {m['req_per_s']} req/s, p50 {m['p50_ms']} ms, "
                     f"p99 {m['p99_ms']} ms ({m['requests']} requests; errors {m['errors']}, "
                     f"corrupt {m['corrupt_reads']}; CPU s server {m['server_cpu_s']}, clients {m['client_cpu_s']})")
    if (w := results.get("weights")) is not None:
        lines.append(f"weights  GET .../files/{WEIGHTS}: {w['MB_per_s']} MB/s, {w['req_per_s']} files/s, "
                     f"p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms ({w['requests']} downloads; errors {w['errors']}, "
                     f"corrupt {w['corrupt_reads']}; CPU s server {w['server_cpu_s']}, clients {w['client_cpu_s']})")
    if (x := results.get("mixed")) is not None:
        wr = x["writer"]
        lines.append(f"mixed    with a writer: {x['ops_per_s']} ops/s, p50 {x['p50_ms']} ms, p99 {x['p99_ms']} ms, "
                     f"{x['MB_per_s']} MB/s ({x['operations']} operations; errors {x['errors']}, corrupt "
                     f"{x['corrupt_reads']}; CPU s server {x['server_cpu_s']}); writer added {wr.get('added')} "
                     f"versions, moved aliases {wr.get('alias_moves')} times")
    return lines


def clean(results: dict) -> bool:
    ok = results["server_tracebacks"] == 0
    for phase in ("metadata", "weights", "mixed"):
        if (r := results.get(phase)) is not None:
            ok &= r["errors"] == 0 and r["corrupt_reads"] == 0 and r["hung_clients"] == 0
    if (x := results.get("mixed")) is not None:
        ok &= x["writer"].get("alias_move_errors") == 0 and "error" not in x["writer"]
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each phase runs (default 10)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    parser.add_argument("--adapters", type=int, default=20, help="adapters seeded before the run (default 20)")
    parser.add_argument("--max-requests", type=int, default=200_000,
                        help="at most this many requests per client and phase (default 200000)")
    parser.add_argument("--phases", default="metadata,weights,mixed",
                        help="comma-separated: metadata, weights, mixed (default: all three)")
    parser.add_argument("--writer-interval", type=float, default=0.1, help="pause between the writer's alias moves")
    parser.add_argument("--add-interval", type=float, default=1.0, help="pause between the writer's new versions")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp registry and server log")
    parser.add_argument("--role", default="bench", choices=["bench", "writer"], help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--names", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "writer":
        return run_writer(args)
    if not 0 < args.seconds <= 3600 or not 0 < args.clients <= 256 or not 0 < args.max_requests <= 10_000_000:
        parser.error("--seconds must be in (0, 3600], --clients in (0, 256], --max-requests in (0, 1e7]")
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not args.phases or not args.phases <= {"metadata", "weights", "mixed"}:
        parser.error("--phases takes metadata, weights and/or mixed")

    results = run_benchmark(args)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print()
    for line in summary(results):
        print(line)
    sys.exit(0 if clean(results) else 1)


if __name__ == "__main__":
    main()
