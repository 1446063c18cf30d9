"""``registry bench`` (v2): generated vs retrieved + composed vs trained adapters on held-out tasks.

Protocols (``evaluation.protocols``): ``variants`` holds out unseen members of seen families,
``families`` whole families; both run by default and are reported apart (``--held-out`` runs one
``custom`` split instead). For each split, everything that learns from tasks sees only the split's
training tasks: both generators are trained on them, the multitask LoRA is trained on the union of
their train items, and the retrieval pool is their harvested adapters. Every method is scored on
the same test items of a held-out task, so differences are paired.

Methods: ``base``; ``oracle`` (the task's own harvest); ``multitask`` (Text-to-LoRA's baseline);
``best_other`` (the best single training-task LoRA on the task's test items: the ceiling of
selection; candidates are the task's family members, then its nearest adapters, at most
``best_other_max``); ``training_mean`` (per-item mean over ``training_mean_max`` training LoRAs);
``selection`` / ``mixture`` / ``fusion`` (what ``registry compose --task T -k K --strategy S`` does
with this pool); ``selection_multitask`` (the selected adapter plus the split's multitask LoRA, their
weight deltas summed: ``registry compose --strategy selection -k 1 --add MULTITASK``);
``selection_multitask_gated`` (the same with ``--gate``: the multitask LoRA alone unless the selected
adapter lowers the first-token entropy on the task's prompts); ``dnd`` / ``cvae`` and their controls ``<gen>_other`` (conditioned on another
held-out task's prompts) and ``<gen>_random`` (random strings of the same lengths).

Each row is cached under ``<out>/rows/`` by a hash of everything that decides it (task items,
method, split, k, limit, prompts, generator artifact, pool, base) and written atomically, so an
interrupted bench resumes and a changed setting never reuses a stale row.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harvest.evaluate import DEFAULT_EVAL_BATCH
from harvest.service import final_adapter
from evaluation.protocols import PROTOCOLS, Split, custom_split, families_split, spread, variants_split
from evaluation.report import RETRIEVAL, MethodResult, write_report

RETRIEVAL_METHODS = RETRIEVAL  # the retrieval compositions (evaluation.report compares the best of them)
ON_MULTITASK = ("multitask", "selection_multitask", "selection_multitask_gated")  # methods that use the split's multitask LoRA
GENERATORS = ("dnd", "cvae", "sft")  # sft: the DnD decoder trained through the base model
CONTROLS = tuple(f"{g}_{c}" for g in GENERATORS for c in ("other", "random"))
ALL_METHODS = ("base", "oracle", "multitask", "best_other", "training_mean", *RETRIEVAL_METHODS, *GENERATORS, *CONTROLS)
DEFAULT_METHODS = tuple(m for m in ALL_METHODS if m != "training_mean")

spread_subset = spread  # the name earlier callers use


@dataclass
class BenchSettings:
    held_out: list[str] | None = None  # a custom split; None: the protocols below
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    variants: int = 6                  # families that lose one member (variants protocol)
    families: int = 2                  # whole families held out (families protocol)
    members_per_family: int = 3        # members of a held-out family evaluated
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    limit: int | None = None           # test items per task (None: the whole test split)
    k: int = 3
    tasks: list[str] | None = None     # bench tasks: zoo names or .jsonl files (default: every finished zoo harvest)
    n_prompts: int = 32                # prompts given to the generator / used as the retrieval query
    generator_steps: int = 600
    generator_batch_size: int = 8
    cvae_steps: int = 300
    cvae_options: dict = field(default_factory=dict)  # CVAE architecture options (tests use tiny ones)
    cvae_objective: str = "recon"      # sft: cvae_steps of reconstruction, then sft_steps through the base
    cvae_anchor: str = "none"          # with cvae_objective sft: multitask = decode a deviation from the multitask LoRA
    sft_steps: int = 500
    sft_options: dict = field(default_factory=dict)   # SFT decoder / training options (tests use tiny ones)
    training_mean_max: int | None = 8
    best_other_max: int = 12
    min_gain: float = 0.15             # a task is "learnable" (may be held out) when its harvest beats the base by this
    multitask_steps: int | None = None  # the multitask LoRA's step budget (None: one harvest's, from the recipe)
    batch_size: int = DEFAULT_EVAL_BATCH  # decoding batch; in bf16 it can move a greedy answer, so rows key on it
    sft_gate: bool = False  # the SFT generator's rows generate with the entropy gate (generate --gate)
    seed: int = 0
    generator_seed: int | None = None  # the generators' training seed (None: ``seed``); the prompts keep ``seed``

    @property
    def cvae_anchored(self) -> bool:
        """The CVAE is trained through the base and decodes a deviation from the split's multitask LoRA."""
        return self.cvae_objective == "sft" and self.cvae_anchor == "multitask"


