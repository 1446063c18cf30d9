"""Where the harvested adapters' variance lies: between tasks or between checkpoints, and how many
principal directions hold it (the measurement behind the CVAE's basis decoder, ``generator.cvae``).

    python benchmarks/adapter_variance.py --home DIR [--tasks T ...] [--exclude-tasks T ...]

Loads the generator training set (``collect_training_set``: every harvested checkpoint, grouped by
task), normalises it as the generators do (``TokenNormalizer``, element-centred: minus the mean
adapter, divided by one spread per token), and prints

- the share of the total squared norm that lies between tasks (each checkpoint replaced by its
  task's mean) vs within tasks (checkpoints around their task's mean);
- the share held by the top-K principal directions for a few K (uncentred, through the Gram matrix,
  as ``principal_basis`` computes them).

Needs (N, D) float32 in memory: 1.5 GB for 150 SmolLM2 r=8 adapters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, type=Path, help="Registry home with harvested adapters.")
    parser.add_argument("--tasks", nargs="+", default=None, help="Only these tasks.")
    parser.add_argument("--exclude-tasks", nargs="+", default=[], help="Leave these tasks out.")
    args = parser.parse_args(argv)

    import torch

    from generator.cvae import flatten_tokens
    from generator.service import GeneratorError, collect_training_set
    from generator.tokenizer import TokenNormalizer, layout_from_state_dict, stack_token_grids, token_mask
    from registry.store import Registry

    with Registry.open(args.home) as reg:
        try:
            data = collect_training_set(reg, args.tasks, args.exclude_tasks)
        except GeneratorError as err:
            raise SystemExit(f"error: {err}") from None
    layout = layout_from_state_dict(next(iter(data.checkpoints.values()))[0])
    grids = {task: stack_token_grids(data.checkpoints[task], layout) for task in data.tasks}  # (K_t, T, h, w)
    mask = token_mask(layout)
    normalizer = TokenNormalizer.fit(torch.cat(list(grids.values())), mask)
    by_task = {task: flatten_tokens(normalizer.normalize(g), mask) for task, g in grids.items()}  # (K_t, D)
    del grids

    weights = torch.cat(list(by_task.values()))                        # (N, D)
    total = float(weights.pow(2).sum())
    between = sum(float(x.mean(dim=0).pow(2).sum()) * x.shape[0] for x in by_task.values())
    eigenvalues = torch.linalg.eigvalsh((weights @ weights.T).double()).flip(0).clamp_min(0)  # (N,)
    cumulative = (eigenvalues.cumsum(0) / eigenvalues.sum()).tolist()
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= len(cumulative)]
    record = {"tasks": len(data.tasks), "adapters": weights.shape[0], "parameters": weights.shape[1],
              "between_task_share": between / total, "within_task_share": 1 - between / total,
              "top_k_share": {k: cumulative[k - 1] for k in ks}}

    print(f"{record['adapters']} adapters of {record['tasks']} tasks, {record['parameters']:,} weights each "
          "(element-centred, per-token spread)")
    print(f"  between tasks {100 * record['between_task_share']:.2f} %, "
          f"within tasks {100 * record['within_task_share']:.2f} % of the squared norm")
    shares = ", ".join(f"K={k} {100 * v:.2f} %" for k, v in record["top_k_share"].items())
    print(f"  top-K principal directions: {shares}")
    return record


if __name__ == "__main__":
    main()
