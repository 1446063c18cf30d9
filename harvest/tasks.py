"""Tasks: JSONL files of ``{"prompt": str, "answer": str}`` lines plus a small metadata record.

File format (UTF-8, one JSON object per line, blank lines ignored)::

    {"prompt": "Spell this word backward: cat", "answer": "tac"}
    {"prompt": "Spell this word backward: dog", "answer": "god", "split": "test"}

Metadata (``name``, ``description``, ``metric`` in ``exact|numeric|choice|contains``, optional
``max_new_tokens``, ``language`` and ``family``) comes from, in order of precedence:

1. keyword arguments to :func:`load_task_file`;
2. a sidecar file next to the data: ``<file>.meta.json`` (``tasks.jsonl`` -> ``tasks.jsonl.meta.json``,
   what :func:`export_task` writes, so the JSONL itself stays plain data) or ``<stem>.meta.json``
   (``tasks.meta.json``); both at once is refused;
3. a header line: the first object of the file may be ``{"_task": {"name": ..., "metric": ...}}``
   instead of an item (handy for a single self-contained file);
4. defaults: name = the file stem, metric = ``exact``, empty description.

Split: if every line carries ``"split": "train"|"test"`` that split is used. Otherwise the split is
deterministic and independent of line order: unique prompts are ranked by
``sha256(seed:prompt)`` and the first ``test_fraction`` of them go to test. Lines sharing a prompt
always land in the same split, so train and test never share a prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from harvest.metrics import METRICS
from registry.errors import RegistryError

SPLITS = ("train", "test")
META_SUFFIX = ".meta.json"


class TaskError(RegistryError):
    """A task file or task name that cannot be used (one-line message)."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskInfo:
    """What a task is, without its data."""

    name: str
    description: str
    metric: str
    n_train: int = 0
    n_test: int = 0
    source: str = "user"
    language: str = "en"
    max_new_tokens: int | None = None
    family: str | None = None  # zoo tasks: their family (harvest.zoo); user tasks: optional, from metadata

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Task:
    """A task's metadata and its disjoint train / test examples."""

    info: TaskInfo
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def metric(self) -> str:
        return self.info.metric

    @property
    def description(self) -> str:
        return self.info.description

    def split(self, which: str) -> list[Example]:
        if which not in SPLITS:
            raise TaskError(f"unknown split {which!r} (use train or test)")
        return self.train if which == "train" else self.test

    def prompts(self, which: str = "train") -> list[str]:
        return [example.prompt for example in self.split(which)]


def make_task(
    name: str,
    train: list[Example],
    test: list[Example],
    *,
    description: str = "",
    metric: str = "exact",
    source: str = "user",
    language: str = "en",
    max_new_tokens: int | None = None,
    family: str | None = None,
) -> Task:
    """Build a task, checking the metric and that train and test share no prompt."""
    check_metric(metric)
    overlap = {e.prompt for e in train} & {e.prompt for e in test}
    if overlap:
        raise TaskError(f"task {name}: {len(overlap)} prompt(s) in both train and test, e.g. {next(iter(overlap))!r}")
    info = TaskInfo(name=name, description=description, metric=metric, n_train=len(train), n_test=len(test),
                    source=source, language=language, max_new_tokens=max_new_tokens, family=family)
    return Task(info=info, train=list(train), test=list(test))


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise TaskError(f"unknown metric {metric!r} (use one of {', '.join(METRICS)})")
    return metric