# --------------------------------------------------------------------------------------------
# Row cache
# --------------------------------------------------------------------------------------------


def row_key(**decides) -> str:
    """A short hash of everything that decides a row (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(decides, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _row_path(out: Path, task: str, method: str, key: str) -> Path:
    return out / "rows" / f"{task}__{method}__{key}.json"


def _load_row(path: Path) -> MethodResult | None:
    return MethodResult(**json.loads(path.read_text())) if path.exists() else None


def _save_row(path: Path, result: MethodResult) -> None:
    from registry.atomic import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, asdict(result))


def _items_digest(task, limit: int | None) -> str:
    items = task.split("test")[:limit] if limit else task.split("test")
    return hashlib.sha256("\1".join(f"{e.prompt}\0{e.answer}" for e in items).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The bench's tasks
# --------------------------------------------------------------------------------------------


def _is_multitask(info) -> bool:
    from harvest.service import MULTITASK_TAG

    return MULTITASK_TAG in (info.tags or [])


def harvested_tasks(reg) -> list[str]:
    """Tasks whose harvest finished (its last checkpoint carries the ``final`` alias), sorted; a harvest
    still running in another process does not enter the bench half-done. Multitask LoRAs are not tasks."""
    from registry.errors import NotFound

    complete = set()
    for task in {a.task for a in reg.list_adapters(kind="harvested") if a.task and not _is_multitask(a)}:
        try:
            if reg.resolve(f"{task}@final").task == task:
                complete.add(task)
        except NotFound:
            continue
    return sorted(complete)


def _family(task) -> str | None:
    from harvest.zoo import family_of

    return family_of(task.name) or task.info.family


def random_prompts(prompts: Sequence[str], seed: int) -> list[str]:
    """Random strings (letters, digits, spaces) of the same lengths as ``prompts``: the control that
    tells a generator reading its condition from one that ignores it."""
    rng = random.Random(f"random-prompts:{seed}")
    alphabet = string.ascii_lowercase + string.digits + "    "
    return ["".join(rng.choice(alphabet) for _ in range(len(p))) for p in prompts]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class _SplitContext:
    """What one split's rows share: the split, its trained artifacts and its retrieval pool."""

    split: Split
    base_model: str
    pool: dict[str, str]                       # training task -> its final adapter REF
    generators: dict[str, str | None] = field(default_factory=dict)  # dnd/cvae -> artifact REF
    multitask_ref: str | None = None
    tasks: dict = field(default_factory=dict)  # every bench task by name, loaded (task files have no zoo name)
    notes: list[str] = field(default_factory=list)

    def outside_pool(self, reg) -> list[str]:
        """Every harvested task outside the split's training set, read at each retrieval: a task
        harvested while the bench runs (another process) must not enter the split's pool."""
        return sorted({a.task for a in reg.list_adapters(kind="harvested") if a.task} - set(self.pool))


