"""DnD generation latency, fp32 and bf16 side by side: warm (Python API, HTTP) and cold (the commands).

    python benchmarks/bench_generate.py --home /tmp/bench-dnd --setup     # fresh machine: build + train first
    python benchmarks/bench_generate.py --home DIR [--generator REF] [--prompts FILE]

One run prints, for each precision (``--precisions``, default ``fp32,bf16``), in one table:

- warm ``generate_state_dict_for`` (embed + decode, nothing stored; the artifact, the encoder and the
  decode plan already loaded) p50/p95 wall and CPU time, with its embed / decode parts;
- warm ``generate_adapter`` (the same plus storing a ``generated`` version) and warm
  ``POST /v1/generate`` on a server running in this process (``registry.http.app``, loopback);
- the relative difference of the bf16 adapter's weights from the fp32 one (same prompts);
- cold ``registry generate --precision P`` and ``registry compose --precision P -k 3`` as fresh
  subprocesses (``python -m cli.main``): wall and CPU time, and the breakdown the commands report
  (generate: outside the call = interpreter + imports + opening the registry, then load generator,
  encoder, embed, decode, store; compose: retrieve, compose, imports/open/store).

``--threads`` (default 1) pins torch's intra-op threads for the whole run, the cold subprocesses
included (the script re-executes itself with ``OMP_NUM_THREADS`` set): the figures are for that many
cores. On a shared machine wall time includes waiting for a core; CPU time (user + system, all
threads) is printed beside it and swings much less. Every adapter the benchmark stores is removed
again unless ``--keep``. ``--importtime`` adds the slowest top-level imports of one cold ``registry
generate`` (``python -X importtime``).

``--setup`` first fills an empty ``--home`` with synthetic harvested adapters of SmolLM2-135M's exact
LoRA shapes (``--tasks`` x ``--checkpoints``, rank ``--rank`` on ``--targets``; only the model's
config.json is written, no weights are needed to validate shapes) or of ``--base PATH``, and trains
the default DnD generator on them for ``--train-steps`` steps (the weights are random: this measures
speed, not quality; a few minutes on a 2-core CPU). It also writes a prompts file of 32 prompts when
``--prompts`` is not given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOLLM2_SHAPE = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
                     intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
SAMPLE_PROMPTS = [f"Sort these numbers in ascending order: {a}, {b}, {c}" for a, b, c in
                  [(5, 2, 9), (13, 7, 1), (42, 17, 23), (8, 3, 6), (99, 12, 54), (31, 4, 18), (7, 77, 17),
                   (61, 16, 6), (3, 30, 13), (25, 52, 5), (11, 1, 10), (88, 8, 80), (46, 64, 14), (9, 90, 19),
                   (70, 7, 27), (36, 63, 33)]]
SAMPLE_PROMPTS += [f"What is {a} times {b}, minus {c}? Answer with the number only." for a, b, c in
                   [(3, 4, 5), (12, 7, 9), (6, 6, 6), (21, 3, 14), (8, 9, 10), (15, 2, 7), (4, 44, 4), (9, 11, 1),
                    (13, 5, 20), (7, 8, 56), (2, 99, 98), (17, 3, 50), (5, 5, 25), (16, 4, 60), (10, 10, 99),
                    (14, 6, 80)]]  # 32 prompts of 14-21 tokens


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {"p50_ms": statistics.median(ordered) * 1000, "p95_ms": p95 * 1000, "n": len(ordered)}


# -----------------------------------------------------------------------------
# synthetic setup


def setup_synthetic(home: Path, args) -> str:
    """Harvested adapters with the base's exact LoRA shapes, and a generator trained on them."""
    import torch

    from generator.service import train_generator_from_registry
    from registry import base_models
    from registry.store import Registry

    if args.base:
        base = args.base
    else:
        base = str(home / "smollm2-135m-shape")
        Path(base).mkdir(parents=True, exist_ok=True)
        (Path(base) / "config.json").write_text(json.dumps(SMOLLM2_SHAPE))
    shapes = base_models.linear_module_shapes(base_models.load_base_config(base))
    targets = args.targets.split(",")
    modules = sorted(name for name in shapes if name.rsplit(".", 1)[-1] in targets)
    peft_config = {"r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": targets, "use_rslora": False,
                   "base_model_name_or_path": base}
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with Registry.open(home) as reg, reg.bulk():
        for t in range(args.tasks):
            task = f"synthetic-{t}"
            centre = {}
            for module in modules:
                out_features, in_features = shapes[module]
                centre[f"base_model.model.{module}.lora_A.weight"] = 0.02 * torch.randn(args.rank, in_features, generator=generator)
                centre[f"base_model.model.{module}.lora_B.weight"] = 0.02 * torch.randn(out_features, args.rank, generator=generator)
            prompts = [f"Task {t}, example {i}: " + SAMPLE_PROMPTS[(t + i) % len(SAMPLE_PROMPTS)] for i in range(24)]
            for c in range(args.checkpoints):
                weights = {k: v + 0.001 * torch.randn(v.shape, generator=generator) for k, v in centre.items()}
                reg.add_weights(f"{task}-ckpt", weights, peft_config, kind="harvested", task=task, prompts=prompts,
                                recipe={"task": task, "step": 100 + c, "synthetic": True}, metrics={"loss": 1.0})
    print(f"setup: {args.tasks} tasks x {args.checkpoints} synthetic harvested checkpoints "
          f"(r={args.rank}, {len(modules)} modules) in {time.perf_counter() - start:.1f} s")
    steps_done = []
    start = time.perf_counter()
    with Registry.open(home) as reg:
        info = train_generator_from_registry(reg, steps=args.train_steps, batch_size=args.batch_size,
                                             device=args.train_device, save_every=args.train_steps,
                                             on_step=lambda s, t, loss: steps_done.append(time.perf_counter()))
    step_times = [b - a for a, b in zip(steps_done, steps_done[1:])] or [0.0]
    config = info.meta["config"]
    print(f"setup: trained {info.ref} for {args.train_steps} steps in {time.perf_counter() - start:.1f} s "
          f"(decoder {info.meta['decoder_parameters'] / 1e6:.1f} M params, grid T={config['tokens']} "
          f"h={config['token_height']} w={config['token_width']}, N={config['n_prompts']} L={config['prompt_tokens']}; "
          f"step p50 {statistics.median(step_times) * 1000:.0f} ms at batch {args.batch_size} on {info.meta['training']['device']})")
    return info.ref


