"""Concurrency and crash probes of the registry (issue 17): real processes, real SIGKILLs.

    python benchmarks/probe_races.py                                  # SQLite, 8 writers x 50 adds
    python benchmarks/probe_races.py --postgres-url postgresql+psycopg://...   # also PostgreSQL (EMPTIED)
    python benchmarks/probe_races.py --writers 8 --adds 1000          # the long run
    python benchmarks/probe_races.py --json out.json                  # the results as JSON too

Probes (each on a fresh registry; PostgreSQL: the given database's ``public`` schema is dropped):

- ``hot``: W writer processes x N adds to one name; ``mixed``: the same over 5 names per writer,
  with an ``alias`` and an ``update_metrics`` after every add and an ``rm`` of every 10th add;
- ``open``: 4 processes opening a brand-new registry at the same instant, one add each;
- ``doctor``: ``doctor --repair`` run in a loop by one process while another adds;
- ``kill``: a writer SIGKILLed at a random time, K times, each followed by ``doctor --repair``.

After each: rows vs acknowledged adds (lost), duplicate or gapped versions, rows whose blob is
missing or fails its digest, the FAISS index file's ids vs SQL's live ids, and ``doctor``'s verdict.
``tests/test_concurrency.py`` runs the same probes with small counts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Before: the same probes run on the tree before the fixes (b732d85, a git worktree, same 2-core
# machine under load, 8 writers x 50 adds); the issue's own figures at 4cfa329 in brackets.
BEFORE = {
    "hot/sqlite": "394/400 rows, 6 failed (could not allocate a version), index 76/394 ids [77-95 of 400]",
    "mixed/sqlite": "12 failed (alias IntegrityError, StaleDataError), index 53/361 ids",
    "open/sqlite": "0 of 4 crashed [3 of 4 crashed, OperationalError]",
    "doctor/sqlite": "78 committed adds lost their blob [10]",
    "kill/sqlite": "0 half-visible, clean after repair 10/10 [index/.tmp-* never reported]",
    "hot/postgresql": "233/400 rows, 167 failed (could not allocate a version) [16-18 %], index 27/233 ids",
    "mixed/postgresql": "11 failed, index 51/361 ids",
    "open/postgresql": "3 of 4 writers crashed",
    "doctor/postgresql": "111 committed adds lost their blob",
    "kill/postgresql": "0 half-visible, clean after repair 10/10",
}

RANK, HIDDEN, KV_OUT, LAYERS, DIM = 4, 32, 16, 2, 384


# -- the tiny base and random adapters --------------------------------------------------------------
def make_base(directory: Path) -> Path:
    """A 2-layer llama config folder (the registry only reads the config to check shapes)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=320, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=True).save_pretrained(directory)
    return directory


def random_adapter(seed: int, base: Path) -> tuple[dict, dict, np.ndarray]:
    """(state dict, adapter config, one unit prompt embedding) for the tiny base."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(LAYERS):
        for module, out in (("q_proj", HIDDEN), ("v_proj", KV_OUT)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=gen) * 0.05
            state[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=gen) * 0.05
    config = {"r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["q_proj", "v_proj"],
              "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return state, config, (vector / np.linalg.norm(vector))[None, :]


# -- worker processes ------------------------------------------------------------------------------
def _open(home: str, url: str):
    from registry.store import Registry

    return Registry.open(home, url)


def writer(home: str, url: str, base: str, w: int, adds: int, mode: str, out: str, start_at: float) -> None:
    """Add ``adds`` adapters; write what was acknowledged (ref, seconds) and what failed to ``out``."""
    time.sleep(max(0.0, start_at - time.time()))
    acked, failed, seconds = [], [], []
    began = time.time()
    reg = None
    try:
        reg = _open(home, url)
        for i in range(adds):
            name = "hot" if mode == "hot" else f"n{(w * 7 + i) % 5}"
            state, config, vec = random_adapter(w * 1_000_003 + i, Path(base))
            t0 = time.perf_counter()
            try:
                info = reg.add_weights(name, state, config, kind="imported", prompts=[f"writer {w} add {i}"],
                                       prompt_embeddings=vec)
                acked.append(info.ref)
                if mode == "mixed":
                    reg.set_alias(info.ref, "newest")
                    reg.update_metrics(name, {f"w{w}": i})
                    if i % 10 == 9:
                        reg.remove(info.ref)
                        acked.pop()
            except Exception as exc:  # noqa: BLE001 - counted, that is the probe
                failed.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            seconds.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a crash on open is what the `open` probe counts
        failed.append(f"open: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    finally:
        if reg is not None:
            reg.close()
    Path(out).write_text(json.dumps({"acked": acked, "failed": failed, "seconds": seconds,
                                     "began": began, "ended": time.time()}))


def repairer(home: str, url: str, times: int, out: str, stop_file: str) -> None:
    reg = _open(home, url)
    runs, repaired = 0, 0
    while runs < times or not Path(stop_file).exists():
        report = reg.doctor(repair=True)
        runs, repaired = runs + 1, repaired + len(report.repaired)
        if Path(stop_file).exists() and runs >= times:
            break
    reg.close()
    Path(out).write_text(json.dumps({"runs": runs, "repaired": repaired}))


# -- checking the result ---------------------------------------------------------------------------
def check(home: Path, url: str, acked: list[str]) -> dict:
    """Lost adds, version problems, broken blobs, index file vs SQL, doctor's verdict."""
    from sqlalchemy import select

    from registry.blobs import sha256_file
    from registry.index import AdapterIndex
    from registry.schema import Adapter

    reg = _open(str(home), url)
    with reg.session() as session:
        rows = session.execute(select(Adapter.id, Adapter.name, Adapter.version, Adapter.weights_sha256,
                                      Adapter.removed_at)).all()
    live = [r for r in rows if r.removed_at is None]
    refs = {f"{r.name}@{r.version}" for r in live}
    lost = sorted(set(acked) - refs)
    versions: dict[str, list[int]] = {}
    for r in rows:
        versions.setdefault(r.name, []).append(r.version)
    bad_versions = sum(len(v) - len(set(v)) + (sorted(set(v)) != list(range(1, len(set(v)) + 1)))
                       for v in versions.values())
    broken = sum(1 for r in live if not reg.blobs.path(r.weights_sha256).exists()
                 or sha256_file(reg.blobs.path(r.weights_sha256)) != r.weights_sha256)
    index = AdapterIndex(home / "index", DIM, reg.encoder_id)
    in_index = index.ids() if index.load() else set()
    live_ids = {r.id for r in live}
    report = reg.doctor()
    reg.close()
    return {"rows": len(live), "acked": len(acked), "lost": len(lost), "bad_versions": bad_versions,
            "broken_blobs": broken, "index_ids": len(in_index & live_ids), "index_stale": len(in_index - live_ids),
            "live_ids": len(live_ids), "doctor_problems": report.problems[:5], "doctor_ok": report.ok}