def run_bench(reg, settings: BenchSettings, out: Path, on_status: Callable[[str], None] = print,
              on_progress: Callable[[int, int], None] | None = None) -> dict[str, Path]:
    """Run (or resume) the comparison for every split and write the report into ``out``."""
    from harvest.service import resolve_task
    from registry.errors import RegistryError

    unknown = sorted(set(settings.methods) - set(ALL_METHODS))
    if unknown:
        raise RegistryError(f"unknown bench method(s): {', '.join(unknown)} (use {', '.join(ALL_METHODS)})")
    out.mkdir(parents=True, exist_ok=True)
    finished = harvested_tasks(reg)
    specs = list(settings.tasks) if settings.tasks else [t for t in finished if _is_zoo(t)]
    tasks = {}
    for spec in specs + list(settings.held_out or []):
        task = resolve_task(spec)
        tasks.setdefault(task.name, task)
    held_names = [resolve_task(s).name for s in settings.held_out] if settings.held_out else None
    unfinished = [t for t in tasks if t not in finished and t not in (held_names or [])]
    if unfinished:
        raise RegistryError(f"tasks without a finished harvest: {', '.join(unfinished)}")
    for name, task in tasks.items():
        if not task.split("test"):
            raise RegistryError(f"task {name} has no test items")
        if len(task.split("train")) < settings.n_prompts and name in (held_names or tasks):
            raise RegistryError(f"task {name} has {len(task.split('train'))} train items; the generators and "
                                f"retrieval need {settings.n_prompts} prompts (--n-prompts)")

    families = {name: _family(task) for name, task in tasks.items()}
    learnable, notes = _learnable(reg, tasks, finished, settings.min_gain)
    if held_names:
        splits = [custom_split(list(tasks), held_names)]
    else:
        bad = sorted(set(settings.protocols) - set(PROTOCOLS))
        if bad:
            raise RegistryError(f"unknown protocol(s): {', '.join(bad)} (use {', '.join(PROTOCOLS)})")
        try:
            splits = [variants_split(families, settings.variants, learnable) if p == "variants" else
                      families_split(families, settings.families, settings.members_per_family, learnable)
                      for p in settings.protocols]
        except ValueError as exc:
            raise RegistryError(f"{exc} (harvest more zoo tasks or pass --held-out)") from None

    total = sum(len(s.held_out) for s in splits) * len(settings.methods)
    done = 0
    results: list[MethodResult] = []
    for split in splits:
        context = _prepare_split(reg, split, settings, finished, tasks, on_status)
        notes += context.notes
        for task_name in split.held_out:
            for method in settings.methods:
                result = _row(reg, out, method, tasks[task_name], split, context, settings, on_status)
                if result is not None:
                    results.append(result)
                done += 1
                if on_progress:
                    on_progress(done, total)
    return write_report(results, out, "Generated vs retrieved vs trained adapters on held-out tasks",
                        asdict(settings) | {"splits": [s.to_dict() for s in splits]}, notes)


def _learnable(reg, tasks: dict, finished: list[str], min_gain: float) -> tuple[set[str] | None, list[str]]:
    """The bench tasks whose stored harvest gain (``harvest.service.stored_gain``) is at least
    ``min_gain``, and a note saying so; None (any task may be held out) when none was evaluated."""
    from harvest.service import stored_gain

    gains = {name: stored_gain(reg, task) for name, task in tasks.items() if name in finished}
    known = {name: gain for name, gain in gains.items() if gain is not None}
    if not known:
        return None, ["held-out tasks chosen among all bench tasks: no stored evaluation says which ones their "
                      "own LoRA learns (run benchmarks/zoo_report.py first)"]
    learnable = {name for name, gain in known.items() if gain >= min_gain}
    return learnable, [f"held-out candidates: the {len(learnable)} of {len(gains)} harvested bench tasks whose final "
                       f"LoRA beats the base by at least {min_gain:.2f} (stored evaluations; "
                       f"{len(gains) - len(known)} never evaluated count as not learnable)"]


def _is_zoo(name: str) -> bool:
    from harvest.zoo import zoo_names

    return name in zoo_names()