# -----------------------------------------------------------------------------
# warm


def _timed(call, calls: int) -> tuple[list, list, list]:
    walls, cpus, results = [], [], []
    for _ in range(calls):
        start, start_cpu = time.perf_counter(), time.process_time()
        results.append(call())
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return walls, cpus, results


def bench_warm(reg, generator_ref: str | None, prompts: list[str], precision: str, device: str, calls: int,
               refs: list, gate: bool = False) -> dict:
    from generator.service import generate_adapter, generate_state_dict_for

    out = {}
    start = time.perf_counter()
    _, _, first = generate_state_dict_for(reg, prompts, generator_ref, device=device, precision=precision, gate=gate)
    out["first_call_s"] = time.perf_counter() - start  # loads what this precision needs (bf16 copies, plan)
    walls, cpus, results = _timed(lambda: generate_state_dict_for(reg, prompts, generator_ref, device=device,
                                                                  precision=precision, gate=gate), calls)
    out["state_dict"], out["state_dict_cpu"] = percentiles(walls), percentiles(cpus)
    out["embed"] = percentiles([r[2]["embed_s"] for r in results])
    out["decode"] = percentiles([r[2]["decode_s"] for r in results])
    if gate:
        out["gate"] = percentiles([r[2]["gate_s"] for r in results])
    out["generator"] = first["generator"]
    out["weights"] = results[-1][0]

    name = f"bench-generate-{os.getpid()}"

    def stored():
        timings: dict = {}
        info = generate_adapter(reg, prompts, name, generator_ref, device=device, timings=timings, precision=precision,
                                gate=gate)
        refs.append(info.ref)
        return timings

    walls, cpus, results = _timed(stored, calls)
    out["adapter"], out["adapter_cpu"] = percentiles(walls), percentiles(cpus)
    out["store"] = percentiles([r["store_s"] for r in results])
    return out


