"""Issue-5 in-distribution retrieval: for every test prompt of every harvested zoo task, is the top-1
retrieved adapter's task the prompt's own task (top-1 accuracy), and is it among the top 3 distinct
tasks (recall@3)? Each adapter is represented by the mean embedding of its stored sample prompts.

    python benchmarks/retrieval_zoo.py [--home DIR] [--per-task 100] [--out reports/retrieval_zoo.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=None)
    parser.add_argument("--per-task", type=int, default=100, help="test prompts per task used as queries")
    parser.add_argument("--out", default="reports/retrieval_zoo.json")
    args = parser.parse_args()

    from evaluation.compare import harvested_tasks
    from harvest.service import resolve_task
    from harvest.zoo import zoo_names
    from registry.store import Registry
    from evaluation.accuracy import retrieval_accuracy

    reg = Registry.open(args.home)
    harvested = harvested_tasks(reg)
    zoo = set(zoo_names())
    names = [name for name in harvested if name in zoo]  # others stay in the pool as distractors
    if len(names) < len(harvested):
        print(f"in the pool but not queried (not zoo tasks): {', '.join(sorted(set(harvested) - set(names)))}")
    queries = {name: resolve_task(name).prompts("test")[: args.per_task] for name in names}
    start = time.perf_counter()
    report = retrieval_accuracy(reg, queries, k=3)
    seconds = time.perf_counter() - start
    summary = {"tasks": len(names), "queries": sum(len(q) for q in queries.values()), "seconds": seconds,
               **{k: v for k, v in report.items() if not isinstance(v, (dict, list))}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "report": report}, indent=2, default=str))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
