"""Registry-core benchmark: add throughput, search latency at 1k/10k/100k, fetch latency, CLI start-up.

    python benchmarks/bench_registry.py            # full run (about 3 minutes on 2 CPU cores)
    python benchmarks/bench_registry.py --quick    # 1k and 10k only

Search is measured on synthetic unit vectors inserted straight into SQL (the index is then rebuilt
from SQL, exactly as ``registry reindex`` does), with vector queries so the figure is the registry's
own cost; the time to embed a text query with MiniLM is printed separately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def percentiles(samples_s: list[float], cpu_s: list[float] | None = None) -> str:
    """Wall-clock p50/p95, plus CPU-time p50/p95 (what the call costs even when other jobs share the cores)."""
    ms = np.array(samples_s) * 1000
    text = f"wall p50 {np.percentile(ms, 50):.3f} ms  p95 {np.percentile(ms, 95):.3f} ms"
    if cpu_s is not None:
        cpu = np.array(cpu_s) * 1000
        text += f"; CPU p50 {np.percentile(cpu, 50):.3f} ms  p95 {np.percentile(cpu, 95):.3f} ms"
    return text + f"  (n={len(ms)})"


def timed(calls) -> tuple[list[float], list[float]]:
    """Run each zero-argument callable; return (wall seconds, CPU seconds) per call."""
    wall, cpu = [], []
    for call in calls:
        t0, c0 = time.perf_counter(), time.thread_time()
        call()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return wall, cpu


def bench_add(work: Path, count: int) -> None:
    from conftest import build_tiny_llama, make_tiny_adapter_dir
    from registry.store import Registry

    base = work / "base"
    build_tiny_llama(base)
    adapters = [make_tiny_adapter_dir(base, work / f"a{i}", seed=i) for i in range(count)]
    prompts = [f"Question {j}: what is {j} plus {j + 1}?" for j in range(20)]
    with Registry.open(work / "home-add") as reg:
        reg.add_directory(adapters[0], name="warmup", prompts=prompts)  # loads the encoder once
        start = time.perf_counter()
        for i, path in enumerate(adapters):
            reg.add_directory(path, name=f"adapter-{i}", prompts=prompts)
        elapsed = time.perf_counter() - start
    print(f"add (tiny llama adapter, 20 prompts embedded by MiniLM, index saved each time): "
          f"{count / elapsed:.1f} adapters/s ({elapsed / count * 1000:.1f} ms each)")


def seed_synthetic(reg, count: int, rng) -> None:
    """Insert ``count`` adapter rows with random unit embeddings straight into SQL."""
    from sqlalchemy import insert

    from registry.schema import Adapter, utc_now

    vectors = rng.standard_normal((count, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    now = utc_now()
    rows = [dict(name=f"syn-{i}", version=1, kind="harvested", base_model="synthetic", base_fingerprint="0" * 64,
                 rank=8, alpha=16.0, use_rslora=False, target_modules=["q_proj"], layout_fingerprint="0" * 64,
                 peft_config={}, task=f"task-{i % 500}", weights_sha256=f"{i:064x}", config_sha256="0" * 64,
                 digest=f"{i:064x}", size_bytes=0, created_at=now, metrics={}, recipe={},
                 encoder=reg.encoder_id, embedding=vectors[i].tobytes()) for i in range(count)]
    with reg.session() as session:
        for start in range(0, count, 5000):
            session.execute(insert(Adapter), rows[start:start + 5000])


def bench_search(work: Path, sizes: list[int], queries: int) -> None:
    from registry.embeddings import embed_texts
    from registry.store import Registry

    rng = np.random.default_rng(0)
    for size in sizes:
        with Registry.open(work / f"home-search-{size}") as reg:
            seed_synthetic(reg, size, rng)
            start = time.perf_counter()
            reg.reindex()
            build = time.perf_counter() - start
            query_vectors = rng.standard_normal((queries, 384)).astype(np.float32)
            query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
            reg.search(query_vectors[0], k=5)  # warm: loads the index
            assert len(reg.search(query_vectors[1], k=5)) == 5
            plain = timed([lambda v=v: reg.search(v, k=5) for v in query_vectors])
            filtered = timed([lambda v=v: reg.search(v, k=5, exclude_tasks=["task-1"]) for v in query_vectors[:100]])
            print(f"search {size:>6} adapters [{reg._index.kind}, built in {build:.1f} s]: {percentiles(*plain)}")
            print(f"search {size:>6} adapters with --exclude-task filter: {percentiles(*filtered)}")
    embed_texts(["warm up"])
    samples = timed([lambda i=i: embed_texts([f"What is {i} plus {i}?"]) for i in range(100)])
    print(f"embedding one text query with all-MiniLM-L6-v2 (CPU): {percentiles(*samples)}")


def bench_fetch(work: Path, count: int) -> None:
    from conftest import build_tiny_llama, make_tiny_adapter_dir
    from registry.store import Registry

    base = work / "base-fetch"
    build_tiny_llama(base)
    with Registry.open(work / "home-fetch") as reg:
        refs = [reg.add_directory(make_tiny_adapter_dir(base, work / f"f{i}", seed=i), name=f"f{i}").ref
                for i in range(5)]
        reg.set_alias(refs[0], "prod")
        for ref in refs:
            reg.fetch(ref)  # first fetch materialises and verifies
        names = ["f1", "f0@prod", refs[2], "f3@1", "f4"]
        samples = timed([lambda r=names[i % 5]: reg.fetch(r) for i in range(count)])
        print(f"fetch (Python API, warm, name/alias/version refs): {percentiles(*samples)}")
        samples = timed([lambda r=refs[i % 5]: reg.fetch(r, verify=True) for i in range(50)])
        print(f"fetch with verify=True (re-hash): {percentiles(*samples)}")


def bench_cli_help(runs: int) -> None:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(["registry", "--help"], check=True, capture_output=True)
        samples.append(time.perf_counter() - t0)
    print(f"cold `registry --help` (new process each time): median {statistics.median(samples):.3f} s, "
          f"max {max(samples):.3f} s (n={runs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 100k search size")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"machine: {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}")
        bench_cli_help(10)
        bench_add(work, 20 if args.quick else 50)
        bench_fetch(work, 500)
        bench_search(work, sizes, 300)


if __name__ == "__main__":
    main()
