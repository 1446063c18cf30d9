"""Does the entropy gate's signal tell a fitting adapter from a wrong one? For each held-out task: the
multitask LoRA alone and the multitask LoRA plus each pool task's final adapter (ΔW summed, as
``registry compose --add``), each scored on the task's test items and measured by the mean entropy of
the base's first answer token on the same prompts (``registry.confidence``; no answers used).

    python benchmarks/gate_signal.py --home H --tasks para_plus.jsonl,plus_words \\
        --pool add_sub,times_small,ja_hiku --multitask multitask-6adf3896a8@3 --limit 50 --out gate.json

Prints one line per (task, candidate): accuracy, mean entropy, and whether the gate (the candidate
against the multitask LoRA alone) would keep it. Resumable: rows already in ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(reg, task, adapter: tuple[dict, dict], limit: int) -> dict:
    """Accuracy on ``limit`` test items and mean first-token entropy on their prompts, with ``adapter``."""
    import torch

    from harvest.evaluate import evaluate
    from registry import base_models
    from registry.confidence import lora_hooks, next_token_entropy

    model, tokenizer = base_models.load_base(adapter[1].get("base_model_name_or_path"))
    start = time.perf_counter()
    with lora_hooks(model, *adapter):
        result = evaluate(task, model, tokenizer, limit=limit)
        entropy = next_token_entropy(model, tokenizer, [p.prompt for p in result.predictions])
    return {"accuracy": result.accuracy, "entropy": float(torch.mean(entropy)), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="Registry home with the pool's harvests.")
    parser.add_argument("--tasks", required=True, help="Held-out tasks: zoo names or .jsonl files, comma-separated.")
    parser.add_argument("--pool", required=True, help="Pool task names (their final harvested adapters).")
    parser.add_argument("--multitask", required=True, help="REF of the multitask LoRA every candidate sits on.")
    parser.add_argument("--limit", type=int, default=50, help="Test items per task.")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the rows (resumed from).")
    args = parser.parse_args()

    from harvest.service import final_adapter, resolve_task
    from registry.store import Registry
    from retrieval.composition import add_adapters

    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["task"], r["candidate"]) for r in rows}
    with Registry.open(args.home) as reg:
        multitask = reg.load_weights(args.multitask)
        for spec in args.tasks.split(","):
            task = resolve_task(spec)
            candidates = ["multitask", *(f"multitask+{name}" for name in args.pool.split(","))]
            for candidate in candidates:
                if (task.name, candidate) in done:
                    continue
                if candidate == "multitask":
                    adapter = multitask
                else:
                    weights, config = reg.load_weights(final_adapter(reg, candidate.split("+", 1)[1]).ref)
                    adapter = add_adapters(reg, weights, config, [args.multitask])[:2]
                rows.append({"task": task.name, "candidate": candidate, **measure(reg, task, adapter, args.limit)})
                args.out.write_text(json.dumps(rows, indent=1))
    for task in dict.fromkeys(r["task"] for r in rows):
        alone = next(r for r in rows if r["task"] == task and r["candidate"] == "multitask")
        for r in (r for r in rows if r["task"] == task):
            kept = "-" if r is alone else ("kept" if r["entropy"] < alone["entropy"] else "falls back")
            print(f"{task:16s} {r['candidate']:34s} accuracy {r['accuracy']:.2f}  entropy {r['entropy']:.3f}  {kept}")


if __name__ == "__main__":
    main()
