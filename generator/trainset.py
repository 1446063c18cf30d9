"""The training set every generator trains on: the registry's harvested adapters of one base model
and one layout, grouped by task, with their stored prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from generator.errors import GeneratorError

PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern")


@dataclass
class TrainingSet:
    """The harvested adapters a generator trains on, grouped by task.

    Unpacks as ``checkpoints, prompts, adapters = collect_training_set(...)``.
    """

    checkpoints: dict[str, list[dict]]   # task -> state dicts, in (name, version) order
    prompts: dict[str, list[str]]        # task -> union of its adapters' stored prompts
    adapters: list[dict]                 # [{"ref", "digest", "task"}] in training order
    base_model: str
    base_fingerprint: str
    registry_layout: str                 # the registry's layout fingerprint of these adapters
    peft_fields: dict                    # r, lora_alpha, target_modules, use_rslora (+ patterns)
    dtype: str = "float32"

    def __iter__(self) -> Iterator:
        return iter((self.checkpoints, self.prompts, self.adapters))

    @property
    def tasks(self) -> list[str]:
        return sorted(self.checkpoints)

def _describe_group(infos) -> str:
    first = infos[0]
    return (f"{first.base_model} r={first.rank} {','.join(first.target_modules)} "
            f"({len(infos)} adapters, tasks {', '.join(sorted({i.task for i in infos}))})")

def peft_fields(config: Mapping) -> dict:
    fields = {}
    for key in PEFT_FIELDS:
        value = config.get(key)
        if key in ("rank_pattern", "alpha_pattern") and not value:
            continue
        if key == "target_modules" and isinstance(value, (list, tuple, set)):
            value = sorted(value)
        if key == "use_rslora":
            value = bool(value)
        fields[key] = value
    return fields

def _training_order(info) -> tuple:
    """The order adapters enter a training set: by task, then name, then version (latest last)."""
    return info.task, info.name, info.version

def collect_training_set(reg, tasks: Sequence[str] | None = None, exclude_tasks: Sequence[str] = (),
                         base_model: str | None = None, latest_only: bool = False) -> TrainingSet:
    """All harvested adapters (with a task) of one base model and one layout, grouped by task.

    ``tasks`` keeps only those tasks, ``exclude_tasks`` drops tasks (held out), ``base_model``
    keeps one base, ``latest_only`` each task's latest adapter only (in (name, version) order: its
    final checkpoint, all the SFT objective needs). Refuses a set that spans several base models or
    layouts, unknown task names, tasks without stored prompts, disagreeing PEFT settings, and fewer
    than two tasks.
    """
    from registry import base_models

    wanted = None if tasks is None else list(dict.fromkeys(tasks))
    excluded = set(exclude_tasks)
    if wanted is not None and excluded & set(wanted):
        raise GeneratorError(f"tasks both kept and excluded: {', '.join(sorted(excluded & set(wanted)))}")
    from registry.records import MULTITASK_TAG

    # a multitask LoRA is a baseline trained on several tasks, not one task's adapter
    harvested = [a for a in reg.list_adapters(kind="harvested", base_model=base_model)
                 if a.task and MULTITASK_TAG not in (a.tags or [])]
    if not harvested:
        where = f" for base model {base_model}" if base_model else ""
        raise GeneratorError(f"no harvested adapters with a task{where}: run `registry harvest` first")
    known = {a.task for a in harvested}
    for label, names in (("--tasks", wanted or []), ("--exclude-tasks", sorted(excluded))):
        unknown = [t for t in names if t not in known]
        if unknown:
            raise GeneratorError(f"{label}: no harvested adapters for task(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(known))})")
    chosen = [a for a in harvested if a.task not in excluded and (wanted is None or a.task in wanted)]
    if latest_only:
        latest = {a.task: a for a in sorted(chosen, key=_training_order)}
        chosen = list(latest.values())

    groups: dict[tuple[str, str], list] = {}
    for info in chosen:
        groups.setdefault((info.base_model, info.layout_fingerprint), []).append(info)
    if len(groups) > 1:
        described = "; ".join(_describe_group(g) for g in groups.values())
        hint = ("pick one with --base-model" if len({b for b, _ in groups}) > 1
                else "pick one layout with --tasks / --exclude-tasks")
        raise GeneratorError(f"harvested adapters do not share one base model and layout: {described}; {hint}")
    (base_id, registry_layout), infos = next(iter(groups.items()))
    task_names = sorted({i.task for i in infos})
    if len(task_names) < 2:
        raise GeneratorError(f"a generator needs harvested adapters of at least 2 tasks, found {len(task_names)}"
                             f" ({', '.join(task_names)})")

    checkpoints: dict[str, list[dict]] = {t: [] for t in task_names}
    prompts: dict[str, list[str]] = {t: [] for t in task_names}
    adapters, peft, dtypes = [], None, set()
    for info in sorted(infos, key=_training_order):
        state_dict, config = reg.load_weights(info.ref)
        fields = peft_fields(config)
        if peft is None:
            peft = fields
        elif fields != peft:
            raise GeneratorError(f"{info.ref} has LoRA settings {fields}, other training adapters have {peft}")
        dtypes |= {str(v.dtype).removeprefix("torch.") for v in state_dict.values()}
        checkpoints[info.task].append(state_dict)
        prompts[info.task].extend(p for p in reg.prompts(info.ref) if p not in prompts[info.task])
        adapters.append({"ref": info.ref, "digest": info.digest, "task": info.task})
    empty = [t for t in task_names if not prompts[t]]
    if empty:
        raise GeneratorError(f"task(s) {', '.join(empty)} have no stored prompts to condition on")
    fingerprints = {i.base_fingerprint for i in infos}
    return TrainingSet(checkpoints=checkpoints, prompts=prompts, adapters=adapters,
                       base_model=base_models.base_model_id(base_id), base_fingerprint=min(fingerprints),
                       registry_layout=registry_layout, peft_fields=peft,
                       dtype=dtypes.pop() if len(dtypes) == 1 else "float32")


def token_grids(data: TrainingSet, chunk_width: int | None):
    """The training set's checkpoints as token grids: ``(layout, {task: (K, T, h, w)}, {task: K})``.

    Each task's state dicts are freed once tokenized (``data.checkpoints[task]`` becomes empty), so
    the set is in memory once, not twice. Raises ValueError/TypeError for adapters no layout fits."""
    from generator.tokenizer import layout_from_state_dict, stack_token_grids

    first = next(iter(data.checkpoints.values()))[0]
    counts = {t: len(v) for t, v in data.checkpoints.items()}
    layout = layout_from_state_dict(first, chunk_width)
    grids = {}
    for task in data.tasks:
        grids[task] = stack_token_grids(data.checkpoints[task], layout)
        data.checkpoints[task] = []
    return layout, grids, counts