def _prepare_split(reg, split: Split, settings: BenchSettings, finished: list[str], tasks: dict,
                   on_status) -> _SplitContext:
    """Train (or reuse) the split's generators and multitask LoRA; fix its retrieval pool."""
    from registry.errors import RegistryError

    training = [t for t in split.training if t in finished]
    if len(training) < 2:
        raise RegistryError(f"{split.protocol}: need at least 2 harvested training tasks, found {len(training)}")
    pool = {t: final_adapter(reg, t).ref for t in training}
    base_model = reg.resolve(pool[training[0]]).base_model
    context = _SplitContext(split, base_model, pool, tasks=tasks)
    label = split.protocol
    context.notes.append(f"[{label}] held out: {', '.join(split.held_out)}"
                         + (f" (families {', '.join(split.held_out_families)})" if split.held_out_families else ""))
    context.notes.append(f"[{label}] training tasks ({len(training)}) = retrieval pool: their final harvested "
                         f"adapters; k={settings.k}, one adapter per task")
    wanted = set(settings.methods)
    if wanted & set(ON_MULTITASK) or _wants(wanted, "sft") or (_wants(wanted, "cvae") and settings.cvae_anchored):
        # the SFT generator (and an anchored CVAE) starts from it
        from harvest.service import harvest_multitask, resolve_task

        members = [tasks[t] if t in tasks else resolve_task(t) for t in training]
        on_status(f"{label}: multitask LoRA on {len(members)} tasks")
        summary = harvest_multitask(reg, members, steps=settings.multitask_steps,
                                    on_step=lambda s, loss: on_status(f"{label}: multitask step {s}"))
        context.multitask_ref = summary.refs[-1]
        recipe = reg.resolve(context.multitask_ref).recipe
        context.notes.append(f"[{label}] multitask LoRA {context.multitask_ref}: {recipe['config']['steps']} steps, "
                             f"rank {recipe['config']['rank']} (the training tasks' harvest recipe"
                             + (f", {settings.multitask_steps} steps" if settings.multitask_steps else "")
                             + "), on the union of their train items")
    for arch in GENERATORS:
        if _wants(wanted, arch):
            context.generators[arch] = _train_generator(reg, arch, split, training, settings, on_status,
                                                        tasks, context.multitask_ref)
            how = ""
            if arch == "cvae" and settings.cvae_objective == "sft":
                anchored = ", decoding a deviation from the multitask LoRA" if settings.cvae_anchored else ""
                how = f" ({settings.cvae_steps} reconstruction steps, then {settings.sft_steps} through the base model{anchored})"
            context.notes.append(f"[{label}] {arch} generator {context.generators[arch]}: trained on the "
                                 f"{len(training)} training tasks{how}")
    return context


def _wants(methods: set[str], generator: str) -> bool:
    return bool(methods & {generator, f"{generator}_other", f"{generator}_random"})


def _train_generator(reg, arch: str, split: Split, training: list[str], settings: BenchSettings, on_status,
                     tasks: dict, multitask_ref: str | None) -> str:
    """Train (or reuse) one of the split's generators: ``dnd`` and ``cvae`` by reconstruction on the
    training tasks' harvests, ``sft`` (the DnD decoder trained through the base model on the training
    tasks' train items, starting from the split's multitask LoRA)."""
    from generator.service import train_generator_from_registry

    steps = {"dnd": settings.generator_steps, "cvae": settings.cvae_steps, "sft": settings.sft_steps}[arch]
    on_status(f"{split.protocol}: training the {arch} generator on {len(training)} tasks")
    if arch == "dnd":
        options = dict(batch_size=settings.generator_batch_size, n_prompts=16)
    elif arch == "cvae" and settings.cvae_objective == "sft":  # the SFT generator's step budget and batches
        steps = settings.sft_steps
        sft = {k: v for k, v in settings.sft_options.items() if k in ("batch_size", "items_per_task", "lr")}
        options = dict(settings.cvae_options, **sft, arch="cvae", objective="sft", recon_steps=settings.cvae_steps,
                       task_items=_train_items(training, tasks),
                       anchor=multitask_ref if settings.cvae_anchored else None)
    elif arch == "cvae":
        options = dict(settings.cvae_options, arch="cvae")
    else:
        retrieved = settings.sft_options.get("retrieved_anchor_k")  # a retrieved anchor replaces the multitask one
        options = dict(settings.sft_options, objective="sft", task_items=_train_items(training, tasks),
                       anchor=None if retrieved else multitask_ref)
        if options.get("under") == "multitask":  # --sft-under-multitask: this split's multitask LoRA
            options["under"] = multitask_ref
    # held-out tasks without a harvest have nothing to exclude (the training set names only harvests)
    held_harvested = [t for t in split.held_out if reg.list_adapters(kind="harvested", task=t)]
    artifact = train_generator_from_registry(
        reg, name=f"bench-{arch}-{split.protocol}", tasks=training, exclude_tasks=held_harvested, steps=steps,
        seed=settings.seed if settings.generator_seed is None else settings.generator_seed, on_status=on_status,
        on_step=lambda step, total, loss: on_status(f"{split.protocol}: {arch} step {step}/{total}, loss {loss:.4f}"),
        **options)
    return artifact.ref


