"""The bench report: per split (protocol), per-task and mean accuracy with 95% bootstrap intervals,
paired intervals against the multitask LoRA and the best retrieval composition, the share of the
oracle's gain, the generators' collapse verdicts and the time to obtain each adapter; written as
Markdown, JSON and two PNG plots."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evaluation.stats import bootstrap_ci, mean_of_task_means_ci, paired_difference_ci

METHOD_LABELS = {
    "base": "base model",
    "oracle": "own harvested LoRA (oracle)",
    "multitask": "multitask LoRA",
    "best_other": "best other task's LoRA",
    "training_mean": "training LoRAs, mean",
    "selection": "retrieve: selection",
    "mixture": "retrieve: mixture",
    "fusion": "retrieve: fusion",
    "selection_multitask": "retrieve: selection + multitask LoRA",
    "selection_multitask_gated": "retrieve: selection + multitask LoRA, entropy-gated",
    "dnd": "DnD generated",
    "dnd_other": "DnD, another task's prompts",
    "dnd_random": "DnD, random strings",
    "cvae": "CVAE generated",
    "cvae_other": "CVAE, another task's prompts",
    "cvae_random": "CVAE, random strings",
    "sft": "DnD trained through the base (SFT)",
    "sft_other": "SFT DnD, another task's prompts",
    "sft_random": "SFT DnD, random strings",
}
RETRIEVAL = ("selection", "mixture", "fusion", "selection_multitask", "selection_multitask_gated")


@dataclass
class MethodResult:
    """One method on one task: per-item scores and how long obtaining the adapter took."""

    task: str
    method: str
    scores: list[float]
    seconds_to_adapter: float | None = None
    adapter_ref: str | None = None
    extra: dict = field(default_factory=dict)
    protocol: str = ""

    @property
    def interval(self) -> tuple[float, float, float]:
        return bootstrap_ci(self.scores)


def _methods(results: list[MethodResult]) -> list[str]:
    order = list(METHOD_LABELS)
    found = {r.method for r in results}
    return [m for m in order if m in found] + sorted(found - set(order))


def _protocols(results: list[MethodResult]) -> list[str]:
    return list(dict.fromkeys(r.protocol for r in results))


def _per_task(results: list[MethodResult], method: str) -> dict[str, list[float]]:
    return {r.task: r.scores for r in results if r.method == method and r.scores}


def summarize_split(results: list[MethodResult]) -> dict:
    """Rows, per-method means and comparisons for the results of one split."""
    rows = []
    for r in results:
        mean, low, high = r.interval
        rows.append({"task": r.task, "method": r.method, "protocol": r.protocol, "accuracy": mean, "ci_low": low, "ci_high": high,
                     "n": len(r.scores), "seconds_to_adapter": r.seconds_to_adapter,
                     "adapter_ref": r.adapter_ref, **({"extra": r.extra} if r.extra else {})})
    methods = _methods(results)
    means = {}
    for method in methods:
        mine = [r for r in results if r.method == method and r.scores]
        mean, low, high = mean_of_task_means_ci({r.task: r.scores for r in mine})
        times = sorted(r.seconds_to_adapter for r in mine if r.seconds_to_adapter is not None)
        means[method] = {"accuracy": mean, "ci_low": low, "ci_high": high, "tasks": len(mine),
                         "median_seconds_to_adapter": statistics.median(times) if times else None}
    best_retrieval = max((m for m in RETRIEVAL if m in means and means[m]["tasks"]),
                         key=lambda m: means[m]["accuracy"], default=None)
    comparisons = {}
    for method in methods:
        scores = _per_task(results, method)
        entry = {}
        for name, other in (("vs_multitask", "multitask"), ("vs_best_retrieval", best_retrieval)):
            if other and other != method and _per_task(results, other):
                entry[name] = dict(zip(("mean", "low", "high"), paired_difference_ci(scores, _per_task(results, other))))
        entry["oracle_gain_share"] = _oracle_share(results, method)
        comparisons[method] = entry
    return {"rows": rows, "means": means, "best_retrieval": best_retrieval, "comparisons": comparisons,
            "collapse": collapse_verdicts(results)}


def _oracle_share(results: list[MethodResult], method: str) -> float | None:
    """(method - base) / (oracle - base), means over the tasks that have all three."""
    base, oracle, mine = (_per_task(results, m) for m in ("base", "oracle", method))
    tasks = sorted(set(base) & set(oracle) & set(mine))
    if not tasks:
        return None
    avg = lambda d: statistics.mean(sum(d[t]) / len(d[t]) for t in tasks)  # noqa: E731
    gain = avg(oracle) - avg(base)
    return None if abs(gain) < 1e-9 else (avg(mine) - avg(base)) / gain


def collapse_verdicts(results: list[MethodResult]) -> dict[str, dict]:
    """Per generator: own-prompt adapters minus each control (paired). Collapsed unless both
    intervals lie above 0."""
    verdicts = {}
    for generator in ("dnd", "cvae", "sft"):
        own = _per_task(results, generator)
        if not own:
            continue
        entry = {}
        for control in ("other", "random"):
            scores = _per_task(results, f"{generator}_{control}")
            if scores:
                entry[control] = dict(zip(("mean", "low", "high"), paired_difference_ci(own, scores)))
        if entry:
            entry["collapsed"] = not all(v["low"] > 0 for k, v in entry.items() if k in ("other", "random"))
            verdicts[generator] = entry
    return verdicts


def summarize(results: list[MethodResult]) -> dict:
    """Every split's summary (``splits``, keyed by protocol), plus flat ``rows`` and ``means`` for
    readers of one table (the web page): means keyed by method, or ``protocol:method`` when the
    report has several splits."""
    splits = {p: summarize_split([r for r in results if r.protocol == p]) for p in _protocols(results)}
    several = len(splits) > 1
    rows = [row for split in splits.values() for row in split["rows"]]
    means = {(f"{p}:{m}" if several else m): value for p, split in splits.items() for m, value in split["means"].items()}
    return {"splits": splits, "rows": rows, "means": means}


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def _fmt_interval(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None or math.isnan(entry["mean"]):
        return "-"
    return f"{entry['mean']:+.3f} [{entry['low']:+.2f}, {entry['high']:+.2f}]"


def _verdict_text(generator: str, entry: dict) -> str:
    parts = [f"{'another task' if c == 'other' else 'random strings'} {_fmt_interval(entry[c])}"
             for c in ("other", "random") if c in entry]
    verdict = ("**collapsed**: its own-prompt adapters are not better than its controls"
               if entry["collapsed"] else "not collapsed: its own-prompt adapters beat both controls")
    return f"{generator}: own prompts minus {', '.join(parts)} -> {verdict}"


def markdown(results: list[MethodResult], title: str, notes: list[str] = ()) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    summary = summarize(results)
    for protocol, split in summary["splits"].items():
        mine = [r for r in results if r.protocol == protocol]
        methods = _methods(mine)
        tasks = list(dict.fromkeys(r.task for r in mine))
        by_key = {(row["task"], row["method"]): row for row in split["rows"]}
        lines += ["", f"## Split `{protocol}`" if protocol else "## Held-out tasks", "",
                  "Accuracy on each held-out task's test items (95% bootstrap interval in the summary below).", ""]
        lines.append("| task | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        for task in tasks:
            cells = []
            for method in methods:
                row = by_key.get((task, method))
                if row is None:
                    cells.append("-")
                elif not row["n"]:
                    cells.append(row.get("extra", {}).get("missing", "n/a"))
                else:
                    cells.append(f"{row['accuracy']:.2f}")
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines += ["", f"Means over tasks; paired intervals against the multitask LoRA and the best retrieval "
                      f"composition ({split['best_retrieval'] or 'none'}); share of the oracle's gain = "
                      "(method - base) / (oracle - base).", "",
                  "| method | mean [95% CI] | minus multitask | minus best retrieval | share of oracle gain | time to adapter |",
                  "|---|---|---|---|---|---|"]
        for method in methods:
            mean, comp = split["means"][method], split["comparisons"][method]
            share = comp.get("oracle_gain_share")
            lines.append(f"| {METHOD_LABELS.get(method, method)} | {mean['accuracy']:.3f} [{mean['ci_low']:.2f}, "
                         f"{mean['ci_high']:.2f}] | {_fmt_interval(comp.get('vs_multitask'))} | "
                         f"{_fmt_interval(comp.get('vs_best_retrieval'))} | "
                         f"{'-' if share is None else f'{share:.0%}'} | {_fmt_time(mean['median_seconds_to_adapter'])} |")
        if split["collapse"]:
            lines += ["", "Generator controls (paired, own-prompt adapter minus control):", ""]
            lines += [f"- {_verdict_text(g, e)}" for g, e in split["collapse"].items()]
    return "\n".join(lines) + "\n"


def plot_accuracy(results: list[MethodResult], path: Path) -> Path:
    """Mean accuracy per method, one bar per split, with the 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = summarize(results)
    methods = _methods(results)
    protocols = list(summary["splits"])
    width = 0.8 / max(len(protocols), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods) + 2), 4.5))
    x = np.arange(len(methods))
    for i, protocol in enumerate(protocols):
        means = summary["splits"][protocol]["means"]
        values = [means[m]["accuracy"] if m in means else np.nan for m in methods]
        errors = [[(means[m]["accuracy"] - means[m]["ci_low"]) if m in means else 0 for m in methods],
                  [(means[m]["ci_high"] - means[m]["accuracy"]) if m in means else 0 for m in methods]]
        ax.bar(x + (i - (len(protocols) - 1) / 2) * width, values, width, yerr=errors, capsize=2, label=protocol)
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylabel("mean accuracy over held-out tasks")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy per method and split (95% bootstrap CI)")
    if any(protocols):
        ax.legend(fontsize=8)
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
    for marker, (protocol, split) in zip("osD^v", summary["splits"].items()):
        for method, mean in split["means"].items():
            seconds = mean["median_seconds_to_adapter"]
            if seconds is None or seconds <= 0:
                continue
            ax.errorbar([seconds], [mean["accuracy"]], yerr=[[mean["accuracy"] - mean["ci_low"]],
                                                             [mean["ci_high"] - mean["accuracy"]]],
                        fmt=marker, capsize=3)
            ax.annotate(f"{method} ({protocol})", (seconds, mean["accuracy"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("time to obtain the adapter (s, log scale)")
    ax.set_ylabel("mean accuracy over held-out tasks")
    ax.set_title("Time to adapter vs accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: list[MethodResult], directory: Path, title: str, settings: dict,
                 notes: list[str] = ()) -> dict[str, Path]:
    """Write report.md, report.json, accuracy.png and time_vs_accuracy.png into ``directory`` (each atomically)."""
    from registry.atomic import atomic_write, atomic_write_json

    directory.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": directory / "report.md", "json": directory / "report.json",
             "accuracy_plot": directory / "accuracy.png", "time_plot": directory / "time_vs_accuracy.png"}
    atomic_write(paths["markdown"], markdown(results, title, notes))
    data = {"title": title, "settings": settings, "notes": list(notes), **summarize(results),
            "results": [asdict(r) for r in results]}
    atomic_write_json(paths["json"], data, indent=2, ensure_ascii=False)
    plot_accuracy(results, paths["accuracy_plot"])
    plot_time_vs_accuracy(results, paths["time_plot"])
    return paths