def split_by_hash(examples: list[Example], test_fraction: float = 0.2, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Deterministic, order-independent split by prompt hash; a prompt never lands in both splits."""
    if not 0 < test_fraction < 1:
        raise TaskError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    prompts = sorted({e.prompt for e in examples},
                     key=lambda p: hashlib.sha256(f"{seed}:{p}".encode("utf-8")).hexdigest())
    n_test = max(1, math.ceil(len(prompts) * test_fraction)) if len(prompts) > 1 else 0
    test_prompts = set(prompts[:n_test])
    train = [e for e in examples if e.prompt not in test_prompts]
    test = [e for e in examples if e.prompt in test_prompts]
    return train, test


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _meta_from_dict(meta: object, where: str) -> dict:
    if not isinstance(meta, dict):
        raise TaskError(f"{where}: task metadata must be a JSON object")
    out = {}
    for key in ("name", "description", "metric", "language", "family"):
        if key in meta and meta[key] is not None:
            if not isinstance(meta[key], str):
                raise TaskError(f"{where}: metadata {key!r} must be a string")
            out[key] = meta[key]
    if meta.get("max_new_tokens") is not None:
        value = meta["max_new_tokens"]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise TaskError(f"{where}: metadata 'max_new_tokens' must be a positive integer")
        out["max_new_tokens"] = value
    if "metric" in out:
        check_metric(out["metric"])
    return out


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where :func:`write_task_file` puts a task's metadata: ``tasks.jsonl`` -> ``tasks.jsonl.meta.json``."""
    path = Path(path)
    return path.with_name(path.name + META_SUFFIX)


def find_sidecar(path: str | os.PathLike) -> Path | None:
    """The metadata file of task file ``path``: ``<file>.meta.json`` or, the natural guess,
    ``<stem>.meta.json`` (``tasks.jsonl`` -> ``tasks.meta.json``). Both present: an error, since
    which one wins would be a guess."""
    path = Path(path)
    candidates = [c for c in (sidecar_path(path), path.with_suffix(META_SUFFIX)) if c.is_file()]
    if len(candidates) == 2 and candidates[0] != candidates[1]:
        raise TaskError(f"{path}: two metadata files ({candidates[0].name} and {candidates[1].name}); keep one")
    return candidates[0] if candidates else None


def load_task_file(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    description: str | None = None,
    metric: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Task:
    """Read and validate a task JSONL file (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    raw = path.read_bytes()
    meta: dict = {}
    examples: list[Example] = []
    splits: list[str | None] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TaskError(f"{path}:{lineno}: invalid UTF-8 (byte {exc.start})") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{path}:{lineno}: each line must be a JSON object with 'prompt' and 'answer'")
        if "_task" in obj and "prompt" not in obj:
            if examples or meta:
                raise TaskError(f"{path}:{lineno}: the '_task' header must be the first line")
            meta = _meta_from_dict(obj["_task"], f"{path}:{lineno}")
            continue
        for key in ("prompt", "answer"):
            if key not in obj:
                raise TaskError(f"{path}:{lineno}: missing key {key!r}")
            if not isinstance(obj[key], str):
                raise TaskError(f"{path}:{lineno}: {key!r} must be a string, got {type(obj[key]).__name__}")
        if not obj["prompt"].strip():
            raise TaskError(f"{path}:{lineno}: 'prompt' is empty")
        split = obj.get("split")
        if split is not None and split not in SPLITS:
            raise TaskError(f"{path}:{lineno}: 'split' must be 'train' or 'test', got {split!r}")
        examples.append(Example(obj["prompt"], obj["answer"]))
        splits.append(split)
    if not examples:
        raise TaskError(f"{path}: no items (the file is empty or blank)")

    sidecar = find_sidecar(path)
    if sidecar is not None:
        try:
            meta.update(_meta_from_dict(json.loads(sidecar.read_text(encoding="utf-8")), str(sidecar)))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TaskError(f"{sidecar}: not valid JSON ({exc})") from None
    overrides = {"name": name, "description": description, "metric": metric}
    meta.update({k: v for k, v in overrides.items() if v is not None})
    check_metric(meta.get("metric", "exact"))

    if all(s is not None for s in splits):
        train = [e for e, s in zip(examples, splits) if s == "train"]
        test = [e for e, s in zip(examples, splits) if s == "test"]
    elif any(s is not None for s in splits):
        raise TaskError(f"{path}: 'split' is given on some lines but not all")
    else:
        train, test = split_by_hash(examples, test_fraction=test_fraction, seed=seed)
    if not train:
        raise TaskError(f"{path}: no training items after the split")
    task_name = meta.get("name") or path.name.split(".")[0]
    return make_task(
        task_name, train, test,
        description=meta.get("description", ""),
        metric=meta.get("metric", "exact"),
        source=f"file:{path.name}",
        language=meta.get("language", "en"),
        max_new_tokens=meta.get("max_new_tokens"),
        family=meta.get("family"),
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_task_file(task: Task, path: str | os.PathLike) -> Path:
    """Write ``task`` as JSONL (each line tagged with its split) plus the ``.meta.json`` sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for which in SPLITS:
            for example in task.split(which):
                fh.write(json.dumps({"prompt": example.prompt, "answer": example.answer, "split": which},
                                    ensure_ascii=False) + "\n")
    meta = {k: v for k, v in task.info.to_dict().items() if k not in ("n_train", "n_test")}
    sidecar_path(path).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def with_info(task: Task, **changes) -> Task:
    """A copy of ``task`` with some metadata changed."""
    return Task(info=replace(task.info, **changes), train=task.train, test=task.test)
