"""Harvesting into the registry: train a task's LoRA, store every kept checkpoint as a ``harvested``
adapter, and record evaluation results.

Each harvest has an id (a hash of the task's data, the settings and the base model). Checkpoints are
stored the moment training emits them, under the adapter name = task name, one version per
checkpoint, with the recipe ``{"harvest_id", "task", "step", "config", ...}``. Rerunning the same
harvest resumes the training state from ``<home>/work/harvest/<task>-<id>/`` and skips checkpoints
already stored, so an interrupted ``registry harvest --zoo`` just continues.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from harvest.tasks import Task, TaskError, make_task
from harvest.evaluate import DEFAULT_EVAL_BATCH
from harvest.train import HarvestConfig, peft_config_dict
from registry.records import MULTITASK_TAG  # the tag the generators' training sets and the bench skip

SAMPLE_PROMPTS = 24


@dataclass
class HarvestSummary:
    task: str
    harvest_id: str
    refs: list[str] = field(default_factory=list)
    skipped: bool = False
    seconds: float = 0.0
    steps: int = 0
    final_loss: float | None = None
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def resolve_task(name_or_path: str) -> Task:
    """A zoo task by name, or a user's JSONL task file by path."""
    from harvest.tasks import load_task_file
    from harvest.zoo import load_zoo_task, zoo_names

    path = Path(name_or_path).expanduser()
    if str(name_or_path).endswith(".jsonl") or path.exists():
        return load_task_file(path)
    if name_or_path not in zoo_names():
        raise TaskError(f"unknown task {name_or_path!r}: not a zoo task (see `registry tasks list`) "
                        "nor a .jsonl file")
    return load_zoo_task(name_or_path)


def sample_prompts(task: Task, n: int = SAMPLE_PROMPTS, seed: int = 0) -> list[str]:
    """A fixed random sample of the task's train prompts: what describes its adapters."""
    prompts = task.prompts("train")
    rng = random.Random(f"{task.name}:{seed}")
    return rng.sample(prompts, min(n, len(prompts)))


def task_prompt_sample(spec: str, n: int = 32, seed: int = 0) -> tuple[str, list[str]]:
    """(task name, ``n`` fixed-sample train prompts) for a zoo name or a .jsonl path: what
    ``registry generate --task`` and ``registry compose --task`` (and the bench) condition on."""
    if n < 1:
        raise TaskError(f"the number of task prompts must be at least 1, got {n}")
    task = resolve_task(spec)
    prompts = sample_prompts(task, n, seed)
    if not prompts:
        raise TaskError(f"task {task.name} has no train prompts")
    return task.name, prompts


def harvest_id(task: Task, config: HarvestConfig, base_id: str, precision: str = "fp32") -> str:
    """The harvest's identity: task data, settings, base, and the precision when it is not fp32 (so
    the ids of fp32 harvests made before the precision policy existed are unchanged)."""
    from registry.precision import identity

    digest = hashlib.sha256()
    digest.update(json.dumps({"task": task.name, "config": config.to_dict(), "base": base_id, **identity(precision)},
                             sort_keys=True).encode())
    for example in task.split("train"):
        digest.update(example.prompt.encode())
        digest.update(b"\0")
        digest.update(example.answer.encode())
        digest.update(b"\1")
    return digest.hexdigest()[:16]


def stored_checkpoints(reg, task_name: str, hid: str) -> dict[int, str]:
    """step -> REF of this harvest's checkpoints already in the registry."""
    return {int(a.recipe["step"]): a.ref for a in reg.list_adapters(kind="harvested", task=task_name)
            if a.recipe.get("harvest_id") == hid}


def check_settings(config: HarvestConfig, base: str | None) -> None:
    """Refuse bad settings before any work: invalid values, a bad base, modules the base lacks."""
    from registry import base_models

    from harvest.train import HarvestError

    config.validate()
    leaves = {path.rsplit(".", 1)[-1] for path in base_models.linear_module_shapes(base_models.load_base_config(base))}
    missing = sorted(set(config.target_modules) - leaves)
    if missing:
        raise HarvestError(f"target modules not in the base model: {', '.join(missing)} "
                           f"(its linear layers: {', '.join(sorted(leaves))})")