# -- probes ---------------------------------------------------------------------------------------
def fresh_store(work: Path, backend: str, pg_url: str | None, tag: str) -> tuple[Path, str]:
    home = work / f"{tag}-{backend}"
    home.mkdir(parents=True)
    if backend == "sqlite":
        return home, f"sqlite:///{home / 'registry.db'}"
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return home, pg_url


def run_writers(home, url, base, writers, adds, mode, work: Path, delay: float = 1.0) -> dict:
    ctx = multiprocessing.get_context("spawn")
    outs = [str(work / f"{home.name}-w{w}.json") for w in range(writers)]
    start_at = time.time() + delay + 0.5 * writers  # every process imported and waiting before the start
    procs = [ctx.Process(target=writer, args=(str(home), url, str(base), w, adds, mode, outs[w], start_at))
             for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    results = [json.loads(Path(o).read_text()) if Path(o).exists() else {"acked": [], "failed": ["no result"],
                                                                             "seconds": []} for o in outs]
    seconds = [s for r in results for s in r["seconds"]]
    # from the first writer's start to the last one's end (imports excluded)
    span = max((r["ended"] for r in results if "ended" in r), default=0) - \
        min((r["began"] for r in results if "began" in r), default=0)
    return {"acked": [a for r in results for a in r["acked"]], "failed": [f for r in results for f in r["failed"]],
            "crashed_writers": sum(1 for r in results if any(f.startswith("open:") for f in r["failed"])),
            "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 1) if seconds else None,
            "ops": len(seconds), "seconds": seconds, "span_s": span}


def probe_writers(work, backend, pg_url, base, writers, adds, mode) -> dict:
    home, url = fresh_store(work, backend, pg_url, mode)
    reg = _open(str(home), url)  # the registry exists before the writers start (the `open` probe is separate)
    reg.close()
    run = run_writers(home, url, base, writers, adds, mode, work)
    result = check(home, url, run["acked"])
    return {**result, "failed": len(run["failed"]), "failures": sorted(set(run["failed"]))[:3],
            "p99_ms": run["p99_ms"], "ops_per_s": round(run["ops"] / max(1e-9, run["span_s"]), 1),
            "wall_s": round(run["span_s"], 1), "expected": writers * adds - (writers * (adds // 10) if mode == "mixed" else 0)}


def probe_open(work, backend, pg_url, base, writers=4) -> dict:
    home, url = fresh_store(work, backend, pg_url, "open")
    run = run_writers(home, url, base, writers, 1, "hot", work, delay=2.0)
    return {**check(home, url, run["acked"]), "crashed_writers": run["crashed_writers"], "failed": len(run["failed"]),
            "failures": sorted(set(run["failed"]))[:3], "writers": writers}


def probe_doctor(work, backend, pg_url, base, adds, repairs) -> dict:
    home, url = fresh_store(work, backend, pg_url, "doctor")
    _open(str(home), url).close()
    ctx = multiprocessing.get_context("spawn")
    stop = work / f"{home.name}.stop"
    rep_out = work / f"{home.name}-repair.json"
    rep = ctx.Process(target=repairer, args=(str(home), url, repairs, str(rep_out), str(stop)))
    rep.start()
    run = run_writers(home, url, base, 1, adds, "hot", work)
    stop.write_text("")
    rep.join()
    repaired = json.loads(rep_out.read_text())
    return {**check(home, url, run["acked"]), "failed": len(run["failed"]), "repair_runs": repaired["runs"],
            "adds": adds}


KILL_WORKER = """
import sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
from probe_races import writer
writer({home!r}, {url!r}, {base!r}, {w}, 1000, "hot", {out!r}, 0)
"""


def probe_kill(work, backend, pg_url, base, kills) -> dict:
    """SIGKILL a writer at a random moment ``kills`` times; after each, repair and check."""
    home, url = fresh_store(work, backend, pg_url, "kill")
    _open(str(home), url).close()
    rng = random.Random(17)
    half_visible, problems_seen, after_repair = 0, 0, []
    for k in range(kills):
        code = KILL_WORKER.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), home=str(home), url=url,
                                  base=str(base), w=k, out=str(work / f"kill-{k}.json"))
        proc = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(3.0 + rng.random() * 2.0)  # imports take ~2-3 s; the kill lands among the adds
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reg = _open(str(home), url)
        report = reg.doctor()
        problems_seen += len(report.problems)
        for info in reg.list_adapters(name="hot"):
            try:
                reg.load_weights(info.ref)
            except Exception:  # noqa: BLE001 - a listed adapter that cannot be read is half-visible
                half_visible += 1
        reg.doctor(repair=True)
        after_repair.append(reg.doctor().ok)
        reg.close()
    result = check(home, url, [])
    return {**result, "kills": kills, "half_visible": half_visible, "problems_reported": problems_seen,
            "clean_after_repair": sum(after_repair)}


# -- the table ------------------------------------------------------------------------------------
def row_text(probe: str, r: dict) -> str:
    if probe in ("hot", "mixed"):
        return (f"{r['rows']}/{r['expected']} rows, {r['failed']} failed, {r['lost']} lost, {r['bad_versions']} "
                f"version problems, {r['broken_blobs']} broken blobs, index {r['index_ids']}/{r['live_ids']} ids "
                f"({r['index_stale']} stale), doctor {'clean' if r['doctor_ok'] else r['doctor_problems']}; "
                f"{r['ops_per_s']} ops/s, p99 {r['p99_ms']} ms")
    if probe == "open":
        return (f"{r['crashed_writers']} of {r['writers']} writers crashed, {r['rows']} rows, "
                f"doctor {'clean' if r['doctor_ok'] else r['doctor_problems']}")
    if probe == "doctor":
        return (f"{r['repair_runs']} repairs during {r['adds']} adds: {r['broken_blobs']} committed adds lost their "
                f"blob, {r['lost']} lost, index {r['index_ids']}/{r['live_ids']}, "
                f"doctor {'clean' if r['doctor_ok'] else r['doctor_problems']}")
    return (f"{r['kills']} kills: {r['half_visible']} half-visible, {r['problems_reported']} problems reported, "
            f"clean after repair {r['clean_after_repair']}/{r['kills']}, {r['bad_versions']} version problems")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--adds", type=int, default=50)
    parser.add_argument("--repairs", type=int, default=10)
    parser.add_argument("--doctor-adds", type=int, default=200)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--probes", default="hot,mixed,open,doctor,kill")
    parser.add_argument("--backends", default=None, help="sqlite,postgresql (default: both when a URL is given)")
    parser.add_argument("--postgres-url", default=os.environ.get("REGISTRY_TEST_POSTGRES_URL"),
                        help="a PostgreSQL database to EMPTY and use (default $REGISTRY_TEST_POSTGRES_URL)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    backends = (args.backends or ("sqlite,postgresql" if args.postgres_url else "sqlite")).split(",")
    results = {}
    with tempfile.TemporaryDirectory(prefix="probe-races-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("REGISTRY_MODELS_DIR", str(work / "models"))
        base = make_base(work / "tiny-base")
        from registry import base_models

        base_models.base_info(base)  # warm the shared shape cache: workers never import transformers
        for backend in backends:
            for probe in args.probes.split(","):
                if probe in ("hot", "mixed"):
                    r = probe_writers(work, backend, args.postgres_url, base, args.writers, args.adds, probe)
                elif probe == "open":
                    r = probe_open(work, backend, args.postgres_url, base)
                elif probe == "doctor":
                    r = probe_doctor(work, backend, args.postgres_url, base, args.doctor_adds, args.repairs)
                elif probe == "kill":
                    r = probe_kill(work, backend, args.postgres_url, base, args.kills)
                else:
                    parser.error(f"unknown probe {probe}")
                results[f"{probe}/{backend}"] = r
                print(f"{probe}/{backend}: {row_text(probe, r)}", flush=True)
    print()
    print(f"| probe ({args.writers} writers x {args.adds} adds) | before (b732d85; [issue 17]) | after |")
    print("|---|---|---|")
    for key, r in results.items():
        print(f"| {key} | {BEFORE.get(key, '')} | {row_text(key.split('/')[0], r)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