def bench_http(reg, generator_ref: str | None, prompts: list[str], precisions: list[str], calls: int, refs: list) -> dict:
    """Warm ``POST /v1/generate`` on a server in this process; the precision is its default
    (``$REGISTRY_PRECISION``), set per run."""
    import urllib.request

    from cli.serve_commands import backends
    from registry.http.app import create_app
    from tests.server_helpers import ServerThread

    token = "bench-token"
    out = {}
    with ServerThread(create_app(reg, token=token, **backends())) as url:
        def post(name: str) -> float:
            body = {"prompts": prompts, "name": name}
            if generator_ref:
                body["generator"] = generator_ref
            request = urllib.request.Request(f"{url}/v1/generate", data=json.dumps(body).encode(), method="POST",
                                             headers={"Authorization": f"Bearer {token}",
                                                      "Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as response:
                data = json.loads(response.read())
            refs.append(data["ref"])
            if data["recipe"].get("precision") not in (None, os.environ.get("REGISTRY_PRECISION")):
                raise SystemExit(f"the server generated in {data['recipe'].get('precision')}")
            return time.perf_counter() - start

        previous = os.environ.get("REGISTRY_PRECISION")
        try:
            for precision in precisions:
                os.environ["REGISTRY_PRECISION"] = precision
                name = f"bench-http-{precision}-{os.getpid()}"
                post(name)  # warm-up: the server thread's first call
                out[precision] = percentiles([post(name) for _ in range(calls)])
        finally:
            if previous is None:
                os.environ.pop("REGISTRY_PRECISION", None)
            else:
                os.environ["REGISTRY_PRECISION"] = previous
    return out


def relative_difference(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    return (num / sum(float(v.double().pow(2).sum()) for v in b.values())) ** 0.5


# -----------------------------------------------------------------------------
# cold


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_cold(command: list[str]) -> tuple[float, float, dict]:
    start, before = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - before
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[3:5])} failed: {done.stderr.strip()}")
    return wall, cpu, json.loads(done.stdout)


def bench_cold(home: Path, generator_ref: str | None, prompts_file: Path, device: str, precision: str, runs: int,
               refs: list, gate: bool = False) -> dict:
    base = [sys.executable, "-m", "cli.main"]
    generate = base + ["generate", "--home", str(home), "--prompts", str(prompts_file), "--device", device,
                       "--precision", precision, "--json", "--name", f"bench-cold-{precision}-{os.getpid()}"]
    if generator_ref:
        generate += ["--generator", generator_ref]
    if gate:
        generate += ["--gate"]
    compose = base + ["compose", "--home", str(home), "--prompts", str(prompts_file), "-k", "3", "--precision",
                      precision, "--json", "--name", f"bench-cold-compose-{precision}-{os.getpid()}"]
    out = {"generate": [], "compose": []}
    for _ in range(runs):
        wall, cpu, data = _run_cold(generate)
        refs.append(data["ref"])
        t = data["timings"]
        out["generate"].append({"wall": wall, "cpu": cpu, "outside": wall - t["total_s"], "load": t["load_s"],
                                "encoder": t["encoder_s"], "embed": t["embed_s"], "decode": t["decode_s"],
                                "store": t["store_s"], **({"gate": t["gate_s"]} if gate else {})})
        wall, cpu, data = _run_cold(compose)
        refs.append(data["ref"])
        seconds = data["seconds"]
        out["compose"].append({"wall": wall, "cpu": cpu, "outside": wall - seconds["total"],
                               "retrieve": seconds.get("retrieve", 0.0), "compose": seconds.get("compose", 0.0),
                               "open/store": seconds["other"]})
    return out


def import_times(home: Path, generator_ref: str | None, prompts_file: Path, precision: str, refs: list,
                 top: int = 10) -> list[tuple[float, str]]:
    """The slowest top-level imports (cumulative) of one cold ``registry generate``."""
    command = [sys.executable, "-X", "importtime", "-m", "cli.main", "generate", "--home", str(home), "--prompts",
               str(prompts_file), "--precision", precision, "--json", "--name", f"bench-imports-{os.getpid()}"]
    if generator_ref:
        command += ["--generator", generator_ref]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode == 0:
        refs.append(json.loads(done.stdout)["ref"])
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if cumulative.strip().isdigit() and not name.startswith("  "):  # top level: no indentation
            rows.append((int(cumulative) / 1e6, name.strip()))
    return sorted(rows, reverse=True)[:top]


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


# -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="Registry home with a trained generator (or --setup).")
    parser.add_argument("--generator", help="Generator artifact REF (default: the latest DnD generator).")
    parser.add_argument("--prompts", type=Path, help="Prompts file (default with --setup: 32 sample prompts).")
    parser.add_argument("--precisions", default="fp32,bf16", help="Comma-separated precisions to compare.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) for the whole run.")
    parser.add_argument("--calls", type=int, default=20, help="Warm calls per measurement.")
    parser.add_argument("--cold-runs", type=int, default=3, help="Cold runs of each command per precision.")
    parser.add_argument("--no-http", action="store_true", help="Skip the POST /v1/generate measurement.")
    parser.add_argument("--no-cold", action="store_true", help="Skip the cold commands.")
    parser.add_argument("--importtime", action="store_true", help="List the slowest imports of a cold generate.")
    parser.add_argument("--device", default="cpu", help="Device for generation (cpu or cuda).")
    parser.add_argument("--gate", action="store_true", help="Generate with the entropy gate (a generator trained --under an adapter).")
    parser.add_argument("--keep", action="store_true", help="Keep the adapters the benchmark stores.")
    parser.add_argument("--json", action="store_true", help="Also print the figures as JSON.")
    setup = parser.add_argument_group("synthetic setup")
    setup.add_argument("--setup", action="store_true", help="Fill --home with synthetic harvested adapters and train a generator.")
    setup.add_argument("--base", help="Base model folder for --setup (default: SmolLM2-135M's shapes).")
    setup.add_argument("--tasks", type=int, default=4)
    setup.add_argument("--checkpoints", type=int, default=5)
    setup.add_argument("--rank", type=int, default=8)
    setup.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    setup.add_argument("--train-steps", type=int, default=10)
    setup.add_argument("--batch-size", type=int, default=8)
    setup.add_argument("--train-device", default=None)
    args = parser.parse_args()

    if os.environ.get("OMP_NUM_THREADS") != str(args.threads):  # pin threads before torch is imported
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import torch

    from registry.precision import resolve
    from registry.prompts import read_prompts_file
    from registry.store import Registry

    torch.set_num_threads(args.threads)
    precisions = [resolve(p, args.device) for p in args.precisions.split(",")]
    home = args.home.expanduser().resolve()
    generator_ref = args.generator
    if args.setup:
        generator_ref = generator_ref or setup_synthetic(home, args)
    prompts_file = args.prompts
    if prompts_file is None:
        if not args.setup:
            parser.error("--prompts FILE is required (or use --setup)")
        prompts_file = Path(tempfile.mkdtemp()) / "prompts.txt"
        prompts_file.write_text("\n".join(SAMPLE_PROMPTS) + "\n")
    prompts = read_prompts_file(prompts_file)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores, "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other jobs share these cores)"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU")
          + f"; {len(prompts)} prompts; native bf16: {resolve('auto', args.device) == 'bf16'}")
    refs: list[str] = []
    figures: dict = {"warm": {}, "cold": {}}
    with Registry.open(home) as reg:
        try:
            for precision in precisions:
                figures["warm"][precision] = bench_warm(reg, generator_ref, prompts, precision, args.device,
                                                        args.calls, refs, args.gate)
            if not args.no_http:
                figures["http"] = bench_http(reg, generator_ref, prompts, precisions, args.calls, refs)
        finally:
            if not args.keep:
                for ref in refs:
                    reg.remove(ref)
                refs.clear()
    warm = figures["warm"]
    if {"fp32", "bf16"} <= set(warm):
        figures["bf16_vs_fp32_relative_weight_difference"] = relative_difference(warm["bf16"]["weights"],
                                                                                 warm["fp32"]["weights"])
    for entry in warm.values():
        entry.pop("weights")
    try:
        if not args.no_cold:
            for precision in precisions:
                figures["cold"][precision] = bench_cold(home, generator_ref, prompts_file, args.device, precision,
                                                        args.cold_runs, refs, args.gate)
        if args.importtime:
            figures["imports"] = import_times(home, generator_ref, prompts_file, precisions[-1], refs)
    finally:
        if not args.keep and refs:
            with Registry.open(home) as reg:
                for ref in refs:
                    reg.remove(ref)

    generator = next(iter(warm.values()))["generator"]
    print(f"generator {generator}, device {args.device}")
    width = 26
    print(f"\n{'warm (ms)':<46}" + "".join(f"{p:>{width}}" for p in precisions))

    def row(label: str, cells: list[str]) -> None:
        print(f"{label:<46}" + "".join(f"{c:>{width}}" for c in cells))

    def pair(stats: dict) -> str:
        return f"p50 {stats['p50_ms']:7.1f}  p95 {stats['p95_ms']:7.1f}"

    row("first call (loads this precision's copies)", [f"{warm[p]['first_call_s'] * 1000:.1f}" for p in precisions])
    row("generate_state_dict_for (embed+decode) wall", [pair(warm[p]["state_dict"]) for p in precisions])
    row("  CPU time (all threads)", [pair(warm[p]["state_dict_cpu"]) for p in precisions])
    row("  of which embed (32 prompts)", [pair(warm[p]["embed"]) for p in precisions])
    row("  of which decode (decoder + de-tokenise)", [pair(warm[p]["decode"]) for p in precisions])
    if args.gate:
        row("  of which the entropy gate", [pair(warm[p]["gate"]) for p in precisions])
    row("generate_adapter (+ store) wall", [pair(warm[p]["adapter"]) for p in precisions])
    row("  CPU time (all threads)", [pair(warm[p]["adapter_cpu"]) for p in precisions])
    row("  of which store", [pair(warm[p]["store"]) for p in precisions])
    if "http" in figures:
        row("POST /v1/generate (loopback, + store) wall", [pair(figures["http"][p]) for p in precisions])
    if "bf16_vs_fp32_relative_weight_difference" in figures:
        print(f"bf16 adapter vs fp32 adapter: relative weight difference "
              f"{figures['bf16_vs_fp32_relative_weight_difference']:.2e} (||bf16 - fp32|| / ||fp32||)")
    cold = figures["cold"]
    if cold:
        print(f"\n{'cold commands (s, median of ' + str(args.cold_runs) + ')':<46}" + "".join(f"{p:>{width}}" for p in precisions))
        row("registry generate: wall / CPU", [f"{median(cold[p]['generate'], 'wall'):.2f} / "
                                              f"{median(cold[p]['generate'], 'cpu'):.2f}" for p in precisions])
        for key, label in (("outside", "python + imports + open registry"), ("load", "load generator"),
                           ("encoder", "load encoder"), ("embed", "embed"), ("decode", "decode"),
                           ("store", "store (validate + write)"), *((("gate", "the entropy gate"),) if args.gate else ())):
            row(f"  {label}", [f"{median(cold[p]['generate'], key):.2f}" for p in precisions])
        row("registry compose -k 3: wall / CPU", [f"{median(cold[p]['compose'], 'wall'):.2f} / "
                                                  f"{median(cold[p]['compose'], 'cpu'):.2f}" for p in precisions])
        for key, label in (("outside", "python + imports (before the call)"),
                           ("retrieve", "retrieve (incl. loading the encoder)"), ("compose", "compose"),
                           ("open/store", "open registry + store")):
            row(f"  {label}", [f"{median(cold[p]['compose'], key):.2f}" for p in precisions])
    if figures.get("imports"):
        print("\nslowest top-level imports of a cold `registry generate` (cumulative s):")
        for seconds, name in figures["imports"]:
            print(f"  {seconds:6.2f}  {name}")
    if args.json:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
