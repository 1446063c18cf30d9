"""Load test of `registry serve` on loopback: bounded, self-stopping, every download checked.

    python benchmarks/bench_serve_load.py --seconds 30 --clients 16 --adapters 20

What it does:

1. makes a throw-away registry in a temp folder and seeds it with N adapters shaped like a rank-8
   q/v LoRA of SmolLM2-135M (30 layers, hidden 576: 1.8 MB of float32 weights each), each with
   a ``prod`` alias;
2. starts ``registry serve`` in a subprocess on a free port of 127.0.0.1 (never another address);
3. starts a writer subprocess that, for the whole run, adds a new version through the library every
   second and moves a ``prod`` alias through ``PUT /v1/adapters/{name}/aliases/prod`` (with the
   token) every 0.1 s, then probes ``POST /v1/generate`` once (a 4xx: this throw-away registry has
   no trained generator);
4. runs ``--clients`` threads, each with its own keep-alive connection, for ``--seconds``, mixing:
   metadata by alias, whole files by digest, files by alias, byte ranges, archives by alias,
   conditional GETs (expect 304) and full ``registry.client.fetch`` calls of alias refs;
5. checks every body: files against their ETag and the digests in the metadata, ranges against
   verified full copies, archives and alias responses for a consistent (config, weights) pair
   matching ``X-Registry-Digest`` — a mismatch is a *corrupt read*;
6. stops everything it started (by pid) and prints p50/p99 latency, MB/s, errors, corrupt reads.

Exit status 0 only with zero errors and zero corrupt reads.
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

    def learn(self, meta: dict) -> bool:
        """Record a metadata answer; False if its digests are inconsistent (a corrupt read)."""
        digest, config_sha, weights_sha = meta["digest"], meta["config_sha256"], meta["weights_sha256"]
        if sha(f"{config_sha}:{weights_sha}".encode()) != digest:
            return False
        with self.lock:
            self.pairs[digest] = (config_sha, weights_sha)
        return True

    def some_digest(self, rng: random.Random) -> str:
        with self.lock:
            return rng.choice(list(self.pairs))


class Reader(threading.Thread):
    def __init__(self, index: int, port: int, names: list[str], known: Known, deadline: float, cache: Path):
        super().__init__(daemon=True)
        self.port, self.names, self.known, self.deadline, self.cache = port, names, known, deadline, cache
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
        from registry.server import read_tar

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
        while time.monotonic() < self.deadline:
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
    env = dict(os.environ, REGISTRY_TOKEN=TOKEN, REGISTRY_HOME=str(home), PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("REGISTRY_DATABASE_URL", None)
    env.pop("REGISTRY_PROTECT_READS", None)
    server = writer = None
    server_log = workdir / "server.log"
    try:
        started = time.perf_counter()
        names = seed_registry(home, base, args.adapters)
        seed_s = time.perf_counter() - started
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

        writer = subprocess.Popen([sys.executable, __file__, "--role", "writer", "--home", str(home),
                                   "--base", str(base), "--url", f"http://{HOST}:{port}", "--names", ",".join(names),
                                   "--seconds", str(args.seconds), "--writer-interval", str(args.writer_interval),
                                   "--add-interval", str(args.add_interval)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_ready(writer)
        deadline = time.monotonic() + args.seconds
        readers = [Reader(i, port, names, known, deadline, workdir / "client-cache" / str(i))
                   for i in range(args.clients)]
        run_started = time.perf_counter()
        for reader in readers:
            reader.start()
        join_deadline = time.monotonic() + args.seconds + 120
        for reader in readers:
            reader.join(timeout=max(0.0, join_deadline - time.monotonic()))
        elapsed = time.perf_counter() - run_started
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
        stop(server)
    log_text = server_log.read_text(errors="replace") if server_log.exists() else ""
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)

    latencies = defaultdict(list)
    for reader in readers:
        for op, values in reader.latencies.items():
            latencies[op].extend(values)
    everything = [v for values in latencies.values() for v in values]
    errors = [e for reader in readers for e in reader.errors]
    corrupt = [c for reader in readers for c in reader.corrupt]
    total_bytes = sum(reader.bytes for reader in readers)
    return {
        "seconds": round(elapsed, 1), "clients": args.clients, "seeded_adapters": args.adapters,
        "seed_seconds": round(seed_s, 1),
        "operations": len(everything), "http_requests": sum(reader.requests for reader in readers),
        "ops_per_s": round(len(everything) / elapsed, 1),
        "p50_ms": percentile(everything, 50), "p99_ms": percentile(everything, 99),
        "MB_per_s": round(total_bytes / elapsed / 1e6, 2), "MB_total": round(total_bytes / 1e6, 1),
        "errors": len(errors), "corrupt_reads": len(corrupt), "hung_clients": hung,
        "server_tracebacks": log_text.count("Traceback"),
        "per_op": {op: {"n": len(v), "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99)}
                   for op, v in sorted(latencies.items())},
        "writer": writer_stats,
        "error_samples": errors[:10], "corrupt_samples": corrupt[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the clients fetch (default 30)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads (default 16)")
    parser.add_argument("--adapters", type=int, default=20, help="adapters seeded before the run (default 20)")
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
    if not 0 < args.seconds <= 3600 or not 0 < args.clients <= 256:
        parser.error("--seconds must be in (0, 3600] and --clients in (0, 256]")

    results = run_benchmark(args)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    w = results["writer"]
    print(f"\n{results['clients']} clients x {results['seconds']} s on loopback: {results['operations']} operations "
          f"({results['http_requests']} HTTP requests), {results['ops_per_s']} ops/s, "
          f"p50 {results['p50_ms']} ms, p99 {results['p99_ms']} ms, {results['MB_per_s']} MB/s; "
          f"errors {results['errors']}, corrupt reads {results['corrupt_reads']}; writer added {w.get('added')} "
          f"versions and moved aliases {w.get('alias_moves')} times")
    clean = (results["errors"] == 0 and results["corrupt_reads"] == 0 and results["hung_clients"] == 0
             and w.get("alias_move_errors") == 0 and "error" not in w)
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
