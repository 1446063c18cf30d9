"""The zoo table: for every harvested zoo task, base accuracy vs the final checkpoint's, the spread
over kept checkpoints and the harvest wall time, then one row per family (zoo v2) and the mean gain.
Results are cached (adapter metrics; base results under the registry's evals/), so a rerun only
evaluates what is missing.

    python benchmarks/zoo_report.py [--home DIR] [--family F[,G]] [--spread 3] [--limit N] [--out reports/zoo.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=None)
    parser.add_argument("--spread", type=int, default=3, help="kept checkpoints evaluated per task (first..last)")
    parser.add_argument("--limit", type=int, default=None, help="test items per evaluation (default: all)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset")
    parser.add_argument("--family", default=None, help="comma-separated families (zoo v2)")
    parser.add_argument("--out", default="reports/zoo.md")
    args = parser.parse_args()

    from harvest.service import evaluate_stored, resolve_task
    from harvest.zoo import family_of, zoo_names
    from registry.store import Registry

    reg = Registry.open(args.home)
    rows = []
    names = (args.tasks.split(",") if args.tasks else
             [n for f in args.family.split(",") for n in zoo_names(f)] if args.family else zoo_names())
    for name in names:
        task = resolve_task(name)
        kept = reg.list_adapters(kind="harvested", task=name)
        if not kept:
            print(f"{name}: not harvested, skipped", flush=True)
            continue
        base_acc = _cached_base(reg, task)
        if base_acc is None:
            base_acc = evaluate_stored(reg, task, None, limit=args.limit).accuracy
        picks = evaluated_checkpoints(len(kept), args.spread)
        accs = {}
        metric_key = f"eval/{name}/{task.metric}"
        for i in picks:
            info = kept[i]
            if metric_key not in info.metrics:
                evaluate_stored(reg, task, info.ref, limit=args.limit)
                info = reg.resolve(info.ref)
            accs[info.recipe["step"]] = info.metrics[metric_key]
        final = kept[-1]
        final_acc = accs[max(accs)]
        seconds = reg.resolve(final.ref).metrics.get("harvest_seconds")
        row = {"task": name, "family": family_of(name), "metric": task.metric, "base": base_acc, "final": final_acc,
               "spread_min": min(accs.values()), "spread_max": max(accs.values()), "checkpoints": len(kept),
               "steps_evaluated": sorted(accs), "harvest_seconds": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not rows:
        return
    mean_gain = sum(r["final"] - r["base"] for r in rows) / len(rows)
    lines = ["| task | family | metric | base | harvested (final) | kept checkpoints (min-max) | harvest time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = f"{r['harvest_seconds'] / 60:.1f} min" if r["harvest_seconds"] else "-"
        lines.append(f"| {r['task']} | {r['family'] or '-'} | {r['metric']} | {r['base']:.2f} | {r['final']:.2f} | "
                     f"{r['spread_min']:.2f}-{r['spread_max']:.2f} ({r['checkpoints']} kept) | {seconds} |")
    lines.append(f"| **mean** | | | {sum(r['base'] for r in rows) / len(rows):.3f} | "
                 f"{sum(r['final'] for r in rows) / len(rows):.3f} | gain {mean_gain * 100:+.1f} points | |")
    lines += ["", "| family | tasks | base | harvested | gain (points) | median harvest time |", "|---|---|---|---|---|---|"]
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        times = sorted(r["harvest_seconds"] for r in mine if r["harvest_seconds"])
        median = f"{times[len(times) // 2] / 60:.1f} min" if times else "-"
        base, final = (sum(r[k] for r in mine) / len(mine) for k in ("base", "final"))
        lines.append(f"| {family or '-'} | {len(mine)} | {base:.3f} | {final:.3f} | {(final - base) * 100:+.1f} | {median} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


def evaluated_checkpoints(n_kept: int, spread: int) -> list[int]:
    """Indices of the kept checkpoints to evaluate: ``spread`` of them from the last back to the first,
    the final one always (``harvest.service.stored_gain`` and the bench read its stored result)."""
    last = n_kept - 1
    return sorted({round(last - i * last / max(spread - 1, 1)) for i in range(max(spread, 1))})


def _cached_base(reg, task):
    from harvest.service import base_eval_path

    path = base_eval_path(reg, task.name)
    return json.loads(path.read_text())["accuracy"] if path.exists() else None


if __name__ == "__main__":
    main()