def _train_items(training: list[str], tasks: dict) -> dict[str, list[tuple[str, str]]]:
    """Each training task's train items as (prompt, answer): what the SFT objectives train on."""
    from harvest.service import resolve_task

    return {t: [(e.prompt, e.answer) for e in (tasks.get(t) or resolve_task(t)).split("train")] for t in training}


def _row(reg, out: Path, method: str, task, split: Split, context: _SplitContext, settings: BenchSettings,
         on_status) -> MethodResult | None:
    """One (task, method) row: from the cache when everything that decides it is unchanged."""
    from harvest.service import sample_prompts

    prompts = sample_prompts(task, settings.n_prompts, seed=settings.seed)
    arch = method.split("_")[0] if method.split("_")[0] in GENERATORS else None
    key = row_key(task=task.name, items=_items_digest(task, settings.limit), method=method, split=split.to_dict(),
                  k=settings.k, limit=settings.limit, prompts=prompts, base=context.base_model,
                  pool=context.pool if method in (*RETRIEVAL_METHODS, "best_other", "training_mean") else None,
                  generator=context.generators.get(arch) if arch else None,
                  multitask=context.multitask_ref if method in ON_MULTITASK else None,
                  caps=(settings.best_other_max, settings.training_mean_max), batch=settings.batch_size,
                  **({"gate": True} if _gated(method, settings) else {}))
    path = _row_path(out, task.name, method, key)
    cached = _load_row(path)
    if cached is not None:
        return cached
    on_status(f"{split.protocol} / {task.name}: {method}")
    result = _run_method(reg, method, task, prompts, split, context, settings)
    if result is not None:
        result.protocol = split.protocol
        _save_row(path, result)
    return result


def _gated(method: str, settings: BenchSettings) -> bool:
    return settings.sft_gate and method.split("_")[0] == "sft"


def _scores(result) -> list[float]:
    return [float(p.score) for p in result.predictions]


def _evaluate_ref(reg, task, ref: str, settings: BenchSettings) -> list[float]:
    from harvest.evaluate import evaluate

    info = reg.resolve(ref)
    return _scores(evaluate(task, base=info.base_model, adapter=str(reg.fetch(info.ref)), limit=settings.limit,
                            batch_size=settings.batch_size))


