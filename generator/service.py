"""The generators as a registry service: what the DnD and the CVAE share, and the DnD generator.

    from registry import Registry
    from generator.service import train_generator_from_registry, generate_adapter

    reg = Registry.open()
    artifact = train_generator_from_registry(reg, exclude_tasks=["held_out"], steps=2000)
    info = generate_adapter(reg, prompts, name="held-out-dnd")    # a `generated` adapter

This module and ``generator.cvae_service`` are the only places where the generator math
(``generator.tokenizer``, ``dnd``, ``cvae``, ``training``) meets the registry. They read and write
only through the ``Registry`` API, never print, and report progress through callbacks. Every
refusal is a one-line ``RegistryError`` subclass raised before anything is written.

Shared by both architectures (here): the errors, the training set (``collect_training_set``), the
resumable work folder and artifact helpers, loading a stored generator (cached per process, one
``LoadedGenerator`` for both), and the public doors, which dispatch on the architecture or on the
artifact's type: ``train_generator_from_registry(arch=...)``, ``generate_adapter``,
``generate_state_dict_for``, ``list_generators``.

DnD-specific (here too): a trained DnD generator is one registry artifact of type
``generator-dnd``: its tensors are the decoder weights (``decoder.*``) and the token normaliser
(``normalizer.*``); its metadata records the decoder config, the LoRA layout it produces (and that
layout's fingerprint), the base model, the prompt encoder, the PEFT fields to write, exactly which
adapters and tasks it was trained on, and how the training went.

Training is resumable: the state (weights, optimiser, sampling RNG, losses) is saved every
``save_every`` steps under ``<home>/work/generators/<fingerprint>/``, where the fingerprint covers
the training set (adapter refs + digests) and every setting except the number of steps; rerunning
the same call continues from there (also with a larger ``steps``), and rerunning a finished one
returns the artifact it already stored.

ICM-LoRA's CVAE (``train_cvae_from_registry``, ``regenerate_task``, ``regenerate_adapter``, the
``CVAE_*`` settings) lives in ``generator.cvae_service``; its public names are re-exported here,
so ``from generator.service import regenerate_task`` keeps working.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from registry.errors import NotFound, RegistryError
from registry.precision import identity as precision_identity
from registry.prompts import prompts_sha256

ARTIFACT_TYPE = "generator-dnd"
ARTIFACT_FORMAT = "dnd-generator-artifact/1"
SERVICE_VERSION = "dnd-service/1"
DECODER_PREFIX = "decoder."
NORMALIZER_PREFIX = "normalizer."
CVAE_ARTIFACT_TYPE = "generator-cvae"  # ICM-LoRA's CVAE (``generator.cvae_service``)
GENERATOR_TYPE_PREFIX = "generator-"
GENERATOR_TYPES = (ARTIFACT_TYPE, CVAE_ARTIFACT_TYPE)
ARCHES = ("dnd", "cvae")
PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern")
MAX_CURVE_POINTS = 200

# Training defaults (CPU-friendly; seed 000 used 10,000 steps at lr 3e-5, batch 8 on an H100).
DEFAULT_STEPS = 2000
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 8
DEFAULT_SAVE_EVERY = 100
# Options of ``train_generator_from_registry(**config)``: decoder shape and training settings.
DECODER_OPTIONS = ("prompt_tokens", "n_layers", "kernel", "hidden_tokens", "shapes")
TRAINING_OPTIONS = ("chunk_width", "center", "spread_weighting", "seed", "weight_decay", "grad_clip",
                    "save_every", "base_model", "precision")


class GeneratorError(RegistryError):
    """A generator that cannot be trained, found, loaded or used as asked (one-line message)."""


class GeneratorLayoutError(GeneratorError):
    """A stored generator whose layout, decoder and normaliser do not agree."""


class TrainingStopped(GeneratorError):
    """Training stopped before its last step; the state is saved and a rerun resumes it."""


# -----------------------------------------------------------------------------
# the training set


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


def _peft_fields(config: Mapping) -> dict:
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


def collect_training_set(reg, tasks: Sequence[str] | None = None, exclude_tasks: Sequence[str] = (),
                         base_model: str | None = None) -> TrainingSet:
    """All harvested adapters (with a task) of one base model and one layout, grouped by task.

    ``tasks`` keeps only those tasks, ``exclude_tasks`` drops tasks (held out), ``base_model``
    keeps one base. Refuses a set that spans several base models or layouts, unknown task names,
    tasks without stored prompts, disagreeing PEFT settings, and fewer than two tasks.
    """
    from registry import base_models

    wanted = None if tasks is None else list(dict.fromkeys(tasks))
    excluded = set(exclude_tasks)
    if wanted is not None and excluded & set(wanted):
        raise GeneratorError(f"tasks both kept and excluded: {', '.join(sorted(excluded & set(wanted)))}")
    harvested = [a for a in reg.list_adapters(kind="harvested", base_model=base_model) if a.task]
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
    for info in sorted(infos, key=lambda i: (i.task, i.name, i.version)):
        state_dict, config = reg.load_weights(info.ref)
        fields = _peft_fields(config)
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


# -----------------------------------------------------------------------------
# training: helpers shared with the CVAE (work folder, stored artifact, resumed state), the DnD trainer


def _sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
                          .encode("utf-8")).hexdigest()


def code_version() -> str:
    """``SERVICE_VERSION`` plus a hash of the generator's source files (changes with the math)."""
    digest = hashlib.sha256()
    folder = Path(__file__).resolve().parent
    for module in ("tokenizer.py", "condition.py", "dnd.py", "training.py", "service.py"):
        path = folder / module
        if path.exists():
            digest.update(path.read_bytes())
    return f"{SERVICE_VERSION}+{digest.hexdigest()[:12]}"