def harvest_task(reg, task: Task, *, base: str | None = None, config: HarvestConfig | None = None,
                 name: str | None = None, on_step=None, device: str | None = None,
                 precision: str | None = None, tags: Sequence[str] = ("harvest",),
                 recipe_extra: dict | None = None) -> HarvestSummary:
    """Harvest ``task`` into ``reg`` (resuming / skipping what an earlier run already did).

    ``precision`` (auto/fp32/bf16) is resolved here and recorded in every checkpoint's recipe;
    ``tags`` and ``recipe_extra`` go onto every checkpoint (the multitask LoRA marks itself so)."""
    from registry import base_models
    from registry import precision as precisions
    from registry.locks import file_lock
    from registry.refs import validate_name

    config = config or HarvestConfig()
    check_settings(config, base)
    name = validate_name(name or task.name)
    base_id = base_models.base_model_id(base)
    precision = precisions.resolve(precision, device or base_models.default_device())
    hid = harvest_id(task, config, base_id, precision)
    work_dir = reg.home / "work" / "harvest" / f"{task.name}-{hid}"
    # One run per harvest at a time: a second run of the same task waits here, then finds the first
    # one's checkpoints stored and skips (no duplicate checkpoints from two trainers of one task).
    with file_lock(work_dir.parent / f".{work_dir.name}.lock"):
        return _harvest_locked(reg, task, hid, name, base, base_id, config, precision, work_dir, on_step,
                               device, tags, recipe_extra)


def _harvest_locked(reg, task, hid, name, base, base_id, config, precision, work_dir, on_step, device, tags,
                    recipe_extra) -> HarvestSummary:
    from registry import faults
    from registry.embeddings import embed_texts

    from harvest.train import harvest

    summary = HarvestSummary(task=task.name, harvest_id=hid)
    done = stored_checkpoints(reg, task.name, hid)
    if len(done) >= config.n_checkpoints:
        summary.skipped, summary.refs = True, [done[s] for s in sorted(done)]
        _ensure_final(reg, name, summary.refs[-1])  # a run killed before its `final` alias is finished here
        return summary

    prompts = sample_prompts(task)
    embeddings = embed_texts(prompts, reg.encoder)
    peft_config = peft_config_dict(config, base_id)

    def store(step: int, loss: float, state_dict: dict) -> None:
        if step in done:
            return
        info = reg.add_weights(
            name, state_dict, peft_config, kind="harvested", base=base, task=task.name,
            task_description=task.description, prompts=prompts, prompt_embeddings=embeddings,
            metrics={"train_loss": float(loss)}, tags=list(tags),
            recipe={"harvest_id": hid, "task": task.name, "step": step, "config": config.to_dict(),
                    "base": base_id, "precision": precision,
                    **({"family": task.info.family} if task.info.family else {}), **(recipe_extra or {})},
        )
        done[step] = info.ref

    start = time.perf_counter()
    result = harvest(task, base=base, config=config, work_dir=work_dir,
                     resume=True, on_step=on_step, on_checkpoint=store, device=device, precision=precision)
    summary.seconds = result.earlier_seconds + time.perf_counter() - start  # resumed runs count too
    summary.steps, summary.final_loss = result.steps, (result.losses[-1] if result.losses else None)
    summary.tokens_per_second = result.tokens_per_second
    summary.refs = [done[s] for s in sorted(done)]
    if summary.refs:
        faults.point("harvest.before_final")
        reg.set_alias(summary.refs[-1], "final")
        reg.update_metrics(summary.refs[-1], {"harvest_seconds": summary.seconds, "harvest_steps": summary.steps,
                                              "harvest_tokens_per_second": summary.tokens_per_second,
                                              "harvest_resumed_from": result.resumed_from})
    return summary


def _ensure_final(reg, name: str, last_ref: str) -> None:
    """Point ``<name>@final`` at the harvest's last checkpoint unless it already does."""
    from registry.errors import NotFound

    try:
        if reg.resolve(f"{name}@final").ref == last_ref:
            return
    except NotFound:
        pass
    reg.set_alias(last_ref, "final")




def multitask_task(tasks: Sequence[Task]) -> Task:
    """One task whose train split is the union of ``tasks``' train splits, interleaved round-robin
    (so any step budget sees every task about equally); named by a digest of the member names, so
    the same training set always gets the same name and harvest id. It has no test split."""
    names = sorted(t.name for t in tasks)
    if len(names) < 2 or len(set(names)) != len(names):
        raise TaskError(f"a multitask LoRA needs at least two distinct tasks, got {', '.join(names) or 'none'}")
    by_name = {t.name: t.split("train") for t in tasks}
    union: list = []
    for i in range(max(len(v) for v in by_name.values())):
        union += [by_name[n][i] for n in names if i < len(by_name[n])]
    digest = hashlib.sha256("\0".join(names).encode()).hexdigest()[:10]
    return make_task(f"multitask-{digest}", union, [], description=f"union of {len(names)} tasks' train items",
                     metric="exact", source="multitask")