def _run_method(reg, method, task, prompts, split: Split, context: _SplitContext,
                settings: BenchSettings) -> MethodResult | None:
    """Obtain the method's adapter for ``task`` (timed) and score it on the test items."""
    from harvest.evaluate import evaluate

    if method == "base":
        scores = _scores(evaluate(task, base=context.base_model, limit=settings.limit, batch_size=settings.batch_size))
        return MethodResult(task.name, method, scores, 0.0, None)
    if method == "oracle":
        from registry.errors import NotFound

        try:
            info = final_adapter(reg, task.name)
        except NotFound:  # a held-out task nobody harvested: the oracle cell says so, the rest runs
            return MethodResult(task.name, method, [], None, None, {"missing": f"{task.name} has no harvest"})
        return MethodResult(task.name, method, _evaluate_ref(reg, task, info.ref, settings),
                            info.metrics.get("harvest_seconds"), info.ref)
    if method == "multitask":
        return MethodResult(task.name, method, _evaluate_ref(reg, task, context.multitask_ref, settings),
                            reg.resolve(context.multitask_ref).metrics.get("harvest_seconds"), context.multitask_ref)
    if method == "training_mean":
        refs = [context.pool[t] for t in spread(sorted(context.pool), settings.training_mean_max)]
        per_adapter = [_evaluate_ref(reg, task, ref, settings) for ref in refs]
        item_means = [sum(col) / len(col) for col in zip(*per_adapter)]  # mean over adapters, per item
        return MethodResult(task.name, method, item_means, 0.0, None,
                            {"adapters": refs, "accuracy_per_adapter": [sum(s) / len(s) for s in per_adapter]})
    if method == "best_other":
        candidates = _best_other_candidates(reg, task, prompts, context, settings.best_other_max)
        per_adapter = {ref: _evaluate_ref(reg, task, ref, settings) for ref in candidates}
        best = max(per_adapter, key=lambda ref: (sum(per_adapter[ref]), ref))
        return MethodResult(task.name, method, per_adapter[best], 0.0, best,
                            {"candidates": {ref: sum(s) / len(s) for ref, s in per_adapter.items()}})
    if method in RETRIEVAL_METHODS:
        from retrieval.service import compose_adapter

        start = time.perf_counter()
        plus_multitask = method.startswith("selection_multitask")
        info = compose_adapter(reg, prompts, k=1 if plus_multitask else settings.k,
                               strategy="selection" if plus_multitask else method,
                               name=f"bench-{split.protocol}-{task.name}-{method}",
                               exclude_tasks=context.outside_pool(reg), kind="harvested", one_per_task=True,
                               task=task.name, add=[context.multitask_ref] if plus_multitask else (),
                               gate=method.endswith("_gated"))
        seconds = time.perf_counter() - start
        return MethodResult(task.name, method, _evaluate_ref(reg, task, info.ref, settings), seconds, info.ref,
                            {"parents": info.parents, **({"gate": info.recipe["gate"]} if "gate" in info.recipe else {})})
    arch, _, control = method.partition("_")
    if arch in GENERATORS:
        from generator.service import generate_adapter

        condition = prompts
        if control == "other":
            others = [t for t in split.held_out if t != task.name]
            if not others:
                return None  # a single held-out task has no other task to borrow prompts from
            from harvest.service import sample_prompts

            donor = others[split.held_out.index(task.name) % len(others)]
            condition = sample_prompts(context.tasks[donor], settings.n_prompts, seed=settings.seed)
        elif control == "random":
            condition = random_prompts(prompts, settings.seed)
        start = time.perf_counter()
        timings: dict = {}
        info = generate_adapter(reg, condition, f"bench-{split.protocol}-{task.name}-{method}",
                                generator_ref=context.generators[arch], task=task.name, timings=timings,
                                gate=_gated(method, settings))
        seconds = time.perf_counter() - start
        extra = {"generator": context.generators[arch],
                 "timings": {k: v for k, v in timings.items() if isinstance(v, float)},
                 **({"gate": timings["gate"]} if "gate" in timings else {})}
        if control == "other":
            extra["condition_task"] = donor
        return MethodResult(task.name, method, _evaluate_ref(reg, task, info.ref, settings), seconds, info.ref, extra)
    raise ValueError(f"unknown method {method}")


def _best_other_candidates(reg, task, prompts, context: _SplitContext, limit: int) -> list[str]:
    """Training LoRAs worth trying on ``task``: its family's members first, then the nearest by
    retrieval, at most ``limit``."""
    from retrieval.service import retrieve

    family = _family(task)
    from harvest.zoo import family_of

    same_family = [context.pool[t] for t in sorted(context.pool) if family and family_of(t) == family]
    hits = retrieve(reg, prompts, k=min(limit, len(context.pool)), kind="harvested", one_per_task=True,
                    exclude_tasks=context.outside_pool(reg))
    nearest = [context.pool[h.adapter.task] for h in hits if h.adapter.task in context.pool]
    ordered = list(dict.fromkeys(same_family + nearest))
    return ordered[:limit]
