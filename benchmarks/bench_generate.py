"""DnD generation latency: warm (Python API, process loaded) and cold (`registry generate` as a command).

    python benchmarks/bench_generate.py --home DIR [--generator REF] --prompts FILE
    python benchmarks/bench_generate.py --home /tmp/bench-dnd --setup      # synthetic, see below

Warm: p50/p95 over ``--calls`` calls of ``generate_state_dict_for`` (embed + decode, nothing
stored) and of ``generate_adapter`` (the same plus storing a `generated` version), after one
warm-up call that loads the encoder and decodes the generator artifact. Cold: ``registry
generate`` run as a fresh subprocess (``python -m cli.main``), wall time, ``--cold-runs`` times.
Every adapter the benchmark stores is removed again unless ``--keep``. Wall times on a shared
machine include waiting for a core; the process CPU time (summed over threads) is printed beside
them, and with ``OMP_NUM_THREADS=1`` it is what the call costs on one idle core. Measured on the CPU and,
when CUDA is available, on the GPU as well.

``--setup`` first fills an empty ``--home`` with synthetic harvested adapters of SmolLM2-135M's
exact shapes (``--tasks`` x ``--checkpoints``, rank ``--rank`` on ``--targets``; only the model's
config.json is written, no weights are needed to validate shapes) or of ``--base PATH``, and trains
a generator on them for ``--train-steps`` steps (the weights are random: this measures speed, not
quality). It also writes a prompts file when ``--prompts`` is not given.
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


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {"p50_ms": statistics.median(ordered) * 1000, "p95_ms": p95 * 1000, "n": len(ordered)}


def show(label: str, stats: dict) -> None:
    print(f"  {label:<44} p50 {stats['p50_ms']:8.1f} ms   p95 {stats['p95_ms']:8.1f} ms   (n={stats['n']})")


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
    step_times = [b - a for a, b in zip(steps_done, steps_done[1:])]
    config = info.meta["config"]
    print(f"setup: trained {info.ref} for {args.train_steps} steps in {time.perf_counter() - start:.1f} s "
          f"(decoder {info.meta['decoder_parameters'] / 1e6:.1f} M params, grid T={config['tokens']} "
          f"h={config['token_height']} w={config['token_width']}; "
          f"step p50 {statistics.median(step_times) * 1000:.0f} ms at batch {args.batch_size} on {info.meta['training']['device']})")
    return info.ref


# -----------------------------------------------------------------------------
# measurements


def bench_warm(home: Path, generator_ref: str | None, prompts: list[str], device: str, calls: int, keep: bool) -> dict:
    from generator.service import clear_generator_cache, generate_adapter, generate_state_dict_for
    from registry.store import Registry

    clear_generator_cache()
    results = {}
    with Registry.open(home) as reg:
        start = time.perf_counter()
        _, _, first = generate_state_dict_for(reg, prompts, generator_ref, device=device)
        results["first_call_s"] = time.perf_counter() - start
        results["first_call_load_s"] = first["load_s"]
        totals, cpu, embeds, decodes = [], [], [], []
        for _ in range(calls):
            start, start_cpu = time.perf_counter(), time.process_time()
            _, _, timings = generate_state_dict_for(reg, prompts, generator_ref, device=device)
            totals.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            embeds.append(timings["embed_s"])
            decodes.append(timings["decode_s"])
        results["state_dict"] = percentiles(totals)
        results["state_dict_cpu"] = percentiles(cpu)
        results["embed"] = percentiles(embeds)
        results["decode"] = percentiles(decodes)
        stored, stored_cpu, stores, refs = [], [], [], []
        name = f"bench-generate-{os.getpid()}"
        for _ in range(calls):
            timings: dict = {}
            start, start_cpu = time.perf_counter(), time.process_time()
            info = generate_adapter(reg, prompts, name, generator_ref, device=device, timings=timings)
            stored.append(time.perf_counter() - start)
            stored_cpu.append(time.process_time() - start_cpu)
            stores.append(timings["store_s"])
            refs.append(info.ref)
        results["adapter"] = percentiles(stored)
        results["adapter_cpu"] = percentiles(stored_cpu)
        results["store"] = percentiles(stores)
        results["generator"] = first["generator"]
        if not keep:
            for ref in refs:
                reg.remove(ref)
    return results


def bench_cold(home: Path, generator_ref: str | None, prompts_file: Path, device: str, runs: int, keep: bool) -> dict:
    from registry.store import Registry

    name = f"bench-cold-{os.getpid()}"
    command = [sys.executable, "-m", "cli.main", "generate", "--home", str(home), "--prompts", str(prompts_file),
               "--name", name, "--device", device, "--json"]
    if generator_ref:
        command += ["--generator", generator_ref]
    walls, cpu, inner, refs = [], [], [], []
    for _ in range(runs):
        start, before = time.perf_counter(), _children_cpu()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        cpu.append(_children_cpu() - before)
        if done.returncode != 0:
            raise SystemExit(f"registry generate failed: {done.stderr.strip()}")
        output = json.loads(done.stdout)
        inner.append(output["timings"]["total_s"])
        refs.append(output["ref"])
    if not keep:
        with Registry.open(home) as reg:
            for ref in refs:
                reg.remove(ref)
    return {"wall": percentiles(walls), "cpu": percentiles(cpu), "in_command": percentiles(inner)}


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="Registry home with a trained generator.")
    parser.add_argument("--generator", help="Generator artifact REF (default: the latest DnD generator).")
    parser.add_argument("--prompts", type=Path, help="Prompts file (one per line or JSONL).")
    parser.add_argument("--calls", type=int, default=20, help="Warm calls per measurement.")
    parser.add_argument("--cold-runs", type=int, default=3, help="`registry generate` subprocess runs.")
    parser.add_argument("--devices", default=None, help="Comma-separated devices (default: cpu, plus cuda when available).")
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

    import torch

    from registry.prompts import read_prompts_file

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
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} cores, load {load:.1f}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU")
          + f"; {len(prompts)} prompts")
    figures = {}
    for device in devices:
        warm = bench_warm(home, generator_ref, prompts, device, args.calls, args.keep)
        cold = bench_cold(home, generator_ref, prompts_file, device, args.cold_runs, args.keep)
        figures[device] = {"warm": warm, "cold": cold}
        print(f"[{device}] generator {warm['generator']}")
        print(f"  first call in a fresh process (encoder + artifact load)  {warm['first_call_s'] * 1000:8.1f} ms "
              f"(artifact load {warm['first_call_load_s'] * 1000:.1f} ms)")
        show("warm generate_state_dict_for (embed+decode)", warm["state_dict"])
        show("  of which embed", warm["embed"])
        show("  of which decode", warm["decode"])
        show("  CPU time of the process (all threads)", warm["state_dict_cpu"])
        show("warm generate_adapter (incl. storing)", warm["adapter"])
        show("  of which store", warm["store"])
        show("  CPU time of the process (all threads)", warm["adapter_cpu"])
        show("cold `registry generate` (wall, subprocess)", cold["wall"])
        show("  CPU time of the command (all threads)", cold["cpu"])
        show("  of which inside the command (from its JSON)", cold["in_command"])
    if args.json:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
