"""The comparison report: per-task and mean accuracy with 95% bootstrap intervals, time to obtain
each adapter, written as Markdown, JSON and two PNG plots."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evaluation.stats import bootstrap_ci, mean_of_task_means_ci

METHOD_LABELS = {
    "base": "base model",
    "oracle": "own harvested LoRA (oracle)",
    "training_mean": "training LoRAs, mean (DnD baseline)",
    "selection": "retrieve k=3: selection",
    "mixture": "retrieve k=3: mixture",
    "fusion": "retrieve k=3: fusion",
    "dnd": "DnD generated",
    "cvae": "CVAE generated",
}


@dataclass
class MethodResult:
    """One method on one task: per-item scores and how long obtaining the adapter took."""

    task: str
    method: str
    scores: list[float]
    seconds_to_adapter: float | None = None
    adapter_ref: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def interval(self) -> tuple[float, float, float]:
        return bootstrap_ci(self.scores)


def summarize(results: list[MethodResult]) -> dict:
    """Rows per (task, method) and means per method (mean of task means, items resampled per task)."""
    rows = []
    for r in results:
        mean, low, high = r.interval
        rows.append({"task": r.task, "method": r.method, "accuracy": mean, "ci_low": low, "ci_high": high,
                     "n": len(r.scores), "seconds_to_adapter": r.seconds_to_adapter,
                     "adapter_ref": r.adapter_ref, **({"extra": r.extra} if r.extra else {})})
    means = {}
    for method in _methods(results):
        mine = [r for r in results if r.method == method]
        mean, low, high = mean_of_task_means_ci({r.task: r.scores for r in mine})
        times = sorted(r.seconds_to_adapter for r in mine if r.seconds_to_adapter is not None)
        means[method] = {"accuracy": mean, "ci_low": low, "ci_high": high, "tasks": len(mine),
                         "median_seconds_to_adapter": statistics.median(times) if times else None}
    return {"rows": rows, "means": means}


def _methods(results: list[MethodResult]) -> list[str]:
    order = list(METHOD_LABELS)
    found = {r.method for r in results}
    return [m for m in order if m in found] + sorted(found - set(order))


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def markdown(results: list[MethodResult], title: str, notes: list[str] = ()) -> str:
    summary = summarize(results)
    methods = _methods(results)
    tasks = sorted({r.task for r in results})
    by_key = {(row["task"], row["method"]): row for row in summary["rows"]}
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "Accuracy on each held-out task's test items, with 95% bootstrap intervals.", ""]
    lines.append("| task | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    for task in tasks:
        cells = []
        for method in methods:
            row = by_key.get((task, method))
            cells.append("-" if row is None else f"{row['accuracy']:.3f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    mean_cells = [f"**{summary['means'][m]['accuracy']:.3f}** [{summary['means'][m]['ci_low']:.2f}, "
                  f"{summary['means'][m]['ci_high']:.2f}]" for m in methods]
    lines.append("| **mean** | " + " | ".join(mean_cells) + " |")
    lines += ["", "Time to obtain the adapter (median over tasks):", "", "| method | time |", "|---|---|"]
    for method in methods:
        lines.append(f"| {METHOD_LABELS.get(method, method)} | {_fmt_time(summary['means'][method]['median_seconds_to_adapter'])} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(results: list[MethodResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = summarize(results)
    methods = _methods(results)
    tasks = sorted({r.task for r in results})
    by_key = {(row["task"], row["method"]): row for row in summary["rows"]}
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4.5))
    x = np.arange(len(tasks))
    for i, method in enumerate(methods):
        rows = [by_key.get((t, method)) for t in tasks]
        values = [r["accuracy"] if r else np.nan for r in rows]
        errors = [[(r["accuracy"] - r["ci_low"]) if r else 0 for r in rows],
                  [(r["ci_high"] - r["accuracy"]) if r else 0 for r in rows]]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, yerr=errors, capsize=2,
               label=METHOD_LABELS.get(method, method))
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_ylabel("accuracy (test split)")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy per method and held-out task (95% bootstrap CI)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_time_vs_accuracy(results: list[MethodResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, mean in summary["means"].items():
        seconds = mean["median_seconds_to_adapter"]
        if seconds is None or seconds <= 0:
            continue
        ax.errorbar([seconds], [mean["accuracy"]], yerr=[[mean["accuracy"] - mean["ci_low"]],
                                                         [mean["ci_high"] - mean["accuracy"]]],
                    fmt="o", capsize=3, label=METHOD_LABELS.get(method, method))
        ax.annotate(method, (seconds, mean["accuracy"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("time to obtain the adapter (s, log scale)")
    ax.set_ylabel("mean accuracy over held-out tasks")
    ax.set_title("Time to adapter vs accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: list[MethodResult], directory: Path, title: str, settings: dict,
                 notes: list[str] = ()) -> dict[str, Path]:
    """Write report.md, report.json, accuracy.png and time_vs_accuracy.png into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": directory / "report.md", "json": directory / "report.json",
             "accuracy_plot": directory / "accuracy.png", "time_plot": directory / "time_vs_accuracy.png"}
    paths["markdown"].write_text(markdown(results, title, notes), encoding="utf-8")
    data = {"title": title, "settings": settings, "notes": list(notes), **summarize(results),
            "results": [asdict(r) for r in results]}
    paths["json"].write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    plot_accuracy(results, paths["accuracy_plot"])
    plot_time_vs_accuracy(results, paths["time_plot"])
    return paths
