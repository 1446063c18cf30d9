"""Small statistics for accuracy reports."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(scores, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean of per-item scores."""
    values = np.asarray(list(scores), dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    resampled = rng.choice(values, size=(n_resamples, values.size), replace=True).mean(axis=1)  # (n_resamples,)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def mean_of_task_means_ci(per_task_scores: dict[str, list[float]], n_resamples: int = 2000,
                          confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of the average over tasks, resampling items within each task."""
    tasks = [np.asarray(v, dtype=np.float64) for v in per_task_scores.values() if len(v)]
    if not tasks:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.stack([rng.choice(v, size=(n_resamples, v.size), replace=True).mean(axis=1) for v in tasks])  # (tasks, n)
    overall = draws.mean(axis=0)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(overall, [tail, 100 - tail])
    return float(np.mean([v.mean() for v in tasks])), float(low), float(high)


def paired_difference_ci(first: dict[str, list[float]], second: dict[str, list[float]], n_resamples: int = 2000,
                         confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of ``first - second`` as a mean of task means, paired by item: both methods
    are scored on the same test items of each task, so each resample draws the same item indices
    for both. Only tasks present in both count; items must line up (same length per task)."""
    tasks = sorted(set(first) & set(second))
    diffs = []
    for task in tasks:
        a, b = np.asarray(first[task], dtype=np.float64), np.asarray(second[task], dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"task {task}: {a.size} vs {b.size} items; a paired interval needs the same items")
        if a.size:
            diffs.append(a - b)  # (items,)
    if not diffs:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.stack([d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1) for d in diffs])  # (tasks, n)
    overall = draws.mean(axis=0)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(overall, [tail, 100 - tail])
    return float(np.mean([d.mean() for d in diffs])), float(low), float(high)