def harvest_multitask(reg, tasks: Sequence[Task], *, base: str | None = None, config: HarvestConfig | None = None,
                      steps: int | None = None, on_step=None, device: str | None = None,
                      precision: str | None = None) -> HarvestSummary:
    """The multi-task LoRA baseline (Text-to-LoRA's): one LoRA with a harvest's rank, targets and
    step budget, trained on the union of ``tasks``' train items. Stored as kind ``harvested``,
    tagged ``multitask``, with its member tasks in the recipe (``multitask_tasks``); resumable and
    skipped when done, like any harvest. ``config`` None: the recipe (and base, precision) of the
    member tasks' harvests, so it matches the adapters it is compared with. ``steps`` overrides the
    step budget (a union of many tasks wants more than one task's harvest: the checkpoints and
    warm-up follow the recipe's rules for the new length)."""
    union = multitask_task(tasks)
    if config is None:
        recipe = _harvest_recipe(reg, [t.name for t in tasks])
        if recipe is not None:
            config = HarvestConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in recipe["config"].items()})
            base = base or recipe.get("base")
            precision = precision or recipe.get("precision")
    if steps is not None:
        config = dataclasses.replace(config or HarvestConfig(), steps=steps)
    return harvest_task(reg, union, base=base, config=config, on_step=on_step, device=device, precision=precision,
                        tags=("harvest", MULTITASK_TAG),
                        recipe_extra={"multitask_tasks": sorted(t.name for t in tasks)})


def _harvest_recipe(reg, task_names: Sequence[str]) -> dict | None:
    """The recipe of the first of these tasks that has a harvested checkpoint."""
    for name in task_names:
        for info in reg.list_adapters(kind="harvested", task=name):
            if "config" in info.recipe:
                return info.recipe
    return None


def base_eval_path(reg, task_name: str, base: str | None = None) -> Path:
    """Where ``evaluate_stored`` keeps a base-only result: ``<home>/evals/base/<base fingerprint>/<task>.json``."""
    from registry import base_models

    fingerprint = base_models.base_fingerprint(base_models.load_base_config(base))[:16]
    return reg.home / "evals" / "base" / fingerprint / f"{task_name}.json"


def final_adapter(reg, task_name: str):
    """The last kept checkpoint of a task's harvest (its ``final`` alias, else its latest version);
    multitask LoRAs never count. Raises ``NotFound`` when the task has no harvest."""
    from registry.errors import NotFound

    adapters = [a for a in reg.list_adapters(kind="harvested", task=task_name) if MULTITASK_TAG not in (a.tags or [])]
    if not adapters:
        raise NotFound(f"task {task_name} has no harvested adapters: run `registry harvest --task {task_name}` first")
    try:
        return reg.resolve(f"{adapters[-1].name}@final")
    except NotFound:
        return adapters[-1]


def stored_gain(reg, task: Task, base: str | None = None) -> float | None:
    """The task's final harvested adapter's stored accuracy minus the base's (both from
    ``evaluate_stored``, e.g. by ``benchmarks/zoo_report.py``); None when either was never evaluated.
    ``base`` None: the base the adapter was harvested on."""
    from registry.errors import NotFound

    try:
        adapter = final_adapter(reg, task.name)
    except NotFound:
        return None
    final = adapter.metrics.get(f"eval/{task.name}/{task.metric}")
    if final is None:
        return None
    path = base_eval_path(reg, task.name, base or adapter.base_model)
    if not path.exists():
        return None
    return float(final) - float(json.loads(path.read_text())["accuracy"])


def evaluate_stored(reg, task: Task, ref: str | None = None, *, base: str | None = None,
                    limit: int | None = None, batch_size: int = DEFAULT_EVAL_BATCH, device: str | None = None,
                    precision: str | None = None):
    """Evaluate an adapter from the registry (or the base alone) on ``task``'s test split.

    The adapter's result is stored in its metrics as ``eval/<task>/<metric>``; a base-only result is
    written to ``<home>/evals/base/<base fingerprint>/<task>.json``.
    """
    from registry import base_models

    from harvest.evaluate import evaluate

    if ref is None:
        result = evaluate(task, base=base, limit=limit, batch_size=batch_size, device=device, precision=precision)
        out = base_eval_path(reg, task.name, base)
        out.parent.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in result.to_dict().items() if k != "predictions"}
        out.write_text(json.dumps(summary | {"base": base_models.base_model_id(base)}, indent=2))
        return result
    info = reg.resolve(ref)
    path = reg.fetch(info.ref)
    result = evaluate(task, base=base or info.base_model, adapter=str(path), limit=limit,
                      batch_size=batch_size, device=device, precision=precision)
    reg.update_metrics(info.ref, {f"eval/{task.name}/{task.metric}": result.accuracy,
                                  f"eval/{task.name}/n": result.n})
    return result
