"""``registry bench``: generated vs retrieved + composed vs trained adapters on held-out tasks.

Leave-tasks-out protocol: the held-out tasks are excluded from generator training; each held-out
task's own adapters are excluded from the retrieval pool for its rows (other held-out tasks stay in
the pool, as they would in a real registry). Every method is scored on the same test items of the
task. Retrieval only looks at ``harvested`` adapters so adapters the bench itself stores never feed
back into later rows.

Each (task, method) row is cached as JSON under ``<out>/rows/``, so an interrupted bench resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evaluation.report import MethodResult, write_report

RETRIEVAL_METHODS = ("selection", "mixture", "fusion")
ALL_METHODS = ("base", "oracle", "training_mean", *RETRIEVAL_METHODS, "dnd", "cvae")


@dataclass
class BenchSettings:
    held_out: list[str]
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    limit: int | None = None           # test items per task (None: the whole test split)
    k: int = 3
    tasks: list[str] | None = None     # the bench's task set (default: every finished harvest)
    n_prompts: int = 32                # prompts given to the generator / used as the retrieval query
    generator_steps: int = 600
    generator_batch_size: int = 8
    training_mean_max: int | None = None  # evaluate at most this many training adapters per task
    batch_size: int = 32
    seed: int = 0


def _row_path(out: Path, task: str, method: str) -> Path:
    return out / "rows" / f"{task}__{method}.json"


def _load_row(out: Path, task: str, method: str) -> MethodResult | None:
    path = _row_path(out, task, method)
    if not path.exists():
        return None
    return MethodResult(**json.loads(path.read_text()))


def _save_row(out: Path, result: MethodResult) -> None:
    path = _row_path(out, result.task, result.method)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result)))


def _scores(result) -> list[float]:
    return [float(p.score) for p in result.predictions]


def _final_adapter(reg, task: str):
    """The last kept checkpoint of a task's harvest (its ``final`` alias, else its latest version)."""
    from registry.errors import NotFound

    adapters = reg.list_adapters(kind="harvested", task=task)
    if not adapters:
        raise NotFound(f"task {task} has no harvested adapters: run `registry harvest --task {task}` first")
    try:
        return reg.resolve(f"{adapters[-1].name}@final")
    except NotFound:
        return adapters[-1]


def _generator_without(reg, artifact_type: str, tasks: Sequence[str]) -> str | None:
    """The newest generator of this type trained on none of ``tasks`` (the bench's held-out tasks,
    the rule the bench's own DnD generator follows)."""
    for artifact in reversed(reg.list_artifacts(artifact_type)):
        if not set(tasks) & set(artifact.meta.get("tasks", [])):
            return artifact.ref
    return None


def spread_subset(items: list, count: int | None) -> list:
    """At most ``count`` of ``items``, spread evenly over the list (all of them when ``count`` is None)."""
    if count is None or len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step + step / 2)] for i in range(count)]


def harvested_tasks(reg) -> list[str]:
    """Tasks whose harvest finished (its last checkpoint carries the ``final`` alias), sorted; a harvest
    still running in another process does not enter the bench half-done."""
    from registry.errors import NotFound

    complete = set()
    for task in {a.task for a in reg.list_adapters(kind="harvested") if a.task}:
        try:
            if reg.resolve(f"{task}@final").task == task:
                complete.add(task)
        except NotFound:
            continue
    return sorted(complete)