def _subsample_curve(losses: Sequence[float], points: int = MAX_CURVE_POINTS) -> list[list[float]]:
    """[[step, loss], ...] with at most ``points`` entries, always including the last step."""
    if not losses:
        return []
    stride = max(1, -(-len(losses) // points))
    steps = list(range(stride, len(losses) + 1, stride))
    if steps[-1] != len(losses):
        steps.append(len(losses))
    return [[s, float(losses[s - 1])] for s in steps]


class _WorkDir:
    """``<home>/work/generators/<fingerprint>/``: numbered state folders and a LATEST pointer.

    Each save goes into a fresh ``step-NNNNNNNN`` folder; LATEST (a small JSON written atomically)
    names the complete one, so a crash mid-save leaves the previous state in use.
    """

    def __init__(self, root: Path):
        self.root = root

    def _latest(self) -> dict | None:
        path = self.root / "LATEST"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def clear(self) -> None:
        for path in self.root.glob("step-*"):
            shutil.rmtree(path, ignore_errors=True)
        for name in ("LATEST", "LATEST.tmp"):
            (self.root / name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self):
        """Hold an exclusive lock on the folder (a second run of the same training is refused)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "w") as handle:
            try:
                import fcntl
            except ImportError:  # not POSIX: no locking
                yield
                return
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise GeneratorError(f"another train-generator run is using {self.root}") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self, model):
        """(TrainState, latest record) or (None, None) when nothing usable is saved."""
        from generator.training import load_training_state

        latest = self._latest()
        if not latest or not (self.root / latest["folder"] / "training_state.json").exists():
            return None, None
        return load_training_state(self.root / latest["folder"], model), latest

    def save(self, state, model, record: dict) -> None:
        from generator.training import save_training_state

        self.root.mkdir(parents=True, exist_ok=True)
        folder = f"step-{state.step:08d}"
        save_training_state(self.root / folder, state, model)
        self._write_latest({**record, "folder": folder, "step": state.step})
        for old in self.root.glob("step-*"):
            if old.name != folder:
                shutil.rmtree(old, ignore_errors=True)

    def mark_stored(self, artifact_ref: str, artifact_sha256: str, steps: int) -> None:
        latest = self._latest() or {}
        self._write_latest({**latest, "artifact": artifact_ref, "artifact_sha256": artifact_sha256,
                            "artifact_steps": steps})

    def stored(self) -> dict | None:
        latest = self._latest()
        return latest if latest and latest.get("artifact") else None

    def _write_latest(self, record: dict) -> None:
        from registry.atomic import atomic_write_json

        atomic_write_json(self.root / "LATEST", record)


def _split_config(config: Mapping) -> tuple[dict, dict]:
    unknown = sorted(set(config) - set(DECODER_OPTIONS) - set(TRAINING_OPTIONS))
    if unknown:
        raise GeneratorError(f"unknown generator option(s): {', '.join(unknown)}")
    decoder = {k: config[k] for k in DECODER_OPTIONS if config.get(k) is not None}
    training = {k: config[k] for k in TRAINING_OPTIONS if config.get(k) is not None}
    return decoder, training


def _stored_artifact(reg, work, steps: int, artifact_type: str, status):
    """The artifact this exact training already stored (same work dir and steps), if still intact."""
    stored = work.stored()
    if stored and stored.get("artifact_steps") == steps:
        try:
            info = reg.resolve_artifact(stored["artifact"], artifact_type)
        except NotFound:
            return None
        if info.sha256 == stored.get("artifact_sha256"):
            status(f"already trained: {info.ref}")
            return info
    return None


def _model_and_state(work, build_model, seed: int, steps: int):
    """A freshly seeded model with the saved training state (if any) loaded: (model, state, record)."""
    import torch

    from generator.training import TrainState

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model()
    try:
        state, record = work.load(model)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise GeneratorError(f"saved training state in {work.root} is unreadable ({str(err).splitlines()[0]}): "
                             "start over with resume=False / --fresh") from None
    if state is not None and state.step > steps:
        raise GeneratorError(f"saved training state is at step {state.step} > --steps {steps}: "
                             f"rerun with more steps or start over (resume=False / --fresh)")
    return model, state or TrainState(seed=seed), record


def run_chunked_training(work, model, state, *, steps: int, save_every: int, train_chunk, on_step, record: dict,
                         wall_before: float):
    """Train up to ``steps`` in chunks of ``save_every``, saving the state after each chunk and on Ctrl-C.

    ``train_chunk(model, state, target, on_chunk_step) -> (model, state)`` trains to step ``target``;
    ``on_step(step, steps, loss)`` returning False stops after that step (state saved,
    ``TrainingStopped`` raised). Returns ``(model, state, wall_time_s)``, resumed runs included.
    """
    started, stopped = time.perf_counter(), False

    def stop_requested(step: int, _chunk_end: int, loss: float):
        nonlocal stopped
        if on_step is not None and on_step(step, steps, loss) is False:  # the whole run, not the chunk
            stopped = True
            return False
        return None

    def save() -> None:
        work.save(state, model, {**record, "wall_time_s": wall_before + time.perf_counter() - started})

    try:
        while state.step < steps and not stopped:
            target = min(steps, (state.step // save_every + 1) * save_every)
            model, state = train_chunk(model, state, target, stop_requested)
            save()
    except KeyboardInterrupt:
        save()
        raise
    if stopped and state.step < steps:
        raise TrainingStopped(f"training stopped at step {state.step}/{steps}; state saved in {work.root}: "
                              "rerun the same command to resume")
    return model, state, wall_before + time.perf_counter() - started


def training_meta(data: TrainingSet, layout, exclude_tasks: Sequence[str], checkpoints_per_task: dict, state,
                  training: dict) -> dict:
    """The artifact metadata every generator records: what it was trained on and how training went."""
    losses = state.losses
    tail = losses[-max(1, min(20, len(losses) // 10)):]
    return {
        "layout": layout.to_dict(),
        "layout_fingerprint": layout.fingerprint,
        "registry_layout_fingerprint": data.registry_layout,
        "base_model": data.base_model,
        "base_fingerprint": data.base_fingerprint,
        "peft_config": data.peft_fields,
        "dtype": data.dtype,
        "adapters": data.adapters,
        "tasks": data.tasks,
        "excluded_tasks": sorted(set(exclude_tasks)),
        "checkpoints_per_task": checkpoints_per_task,
        "prompts_per_task": {t: len(v) for t, v in data.prompts.items()},
        "steps": state.step,
        "final_loss": float(losses[-1]) if losses else None,
        "final_loss_mean": float(sum(tail) / len(tail)) if tail else None,
        "loss_curve": _subsample_curve(losses),
        "training": training,
    }


def train_generator_from_registry(
    reg, name: str | None = None, tasks: Sequence[str] | None = None, exclude_tasks: Sequence[str] = (),
    steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, batch_size: int | None = None,
    n_prompts: int = 16, device: str | None = None,
    on_step: Callable[[int, int, float], bool | None] | None = None, resume: bool = True,
    on_status: Callable[[str], None] | None = None, arch: str = "dnd", **config,
):
    """Train a DnD generator on the registry's harvested adapters and store it as an artifact.

    ``arch="cvae"`` trains the ICM-LoRA CVAE instead (``train_cvae_from_registry``: ``n_prompts``
    is not used, ``config`` takes the CVAE's options); ``name`` defaults to the arch's name and
    ``batch_size`` to the arch's default (8 for DnD, 4 for the CVAE).

    ``config`` takes decoder options (``prompt_tokens`` L = 64, ``n_layers`` = 4, ``kernel`` = 5,
    ``hidden_tokens`` = 64, ``shapes``) and training options (``chunk_width``, ``center`` =
    "element", ``spread_weighting`` = False, ``seed`` = 0, ``weight_decay`` = 0, ``grad_clip`` = 1,
    ``save_every`` = 100, ``base_model``, ``precision`` = auto: the training forward's autocast,
    ``registry.precision``; recorded in the artifact). ``on_step(step, steps, loss)`` runs after every step;
    returning False stops training (state saved, ``TrainingStopped`` raised). ``resume=False``
    discards saved state and starts over. Returns the stored ``ArtifactInfo``.
    """
    import torch

    from generator.dnd import DnDConfig, DnDDecoder
    from generator.tokenizer import TokenNormalizer, layout_from_state_dict, stack_token_grids, token_mask
    from generator.training import GeneratorDataset, resolve_device, train_generator
    from registry.embeddings import load_encoder
    from registry.refs import validate_name

    if arch == "cvae":
        from generator.cvae_service import DEFAULT_CVAE_BATCH_SIZE, train_cvae_from_registry

        return train_cvae_from_registry(
            reg, name=name or "cvae", tasks=tasks, exclude_tasks=exclude_tasks, steps=steps, lr=lr,
            batch_size=DEFAULT_CVAE_BATCH_SIZE if batch_size is None else batch_size, device=device,
            on_step=on_step, resume=resume, on_status=on_status, **config)
    if arch != "dnd":
        raise GeneratorError(f"unknown generator architecture {arch!r}: one of {', '.join(ARCHES)}")
    name = name or "dnd"
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    status = on_status or (lambda message: None)
    validate_name(name)
    if steps < 1 or batch_size < 1 or n_prompts < 1 or lr <= 0:
        raise GeneratorError("steps, batch size and n_prompts must be >= 1 and lr > 0")
    decoder_options, training_options = _split_config(config)
    seed = int(training_options.get("seed", 0))
    save_every = max(1, int(training_options.get("save_every", DEFAULT_SAVE_EVERY)))
    center = training_options.get("center", "element")
    spread_weighting = bool(training_options.get("spread_weighting", False))
    weight_decay = float(training_options.get("weight_decay", 0.0))
    grad_clip = training_options.get("grad_clip", 1.0)
    precision = resolve_precision(training_options.get("precision"), resolve_device(device))

    status("collecting harvested adapters")
    data = collect_training_set(reg, tasks, exclude_tasks, base_model=training_options.get("base_model"))
    status("loading the prompt encoder")
    encoder = load_encoder(reg.encoder)
    dimension = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    embed_dim = int(dimension())
    first = next(iter(data.checkpoints.values()))[0]
    checkpoints_per_task = {t: len(v) for t, v in data.checkpoints.items()}
    try:
        layout = layout_from_state_dict(first, training_options.get("chunk_width"))
        grids = {}  # task -> (K, T, h, w); each task's state dicts are freed once tokenized
        for task in data.tasks:
            grids[task] = stack_token_grids(data.checkpoints[task], layout)
            data.checkpoints[task] = []
        decoder_config = DnDConfig.from_layout(layout, n_prompts=n_prompts, embed_dim=embed_dim, **decoder_options)
        mask = token_mask(layout)
        normalizer = TokenNormalizer.fit(torch.cat(list(grids.values())), mask, center=center)
    except (ValueError, TypeError) as err:
        raise GeneratorError(f"cannot build a generator for these adapters: {err}") from None

    status("embedding prompts")
    dataset = GeneratorDataset(grids, data.prompts, n_prompts=n_prompts, normalizer=normalizer, mask=mask,
                               encoder=encoder, prompt_tokens=decoder_config.prompt_tokens,
                               spread_weighting=spread_weighting)

    settings = {"lr": lr, "batch_size": batch_size, "seed": seed, "center": center,
                "spread_weighting": spread_weighting, "weight_decay": weight_decay, "grad_clip": grad_clip}
    fingerprint = _sha256_json({"adapters": [[a["ref"], a["digest"]] for a in data.adapters],
                                "prompts": data.prompts, "config": decoder_config.to_dict(),
                                "encoder": reg.encoder_id, "training": settings, "name": name,
                                **precision_identity(precision),
                                "code": SERVICE_VERSION})
    work = _WorkDir(reg.home / "work" / "generators" / fingerprint[:24])
    with work.locked():
        if not resume:
            work.clear()
        info = _stored_artifact(reg, work, steps, ARTIFACT_TYPE, status)
        if info is not None:
            return info
        model, state, record = _model_and_state(work, lambda: DnDDecoder(decoder_config), seed, steps)
        wall_before = float(record.get("wall_time_s", 0.0)) if record else 0.0
        resumed_from = state.step
        device = resolve_device(device)
        status(f"training on {device}" + (f", resuming at step {resumed_from}" if resumed_from else ""))

        model, state, wall_time = run_chunked_training(
            work, model, state, steps=steps, save_every=save_every, on_step=on_step, wall_before=wall_before,
            record={"fingerprint": fingerprint, "name": name},
            train_chunk=lambda model, state, target, on_chunk_step: train_generator(
                model, dataset, steps=target, lr=lr, batch_size=batch_size, device=device, on_step=on_chunk_step,
                state=state, seed=seed, weight_decay=weight_decay, grad_clip=grad_clip, precision=precision))

        meta = {
            "format": ARTIFACT_FORMAT,
            "code_version": code_version(),
            "config": decoder_config.to_dict(),
            **training_meta(data, layout, exclude_tasks, checkpoints_per_task, state, {
                **settings, "steps": steps, "save_every": save_every, "resumed_from": resumed_from,
                "device": str(device), "fingerprint": fingerprint, "precision": precision}),
            "encoder": reg.encoder_id,
            "prompt_tokens": decoder_config.prompt_tokens,
            "n_prompts": n_prompts,
            "wall_time_s": round(wall_time, 3),
            "decoder_parameters": model.num_parameters(),
        }
        tensors = {f"{DECODER_PREFIX}{k}": v for k, v in model.state_dict().items()}
        tensors |= {f"{NORMALIZER_PREFIX}{k}": v for k, v in normalizer.state_dict().items()}
        status("storing the generator")
        info = reg.add_artifact(name, ARTIFACT_TYPE, tensors, meta, base_model=data.base_model)
        work.mark_stored(info.ref, info.sha256, steps)
        return info


# -----------------------------------------------------------------------------
# loading a stored generator


@dataclass
class LoadedGenerator:
    """A decoded generator artifact, ready to generate (cached per process)."""

    ref: str
    sha256: str
    meta: dict
    model: object        # DnDDecoder in eval mode on ``device``
    layout: object       # LoraLayout
    normalizer: object   # TokenNormalizer
    device: object       # torch.device
    task_vectors: dict | None = None  # CVAE only: task -> stored task vector (H,)
    arch: str = "dnd"                 # "dnd" (model: DnDDecoder) or "cvae" (model: LoraCVAE)
    # made on first use and kept with the artifact: the model per precision (``model_for``) and the
    # de-tokenising plan (``decode_plan``); both depend only on the artifact
    _variants: dict = field(default_factory=dict, repr=False)
    _plan: object = field(default=None, repr=False)
    _lock: object = field(default_factory=threading.Lock, repr=False)

    def model_for(self, precision: str):
        """The model to run under ``precision``: the float32 one, or for ``bf16`` a copy whose conv and
        linear weights are stored in bfloat16 (``registry.precision.frozen_dtype``: the generator is
        frozen here, so autocast need not cast its weights on every call); norms and biases stay fp32."""
        if precision == "fp32":
            return self.model
        import copy

        import torch

        from registry.precision import frozen_dtype

        with self._lock:
            if precision not in self._variants:
                model = copy.deepcopy(self.model)
                for module in model.modules():
                    if isinstance(module, (torch.nn.Conv1d, torch.nn.Linear)):
                        module.to(frozen_dtype(precision))
                self._variants[precision] = model
            return self._variants[precision]

    def decode_plan(self):
        """The ``DecodePlan`` of this artifact's layout and normaliser (built once)."""
        with self._lock:
            if self._plan is None:
                self._plan = DecodePlan.build(self.layout, self.normalizer)
            return self._plan


_CACHE: dict[tuple[str, str, str], LoadedGenerator] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def clear_generator_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def resolve_generator(reg, generator_ref: str | None = None):
    """The ``ArtifactInfo`` of ``generator_ref`` (a DnD generator), or of the latest one."""
    if generator_ref is None:
        info = reg.latest_artifact(ARTIFACT_TYPE)
        if info is None:
            raise GeneratorError("no trained generator in this registry: run `registry train-generator` first")
        return info
    try:
        return reg.resolve_artifact(generator_ref, ARTIFACT_TYPE)
    except NotFound as err:
        detail = f": {err}" if "alias" in str(err) else ""
        raise GeneratorError(f"no generator matches {generator_ref}{detail} (list them with `registry generators`)") from None


def resolve_any_generator(reg, generator_ref: str | None = None):
    """The ``ArtifactInfo`` of ``generator_ref`` of any generator type this version can use (DnD or
    CVAE), or of the latest DnD generator when None."""
    if generator_ref is None:
        info = reg.latest_artifact(ARTIFACT_TYPE)
        if info is None:
            others = [a for a in reg.list_artifacts(GENERATOR_TYPE_PREFIX) if a.artifact_type in GENERATOR_TYPES]
            if others:
                newest = max(others, key=lambda a: (a.created_at, a.id))
                raise GeneratorError(f"no trained DnD generator in this registry: pass --generator REF "
                                     f"(e.g. {newest.ref}, a {newest.artifact_type})")
            raise GeneratorError("no trained generator in this registry: run `registry train-generator` first")
        return info
    try:
        info = reg.resolve_artifact(generator_ref, GENERATOR_TYPE_PREFIX)
    except NotFound as err:
        detail = f": {err}" if "alias" in str(err) else ""
        raise GeneratorError(f"no generator matches {generator_ref}{detail} (list them with `registry generators`)") from None
    if info.artifact_type not in GENERATOR_TYPES:
        raise GeneratorError(f"generator {info.ref} has type {info.artifact_type}, which this version cannot use "
                             f"(known: {', '.join(GENERATOR_TYPES)})")
    return info


def _checked_layout(info, expected_format: str):
    """The artifact's stored layout, after checking its format and its layout fingerprint."""
    from generator.tokenizer import LoraLayout

    meta, bad = info.meta, f"generator {info.ref} is unusable"
    if meta.get("format") != expected_format:
        raise GeneratorError(f"{bad}: unsupported format {meta.get('format')!r}")
    try:
        layout = LoraLayout.from_dict(meta["layout"])
    except (KeyError, TypeError, ValueError) as err:
        raise GeneratorLayoutError(f"{bad}: its stored layout is invalid ({err})") from None
    if layout.fingerprint != meta.get("layout_fingerprint"):
        raise GeneratorLayoutError(f"{bad}: layout {layout.fingerprint[:12]} does not match the recorded "
                                   f"fingerprint {str(meta.get('layout_fingerprint'))[:12]}")
    return layout


def _load_prefixed(model, tensors: Mapping, prefix: str, info, what: str) -> None:
    """Load the artifact tensors under ``prefix`` into ``model``; a shape mismatch is a layout error."""
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise GeneratorLayoutError(f"generator {info.ref} is unusable: {what} weights do not fit its config "
                                   f"({first[1].strip() if len(first) > 1 else first[0]})") from None


def _model_for_layout(info, build_model, check, layout, what: str):
    """Build the artifact's model from its stored config and check it fits the stored layout."""
    from generator.training import LayoutMismatch

    bad = f"generator {info.ref} is unusable"
    try:
        model = build_model()
        check(model, layout)
    except LayoutMismatch as err:
        raise GeneratorLayoutError(f"{bad}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise GeneratorError(f"{bad}: invalid {what} config ({err})") from None
    return model


def _build_generator(info, tensors: Mapping, device) -> LoadedGenerator:
    """Check the artifact's layout, decoder and normaliser agree, then build the decoder."""
    import torch

    from generator.dnd import DnDConfig, DnDDecoder
    from generator.tokenizer import TokenNormalizer
    from generator.training import check_layout

    meta = info.meta
    bad = f"generator {info.ref} is unusable"
    layout = _checked_layout(info, ARTIFACT_FORMAT)
    model = _model_for_layout(info, lambda: DnDDecoder(DnDConfig.from_dict(meta["config"])), check_layout,
                              layout, "decoder")
    _load_prefixed(model, tensors, DECODER_PREFIX, info, "decoder")
    normalizer = TokenNormalizer.from_state_dict(
        {k[len(NORMALIZER_PREFIX):]: v for k, v in tensors.items() if k.startswith(NORMALIZER_PREFIX)})
    T, h, w = layout.shape
    if (normalizer.std.shape != (T,) or normalizer.mean.shape not in ((T,), (T, h, w))
            or (normalizer.mask is not None and tuple(normalizer.mask.shape) != (T, h, w))):
        raise GeneratorLayoutError(f"{bad}: normaliser shapes do not match layout {layout.shape}")
    peft = meta.get("peft_config", {})
    if sorted(peft.get("target_modules") or []) != layout.target_modules:
        raise GeneratorLayoutError(f"{bad}: target_modules {peft.get('target_modules')} do not match the layout "
                                   f"{layout.target_modules}")
    if not peft.get("rank_pattern") and {m.rank for m in layout.modules} != {peft.get("r")}:
        raise GeneratorLayoutError(f"{bad}: r={peft.get('r')} does not match the layout's ranks")
    model = model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return LoadedGenerator(ref=info.ref, sha256=info.sha256, meta=meta, model=model, layout=layout,
                           normalizer=normalizer, device=torch.device(device))


def load_generator_artifact(reg, generator_ref=None, device=None) -> tuple[LoadedGenerator, bool]:
    """(generator, cache hit): decoded once per process per artifact (digest + metadata) and device.

    ``generator_ref`` is a REF (of a DnD or a CVAE generator), None (the latest DnD generator) or an
    already resolved ArtifactInfo.
    """
    from generator.training import resolve_device

    info = generator_ref if hasattr(generator_ref, "sha256") else resolve_any_generator(reg, generator_ref)
    device = resolve_device(device)
    # the metadata is part of the key: two artifacts can share their tensors (same blob) but differ in
    # their recorded layout, config or base, and each must be checked on its own
    key = (info.sha256, _sha256_json(info.meta), str(device))
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached, True
    tensors, info = reg.load_artifact(info.ref, info.artifact_type)
    if info.artifact_type == CVAE_ARTIFACT_TYPE:
        from generator.cvae_service import _build_cvae as build
    else:
        build = _build_generator
    loaded = build(info, tensors, device)
    with _CACHE_LOCK:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = loaded
    return loaded, False


# -----------------------------------------------------------------------------
# generation


def _clean_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    cleaned = [p.strip() for p in prompts if isinstance(p, str)]
    if not cleaned:
        raise GeneratorError("no prompts given: a generator needs at least one prompt")
    if len(cleaned) != len(list(prompts)) or any(not p for p in cleaned):
        raise GeneratorError("prompts must be non-empty strings")
    return cleaned


def _check_base(loaded_meta: Mapping, generator_ref: str, base_model: str | None) -> None:
    if base_model is None:
        return
    from registry import base_models

    wanted = base_models.base_model_id(base_model)
    if wanted != loaded_meta.get("base_model"):
        raise GeneratorError(f"generator {generator_ref} was trained for base model {loaded_meta.get('base_model')}, "
                             f"not {wanted}")


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def _encoder_for(reg, meta: Mapping, device):
    """The generator's prompt encoder (``registry.embeddings.load_prompt_encoder``: cached per process,
    shared with the registry's own when it is the same model)."""
    from registry.embeddings import EncoderNotFound, encoder_id, load_prompt_encoder

    name = reg.encoder if encoder_id(reg.encoder) == meta.get("encoder") else meta.get("encoder")
    try:
        return load_prompt_encoder(name, None if device.type == "cpu" else str(device))
    except EncoderNotFound as err:
        raise GeneratorError(f"the generator's prompt encoder is not available: {err}") from None


def _embed_prompts(encoder, prompts: list[str], prompt_tokens: int, precision: str = "fp32"):
    """One encoder pass: the condition (P, L, C) (the last hidden state cut or zero-padded to L tokens)
    and the normalised sentence embeddings (P, C) (in fp32 the vectors ``embed_texts`` computes)."""
    return encoder.encode(prompts, tokens=prompt_tokens, precision=precision)


def generator_peft_config(meta: Mapping) -> dict:
    """The ``adapter_config.json`` fields of the adapters a generator (DnD or CVAE) writes."""
    return {**meta["peft_config"], "peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
            "bias": "none", "base_model_name_or_path": meta["base_model"]}


def resolve_precision(precision: str | None, device) -> str:
    """``registry.precision.resolve`` with its error as a ``GeneratorError`` (one line)."""
    from registry.precision import PrecisionError, resolve

    try:
        return resolve(precision, device)
    except PrecisionError as err:
        raise GeneratorError(str(err)) from None


@dataclass
class DecodePlan:
    """Normalised tokens (T, h, w) -> the PEFT state dict in one gather and one multiply-add.

    ``index`` lists, for every weight of the adapter in state-dict order (each A (r, in), then B
    (out, r), module by module), its position in the flattened grid; it is computed by running
    ``tokens_to_state_dict`` once on a grid of positions, so it is the tokenizer's own mapping.
    ``scale`` and ``shift`` are the normaliser's std and (masked) mean at those positions: the
    weights are ``tokens[index] * scale + shift``, which is ``denormalize`` + ``tokens_to_state_dict``
    without the intermediate grid and the per-module slicing.
    """

    index: object        # (P,) int32 positions in the flattened (T*h*w) grid
    scale: object        # (P,) float32
    shift: object        # (P,) float32
    keys: list
    shapes: list
    sizes: list

    @classmethod
    def build(cls, layout, normalizer) -> "DecodePlan":
        import torch

        from generator.tokenizer import tokens_to_state_dict

        T, h, w = layout.shape
        if T * h * w >= 2 ** 31:
            raise ValueError(f"token grid {layout.shape} is too large for int32 positions")
        positions = torch.arange(T * h * w, dtype=torch.int32).reshape(T, h, w)  # (T, h, w)
        mapped = tokens_to_state_dict(positions, layout, dtype=torch.int32)
        keys = list(mapped)
        index = torch.cat([mapped[k].reshape(-1) for k in keys])  # (P,)
        token = torch.div(index, h * w, rounding_mode="floor")    # (P,) the token each weight lies in
        scale = normalizer.std.float().index_select(0, token)
        mean = normalizer.mean.float()
        shift = mean.index_select(0, token) if mean.ndim == 1 else mean.reshape(-1).index_select(0, index)
        if normalizer.mask is not None:  # denormalize zeroes padding (real weights never are: a no-op here)
            shift = shift * normalizer.mask.reshape(-1).index_select(0, index)
        return cls(index=index, scale=scale, shift=shift, keys=keys,
                   shapes=[tuple(mapped[k].shape) for k in keys], sizes=[mapped[k].numel() for k in keys])

    def state_dict(self, tokens, dtype=None) -> dict:
        """Normalised tokens (T, h, w) -> {key: weight}; the weights share one buffer (views)."""
        import torch

        flat = tokens.detach().cpu().contiguous().reshape(-1)  # (T*h*w,) in the decoder's dtype
        values = torch.addcmul(self.shift, flat.index_select(0, self.index).float(), self.scale)  # (P,)
        if dtype is not None and dtype != values.dtype:
            values = values.to(dtype)
        return {key: part.view(shape) for key, part, shape in zip(self.keys, values.split(self.sizes), self.shapes)}


def _mean_decode(model, groups):
    """``model(groups).mean(dim=0)`` for condition groups (G, N, L, C) -> tokens (T, h, w), with the G
    groups averaged just before the last layer's ConvL instead of after it.

    Exact, not an approximation: the last layer ends in ConvL, a convolution (linear, no activation
    after the last layer), so the mean of its outputs is ConvL of the mean of its inputs; the largest
    convolution of the decoder (N -> T channels) then runs once instead of G times, and the mean is
    taken over a (G, N, h, w) tensor instead of (G, T, h, w). A test compares it with the plain forward.
    """
    from torch.nn import functional as F

    from generator.dnd import HyperConvLayer

    last = model.layers[-1]
    if groups.shape[0] == 1 or type(last) is not HyperConvLayer:
        return model(groups).mean(dim=0)
    if tuple(groups.shape[1:]) != model.config.input_shape:
        raise ValueError(f"condition {tuple(groups.shape[1:])} != expected {model.config.input_shape}")
    x = groups                                                     # (G, N, L, C)
    for layer in model.layers[:-1]:
        y = F.gelu(layer(x))                                       # (G, N', L', C')
        x = x + y if y.shape == x.shape else y
    h = last.norm(x)                                               # HyperConvLayer.forward up to ConvL
    c_w = last.height1(F.gelu(last.width1(h)))                     # (G, N, h, w)
    c_h = last.width2(F.gelu(last.height2(h)))                     # (G, N, h, w)
    mixed = ((c_w + c_h + last.bias) / 3).mean(dim=0, keepdim=True)  # (1, N, h, w)
    y = last.layer(mixed)[0]                                       # (T, h, w)
    return x.mean(dim=0) + y if y.shape == x.shape[1:] else y      # the residual case: mean(x) + ConvL


def _generate(reg, prompts: list[str], generator_ref, base_model, device, pooled: bool, precision: str | None = None):
    import torch

    from generator.training import check_layout, group_prompts
    from registry.precision import autocast

    start = time.perf_counter()
    info = generator_ref if hasattr(generator_ref, "sha256") else resolve_generator(reg, generator_ref)
    _check_base(info.meta, info.ref, base_model)
    loaded, cached = load_generator_artifact(reg, info, device)
    meta = loaded.meta
    precision = resolve_precision(precision, loaded.device)
    model = loaded.model_for(precision)
    plan = loaded.decode_plan()
    check_layout(loaded.model, loaded.layout)
    t_loaded = time.perf_counter()

    encoder = _encoder_for(reg, meta, loaded.device)
    t_encoder = time.perf_counter()
    condition, vectors = _embed_prompts(encoder, prompts, int(meta["prompt_tokens"]), precision)  # (P, L, C)
    _sync(loaded.device)
    t_embedded = time.perf_counter()

    dtype = getattr(torch, str(meta.get("dtype", "float32")), torch.float32)
    with torch.inference_mode(), autocast(precision, loaded.device):
        groups = group_prompts(condition.to(loaded.device), model.config.n_prompts)  # (G, N, L, C)
        tokens = _mean_decode(model, groups)                                          # (T, h, w)
    state_dict = plan.state_dict(tokens, dtype)
    t_decoded = time.perf_counter()

    peft_config = generator_peft_config(meta)
    # the registry stores its own encoder's vectors; bf16 ones differ from fp32 by ~1e-5 in cosine
    vectors = vectors if pooled and meta.get("encoder") == reg.encoder_id else None
    timings = {"load_s": 0.0 if cached else t_loaded - start, "encoder_s": t_encoder - t_loaded,
               "embed_s": t_embedded - t_encoder, "decode_s": t_decoded - t_embedded,
               "total_s": t_decoded - start, "cached": cached, "generator": loaded.ref,
               "generator_digest": loaded.sha256, "device": str(loaded.device), "arch": "dnd",
               "precision": precision}
    return state_dict, peft_config, timings, vectors


def _generator_path(info):
    """The generation function of the artifact's type: ``_generate`` (DnD) or the CVAE's
    ``generator.cvae_service._generate_cvae``; both return (state dict, peft config, timings, vectors)."""
    if info.artifact_type == CVAE_ARTIFACT_TYPE:
        from generator.cvae_service import _generate_cvae

        return _generate_cvae
    return _generate


def generate_state_dict_for(reg, prompts: Sequence[str], generator_ref: str | None = None,
                            base_model: str | None = None, device=None,
                            precision: str | None = None) -> tuple[dict, dict, dict]:
    """Prompts -> (PEFT state dict, adapter_config dict, timings) without storing anything.

    ``generator_ref`` names a DnD or a CVAE generator (dispatched on its artifact type; None: the
    latest DnD generator). ``precision`` is ``auto`` (None: ``$REGISTRY_PRECISION`` or auto), ``fp32``
    or ``bf16`` (``registry.precision``): in bf16 the prompt encoder and the decoder run under bf16
    autocast with their frozen weights in bfloat16; the weights returned are float32 either way.
    timings: ``load_s`` (resolving + decoding the artifact, 0 on a cache hit), ``encoder_s`` (loading
    the prompt encoder, for a CVAE the base LLM; ~0 once loaded), ``embed_s`` (for a CVAE: the task
    vector), ``decode_s`` (decoder + de-tokenising), ``total_s``, ``cached``, ``generator`` (its ref),
    ``generator_digest``, ``device``, ``arch``, ``precision`` (the resolved one).
    """
    prompts = _clean_prompts(prompts)
    resolve_precision(precision, "cpu")  # an unknown name fails before anything is loaded
    info = resolve_any_generator(reg, generator_ref)
    generate = _generator_path(info)
    state_dict, peft_config, timings, _ = generate(reg, prompts, info, base_model, device, pooled=False,
                                                   precision=precision)
    return state_dict, peft_config, timings


def generate_adapter(reg, prompts: Sequence[str], name: str, generator_ref: str | None = None,
                     task: str | None = None, base_model: str | None = None, device=None,
                     timings: dict | None = None, tags: Sequence[str] = (), precision: str | None = None):
    """Prompts -> a new ``generated`` adapter version; returns its ``AdapterInfo``.

    ``generator_ref`` names a DnD or a CVAE generator (dispatched on its artifact type; None: the
    latest DnD generator); ``precision`` as in ``generate_state_dict_for``. The recipe records the
    generator (ref + digest + type + arch), the resolved precision and the prompts' sha256; the
    prompts are stored with the adapter (so it is searchable; for DnD their sentence embeddings come
    from the same encoder pass as the condition). Pass a dict as ``timings`` to receive the
    breakdown of ``generate_state_dict_for`` plus ``store_s``.
    """
    from registry.refs import validate_name

    validate_name(name)
    prompts = _clean_prompts(prompts)
    resolve_precision(precision, "cpu")  # an unknown name fails before anything is loaded
    info = resolve_any_generator(reg, generator_ref)
    generate = _generator_path(info)
    state_dict, peft_config, measured, vectors = generate(reg, prompts, info, base_model, device, pooled=True,
                                                          precision=precision)
    start = time.perf_counter()
    recipe = {"generator": measured["generator"], "generator_digest": measured["generator_digest"],
              "generator_type": info.artifact_type, "arch": measured["arch"], "precision": measured["precision"],
              "prompts_sha256": prompts_sha256(prompts), "n_prompts": len(prompts)}
    if measured.get("task_vector_sha256"):
        recipe["task_vector_sha256"] = measured["task_vector_sha256"]
    info = reg.add_weights(name, state_dict, peft_config, kind="generated", task=task, prompts=prompts,
                           prompt_embeddings=vectors, tags=tags, recipe=recipe, parents=[])
    measured["store_s"] = time.perf_counter() - start
    measured["total_s"] += measured["store_s"]
    if timings is not None:
        timings.update(measured)
    return info


# -----------------------------------------------------------------------------
# listing


def list_generators(reg) -> list:
    """All stored generator artifacts (every type ``generator-*``), oldest first."""
    return reg.list_artifacts("generator-")


# -----------------------------------------------------------------------------
# the CVAE's public names, re-exported from ``generator.cvae_service`` (imported on first use: that
# module imports this one)

_CVAE_EXPORTS = ("CVAE_ARTIFACT_FORMAT", "CVAE_SERVICE_VERSION", "CVAE_PREFIX", "TASK_VECTOR_PREFIX",
                 "DEFAULT_CVAE_BATCH_SIZE", "CVAE_OPTIONS", "CVAE_TRAINING_OPTIONS", "cvae_code_version",
                 "task_vector_cache", "train_cvae_from_registry", "regenerate_task", "regenerate_adapter")


def __getattr__(name: str):
    if name in _CVAE_EXPORTS:
        from generator import cvae_service

        value = getattr(cvae_service, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
