"""Harvest and evaluation throughput, each precision side by side in one run, same task, same steps.

    python benchmarks/bench_harvest.py --tasks add_sub --steps 20            # speed only
    python benchmarks/bench_harvest.py --tasks add_sub,weekday --steps 120 --eval --limit 100

Each row trains the same LoRA recipe from the same seed on the same batches and (with ``--eval``)
scores base and LoRA on the same test items. Rows (``--modes``):

- ``before``: fp32, training with torch's SDPA attention and PEFT's own LoRA forward: what the
  project ran before the precision policy (the baseline of the performance issue);
- ``fp32``: fp32, training with the plain attention the project's CPU harvest now uses and the fused
  LoRA update (``registry.lm.lean_lora_layers``);
- ``bf16``: the bf16 policy (frozen base in bfloat16, bf16 autocast, fp32 LoRA master weights),
  plain attention for training, fused LoRA update; ``bf16-sdpa``: the same with SDPA for training;
  ``bf16-peft``: the same with PEFT's own LoRA forward.
Evaluation always runs with SDPA (the project's choice for decoding), in the mode's precision, in
batches of ``harvest.evaluate.DEFAULT_EVAL_BATCH`` (``before``: 16, the old default).

Speed figures: training tokens/s (prompt + answer tokens, no padding), median seconds per step
(wall and CPU: the process runs one thread, so its CPU time is steadier than wall time on a shared
machine), evaluation items/s (per wall and per CPU second) of the base model on ``--eval-items`` test items. Ratios are against ``before``.
With ``--rounds N`` the modes run in turn N times and each keeps its best round (machine load
then hits every mode alike; on a shared 2-core machine a single round can be off by 2x).
Prints one line per (task, mode) and a JSON summary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit_summary  # noqa: E402

MODES = {"before": ("fp32", "sdpa", False), "fp32": ("fp32", "eager", True), "bf16": ("bf16", "eager", True),
         "bf16-sdpa": ("bf16", "sdpa", True),  # what bf16 would give with torch's SDPA attention
         "bf16-peft": ("bf16", "eager", False)}  # bf16 with PEFT's own LoRA forward (no fused update)


def load_model(base, device, precision: str):
    """A fresh (uncached) base model stored for ``precision`` (evaluation's attention: SDPA)."""
    from registry import base_models
    from registry.precision import frozen_dtype

    return base_models.load_base(base, device=device, dtype=frozen_dtype(precision), cached=False)


def run_mode(task, mode: str, args, threads: int) -> dict:
    from harvest.evaluate import evaluate
    from harvest.train import HarvestConfig, harvest

    precision, attention, fused = MODES[mode]
    config = HarvestConfig(steps=args.steps, batch_size=args.batch_size,
                           n_checkpoints=min(HarvestConfig.n_checkpoints, args.steps))
    row: dict = {"precision": precision, "attention": attention, "fused_lora": fused}

    model, tokenizer = load_model(args.base, args.device, precision)
    cpu0 = time.process_time()
    eval_batch = {"batch_size": 16} if mode == "before" else {}  # the old default; now DEFAULT_EVAL_BATCH
    base_eval = evaluate(task, model, tokenizer, limit=args.limit if args.eval else args.eval_items,
                         device=args.device, threads=threads, precision=precision, **eval_batch)
    row["eval_items_s"] = round(base_eval.n / base_eval.seconds, 2)
    row["eval_items_cpu_s"] = round(base_eval.n / (time.process_time() - cpu0), 2)  # per CPU second
    if args.eval:
        row["base_acc"] = base_eval.accuracy

    stamps: list[tuple[float, float]] = []  # (wall, CPU) after each step
    t0 = time.perf_counter()
    result = harvest(task, model=model, tokenizer=tokenizer, config=config, device=args.device, threads=threads,
                     precision=precision, attention=attention, fused_lora=fused,
                     on_step=lambda step, loss: stamps.append((time.perf_counter(), time.process_time())))
    steps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu_steps = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    row.update({
        "wall_s": round(time.perf_counter() - t0, 1),
        "sec_per_step": round(statistics.median(steps), 3) if steps else None,
        "cpu_sec_per_step": round(statistics.median(cpu_steps), 3) if cpu_steps else None,
        "train_tok_s": round(result.tokens_per_second, 1),
        "final_loss": round(sum(result.losses[-10:]) / len(result.losses[-10:]), 4),
    })
    if args.eval:
        lora_model, lora_tokenizer = load_model(args.base, args.device, precision)
        lora_eval = evaluate(task, lora_model, lora_tokenizer, adapter=result.state_dict, lora=config,
                             limit=args.limit, device=args.device, threads=threads, precision=precision)
        row["lora_acc"] = lora_eval.accuracy
        row["lora_answers"] = [p.prediction for p in lora_eval.predictions]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="add_sub", help="comma-separated zoo task names")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", default="before,fp32,bf16", help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--base", default=None, help="base model name or local folder (default: SmolLM2)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--eval", action="store_true", help="also train-to-accuracy: score base and LoRA")
    parser.add_argument("--limit", type=int, default=100, help="test items for --eval")
    parser.add_argument("--eval-items", type=int, default=32, help="test items for the eval speed figure")
    parser.add_argument("--rounds", type=int, default=1, help="run the modes in turn N times, keep each one's best")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here too")
    args = parser.parse_args(argv)

    from harvest.train import configure_threads
    from harvest.zoo import load_zoo_task
    from registry.base_models import load_base
    from registry.precision import native_bf16

    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(unknown)}")
    threads = configure_threads(args.threads)
    t0 = time.perf_counter()
    load_base(args.base, device=args.device, cached=False)  # converts the GGUF on first use
    print(f"base ready in {time.perf_counter() - t0:.1f}s, torch threads={threads}, "
          f"native bf16: {native_bf16(args.device or 'cpu')}", flush=True)

    summary: dict = {}
    for name in [n for n in args.tasks.split(",") if n]:
        task = load_zoo_task(name)
        rows: dict = {}
        for round_index in range(args.rounds):
            for mode in modes:
                row = run_mode(task, mode, args, threads)
                shown = {k: v for k, v in row.items() if k != "lora_answers"}
                print(f"{name:20s} {mode:7s} round {round_index + 1}: " + " ".join(f"{k}={v}" for k, v in shown.items()),
                      flush=True)
                if mode not in rows:
                    rows[mode] = row
                else:  # keep the best speed figures; accuracy is the same run to run
                    best = rows[mode]
                    best["train_tok_s"] = max(best["train_tok_s"], row["train_tok_s"])
                    best["eval_items_s"] = max(best["eval_items_s"], row["eval_items_s"])
                    for key in ("sec_per_step", "cpu_sec_per_step"):
                        best[key] = min(best[key], row[key])
                    best["eval_items_cpu_s"] = max(best["eval_items_cpu_s"], row["eval_items_cpu_s"])
        if "before" in rows:
            for mode, row in rows.items():
                row["train_tok_s_x"] = round(row["train_tok_s"] / rows["before"]["train_tok_s"], 2)
                row["eval_items_s_x"] = round(row["eval_items_s"] / rows["before"]["eval_items_s"], 2)
                row["cpu_step_x"] = round(rows["before"]["cpu_sec_per_step"] / row["cpu_sec_per_step"], 2)
                row["eval_cpu_x"] = round(row["eval_items_cpu_s"] / rows["before"]["eval_items_cpu_s"], 2)
        if args.eval and "fp32" in rows and "bf16" in rows:
            a, b = rows["fp32"]["lora_answers"], rows["bf16"]["lora_answers"]
            rows["bf16"]["same_answer_as_fp32"] = round(sum(x == y for x, y in zip(a, b)) / max(1, len(a)), 3)
        for row in rows.values():
            row.pop("lora_answers", None)
        summary[name] = rows
        for mode, row in rows.items():
            extra = "" if "train_tok_s_x" not in row else \
                (f"  train x{row['train_tok_s_x']} (CPU time x{row['cpu_step_x']})  eval x{row['eval_items_s_x']} "
                 f"(CPU time x{row['eval_cpu_x']})")
            if "same_answer_as_fp32" in row:
                extra += f"  same answers as fp32: {row['same_answer_as_fp32']:.1%}"
            print(f"{name:20s} {mode:7s} tok/s {row['train_tok_s']:8.1f}  s/step {row['sec_per_step']}  "
                  f"eval items/s {row['eval_items_s']:6.2f}{extra}", flush=True)
    emit_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