def run_bench(reg, settings: BenchSettings, out: Path, on_status: Callable[[str], None] = print,
              on_progress: Callable[[int, int], None] | None = None) -> dict[str, Path]:
    """Run (or resume) the comparison and write the report into ``out``."""
    from generator.service import train_generator_from_registry
    from harvest.evaluate import evaluate
    from harvest.service import resolve_task, sample_prompts
    from registry.errors import RegistryError

    out.mkdir(parents=True, exist_ok=True)
    finished = harvested_tasks(reg)
    zoo = sorted(settings.tasks) if settings.tasks else finished
    unfinished = [t for t in zoo if t not in finished]
    if unfinished:
        raise RegistryError(f"tasks without a finished harvest: {', '.join(unfinished)}")
    missing = [t for t in settings.held_out if t not in zoo and "oracle" in settings.methods]
    if missing:
        raise RegistryError(f"held-out tasks without harvested adapters (needed for the oracle): {', '.join(missing)}")
    training_tasks = [t for t in zoo if t not in settings.held_out]
    if len(training_tasks) < 2:
        raise RegistryError(f"need at least 2 harvested training tasks besides the held-out ones, found {len(training_tasks)}")

    base_model = reg.list_adapters(kind="harvested", task=training_tasks[0])[0].base_model
    generator_ref, generator_seconds = None, None
    if "dnd" in settings.methods:
        on_status(f"training the DnD generator on {len(training_tasks)} tasks (held out: {', '.join(settings.held_out)})")
        start = time.perf_counter()
        artifact = train_generator_from_registry(
            reg, name="bench-dnd", exclude_tasks=[t for t in settings.held_out if t in zoo], tasks=training_tasks,
            steps=settings.generator_steps, batch_size=settings.generator_batch_size, n_prompts=16,
            seed=settings.seed, on_status=on_status,
            on_step=lambda step, steps, loss: on_status(f"DnD generator step {step}/{steps}, loss {loss:.4f}"))
        generator_ref = artifact.ref
        generator_seconds = artifact.meta.get("wall_time_s", time.perf_counter() - start)
        on_status(f"generator {generator_ref} ready")

    outside_pool = {a.task for a in reg.list_adapters(kind="harvested")} - set(zoo)  # frozen for every row
    total = len(settings.held_out) * len(settings.methods)
    done = 0
    results: list[MethodResult] = []
    for task_name in settings.held_out:
        task = resolve_task(task_name)
        prompts = sample_prompts(task, settings.n_prompts, seed=settings.seed)
        test_kwargs = dict(limit=settings.limit, batch_size=settings.batch_size)
        base_kwargs = dict(test_kwargs, base=base_model)
        for method in settings.methods:
            cached = _load_row(out, task_name, method)
            if cached is None:
                on_status(f"{task_name}: {method}")
                cached = _run_method(reg, method, task, prompts, settings, generator_ref, evaluate,
                                     training_tasks, test_kwargs, base_kwargs, outside_pool)
                if cached is not None:
                    _save_row(out, cached)
            if cached is not None:
                results.append(cached)
            done += 1
            if on_progress:
                on_progress(done, total)

    notes = [f"held-out tasks: {', '.join(settings.held_out)}",
             f"training tasks ({len(training_tasks)}): {', '.join(training_tasks)}",
             f"retrieval pool: harvested adapters of the {len(zoo)} bench tasks except the row's own; k={settings.k}",
             f"DnD/query prompts per task: {settings.n_prompts} train-split prompts (fixed seed {settings.seed})"]
    if "training_mean" in settings.methods:
        used = spread_subset(training_tasks, settings.training_mean_max)
        notes.append(f"training_mean: per-item mean over the final adapters of {len(used)} of the "
                     f"{len(training_tasks)} training tasks ({', '.join(used)})")
    if generator_ref:
        notes.append(f"generator {generator_ref}: {settings.generator_steps} steps, trained once in "
                     f"{generator_seconds:.0f} s (not included in per-task generation time)")
    cvae_refs = sorted({r.extra["generator"] for r in results if r.method == "cvae" and r.extra.get("generator")})
    if cvae_refs:
        notes.append(f"CVAE generator {', '.join(cvae_refs)}: the newest CVAE trained on none of the held-out "
                     "tasks")
    return write_report(results, out, "Generated vs retrieved vs trained adapters on held-out tasks",
                        asdict(settings), notes)


def _run_method(reg, method, task, prompts, settings, generator_ref, evaluate, training_tasks, test_kwargs,
                base_kwargs, outside_pool: set[str]):
    """Obtain the method's adapter for ``task`` (timed) and score it on the test items."""
    if method == "base":
        return MethodResult(task.name, method, _scores(evaluate(task, **base_kwargs)), 0.0, None)
    if method == "oracle":
        info = _final_adapter(reg, task.name)
        result = evaluate(task, base=info.base_model, adapter=str(reg.fetch(info.ref)), **test_kwargs)
        return MethodResult(task.name, method, _scores(result), info.metrics.get("harvest_seconds"), info.ref)
    if method == "training_mean":
        adapters = [_final_adapter(reg, t) for t in spread_subset(training_tasks, settings.training_mean_max)]
        per_adapter = [_scores(evaluate(task, base=a.base_model, adapter=str(reg.fetch(a.ref)), **test_kwargs))
                       for a in adapters]
        item_means = [sum(col) / len(col) for col in zip(*per_adapter)]  # mean over adapters, per item
        return MethodResult(task.name, method, item_means, 0.0, None,
                            {"adapters": [a.ref for a in adapters],
                             "accuracy_per_adapter": [sum(s) / len(s) for s in per_adapter]})
    if method in RETRIEVAL_METHODS:
        from retrieval.service import compose_adapter

        start = time.perf_counter()
        info = compose_adapter(reg, prompts, k=settings.k, strategy=method, name=f"bench-{task.name}-{method}",
                               exclude_tasks=sorted({task.name} | outside_pool), kind="harvested",
                               one_per_task=True, task=task.name)
        seconds = time.perf_counter() - start
        result = evaluate(task, base=info.base_model, adapter=str(reg.fetch(info.ref)), **test_kwargs)
        return MethodResult(task.name, method, _scores(result), seconds, info.ref,
                            {"parents": info.parents})
    if method in ("dnd", "cvae"):
        from generator.service import generate_adapter

        ref = generator_ref if method == "dnd" else _generator_without(reg, "generator-cvae", settings.held_out)
        if ref is None:
            return None
        start = time.perf_counter()
        timings: dict = {}
        info = generate_adapter(reg, prompts, f"bench-{task.name}-{method}", generator_ref=ref, task=task.name,
                                timings=timings)
        seconds = time.perf_counter() - start
        result = evaluate(task, base=info.base_model, adapter=str(reg.fetch(info.ref)), **test_kwargs)
        return MethodResult(task.name, method, _scores(result), seconds, info.ref,
                            {"generator": ref, "timings": {k: v for k, v in timings.items() if isinstance(v, float)}})
    raise ValueError(f"unknown method {method}")
