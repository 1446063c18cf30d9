"""ICM-LoRA's conditional VAE (seed 003; ``generator.cvae``) as a registry generator.

    from generator.cvae_service import regenerate_task, train_cvae_from_registry
    from generator.service import generate_adapter

    artifact = train_cvae_from_registry(reg, exclude_tasks=["held_out"], steps=2000)
    info = generate_adapter(reg, prompts, name="held-out-cvae", generator_ref=artifact.ref)
    state_dict = regenerate_task(reg, artifact.ref, "add_sub")

The CVAE is the second ``GeneratorBackend`` (``generator.backend``; ``CVAE`` below) behind the doors of
``generator.service``, sharing the training set, work folder and artifact loading with DnD: ``train_generator_from_registry(arch="cvae")`` calls ``train_cvae_from_registry``, which
trains on the same training set, conditioned on per-task *task vectors* from the base model
(``generator.task_vector``, cached under ``<home>/work/task-vectors/``), resumably, into an artifact
of type ``generator-cvae`` (``cvae.*`` weights, ``normalizer.*``, ``task_vector.<task>`` for every
training task). ``generate_adapter`` / ``generate_state_dict_for`` dispatch on the artifact's type
to ``generate_cvae`` (prompts -> the base's task vector -> decode z = 0), and
``load_generator_artifact`` to ``build_cvae``; ``regenerate_task`` re-creates a training task's
adapter from its stored vector, with neither the base model nor a prompt.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from generator.artifacts import (CVAE_ARTIFACT_TYPE, NORMALIZER_PREFIX, LoadedGenerator, check_normalizer,
                                 check_peft_layout,
                                 checked_layout, frozen, generator_peft_config, load_cached, load_prefixed,
                                 model_for_layout, resolve_any_generator)
from generator.backend import FunctionBackend, check_base, resolve_precision, sync_device
from generator.dnd_service import DEFAULT_LR, DEFAULT_SAVE_EVERY, DEFAULT_STEPS
from generator.errors import GeneratorError, GeneratorLayoutError
from generator.trainset import TrainingSet, collect_training_set, token_grids
from generator.workdir import WorkDir, sha256_json, source_version, train_and_store, training_meta
from registry.errors import RegistryError
from registry.precision import identity as precision_identity

# The artifact's format, code version and tensor-name prefixes (its type, ``CVAE_ARTIFACT_TYPE``, is
# ``generator.artifacts``'s, which ``generator.service`` dispatches on).
CVAE_ARTIFACT_FORMAT = "cvae-generator-artifact/1"
CVAE_SERVICE_VERSION = "cvae-service/3"  # part of the resume fingerprint: unchanged, old work dirs resume
CVAE_PREFIX = "cvae."
TASK_VECTOR_PREFIX = "task_vector."
# CVAE defaults (``generator.cvae``: one step at batch 4 takes ~0.55 s on 2 CPU threads at SmolLM2 size).
DEFAULT_CVAE_BATCH_SIZE = 4
# The default basis has one direction per training task, at most this many (K * D weights, trained with
# AdamW: ~2.5 GB of training memory at K = 64 for SmolLM2 r=8; past it tasks share directions).
MAX_DEFAULT_BASIS_DIM = 64
# Options of ``train_cvae_from_registry(**config)``: CVAE shape and training settings.
CVAE_OPTIONS = ("latent_dim", "strides", "channels", "positions", "flat_channels", "cond_embed", "basis_dim",
                "coefficient_hidden")
CVAE_TRAINING_OPTIONS = ("chunk_width", "center", "seed", "weight_decay", "grad_clip", "save_every", "base_model",
                         "kl_weight", "max_length", "precision")
CVAE_SOURCE_FILES = ("tokenizer.py", "cvae.py", "cvae_training.py", "task_vector.py", "training.py", "cvae_service.py")


# -----------------------------------------------------------------------------
# training


def cvae_code_version() -> str:
    """``CVAE_SERVICE_VERSION`` plus a hash of the CVAE path's source files (recorded, not fingerprinted)."""
    return source_version(CVAE_SERVICE_VERSION, CVAE_SOURCE_FILES)


@dataclass(frozen=True)
class CVAESettings:
    """How a CVAE trains, validated once (``from_options``); the types the old option dict kept are
    kept (``lr``, ``grad_clip``), so the fingerprint of a call is unchanged."""

    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_CVAE_BATCH_SIZE
    seed: int = 0
    center: str = "element"
    kl_weight: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    max_length: int = 512
    save_every: int = DEFAULT_SAVE_EVERY
    chunk_width: int | None = None
    base_model: str | None = None
    precision: str | None = None

    @classmethod
    def from_options(cls, steps: int, lr: float, batch_size: int, options: Mapping) -> tuple["CVAESettings", dict]:
        """(settings, CVAE model options); options set to None take their defaults, unknown ones are refused."""
        from generator.cvae import DEFAULT_KL_WEIGHT
        from generator.task_vector import DEFAULT_MAX_LENGTH

        if steps < 1 or batch_size < 1 or lr <= 0:
            raise GeneratorError("steps and batch size must be >= 1 and lr > 0")
        unknown = sorted(set(options) - set(CVAE_OPTIONS) - set(CVAE_TRAINING_OPTIONS))
        if unknown:
            raise GeneratorError(f"unknown CVAE option(s): {', '.join(unknown)}")
        model = {k: options[k] for k in CVAE_OPTIONS if options.get(k) is not None}
        given = {k: options[k] for k in CVAE_TRAINING_OPTIONS if options.get(k) is not None}
        settings = cls(lr=lr, batch_size=batch_size, seed=int(given.get("seed", 0)),
                       center=given.get("center", "element"), kl_weight=float(given.get("kl_weight", DEFAULT_KL_WEIGHT)),
                       weight_decay=float(given.get("weight_decay", 0.0)), grad_clip=given.get("grad_clip", 1.0),
                       max_length=int(given.get("max_length", DEFAULT_MAX_LENGTH)),
                       save_every=max(1, int(given.get("save_every", DEFAULT_SAVE_EVERY))),
                       chunk_width=given.get("chunk_width"), base_model=given.get("base_model"),
                       precision=given.get("precision"))
        if settings.kl_weight < 0 or settings.max_length < 1:
            raise GeneratorError("kl_weight must be >= 0 and max_length >= 1")
        return settings, model

    def fingerprint_fields(self) -> dict:
        """The canonical form in the resume fingerprint and the artifact's ``training`` record."""
        return {"lr": self.lr, "batch_size": self.batch_size, "seed": self.seed, "center": self.center,
                "kl_weight": self.kl_weight, "weight_decay": self.weight_decay, "grad_clip": self.grad_clip}


def cvae_fingerprint(data: TrainingSet, cvae_config: dict, base_identity: str, condition: dict,
                     settings: CVAESettings, name: str, precision: str) -> str:
    """The training's identity (its work folder): everything that changes the result but the steps."""
    return sha256_json({"arch": "cvae", "adapters": [[a["ref"], a["digest"]] for a in data.adapters],
                        "prompts": data.prompts, "config": cvae_config, "base": base_identity,
                        "condition": condition, "training": settings.fingerprint_fields(), "name": name,
                        **precision_identity(precision), "code": CVAE_SERVICE_VERSION})


def task_vector_cache(reg):
    """The registry's task-vector cache: ``<home>/work/task-vectors/<key>.safetensors``."""
    from generator.task_vector import TaskVectorCache

    return TaskVectorCache(reg.home / "work" / "task-vectors")


def _load_base_for(base_id: str, base_fingerprint: str | None, device) -> tuple:
    """(model, tokenizer) of the base a CVAE conditions on, refusing one whose architecture changed."""
    from registry import base_models

    try:
        model, tokenizer = base_models.load_base(base_id, device=str(device))
    except RegistryError as err:
        raise GeneratorError(f"the base model {base_id} is not available for task vectors: {err}") from None
    found = base_models.base_fingerprint(model.config)
    if base_fingerprint and found != base_fingerprint:
        raise GeneratorError(f"the base model at {base_id} has architecture {found[:12]}, the adapters were "
                             f"trained on {base_fingerprint[:12]}")
    return model, tokenizer


def _vector_digest(vector) -> str:
    return hashlib.sha256(vector.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def train_cvae_from_registry(
    reg, name: str = "cvae", tasks: Sequence[str] | None = None, exclude_tasks: Sequence[str] = (),
    steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, batch_size: int = DEFAULT_CVAE_BATCH_SIZE,
    device: str | None = None, on_step: Callable[[int, int, float], bool | None] | None = None,
    resume: bool = True, on_status: Callable[[str], None] | None = None, **config,
):
    """Train an ICM-LoRA CVAE on the registry's harvested adapters and store it as an artifact.

    Same training set as DnD (``collect_training_set``). The condition of every checkpoint of a
    task is the task's vector: the base model's (``load_base(training_set.base_model)``) last-layer
    hidden state at the last prompt token, averaged over the task's stored prompts
    (``generator.task_vector``; cached under ``<home>/work/task-vectors/``). The artifact (type
    ``generator-cvae``) holds the CVAE (``cvae.*``, its condition standardisation included), the
    normaliser's mean and std (``normalizer.*``; the mask is the layout's and is rebuilt on load)
    and every training task's vector (``task_vector.<task>``), so any task it was trained on can be
    regenerated (``regenerate_task``) without the base model.

    ``config`` takes CVAE options (``latent_dim`` Z = 256, ``strides``, ``channels``,
    ``positions`` = 512, ``flat_channels`` = 4, ``cond_embed`` = 128, ``basis_dim`` K = the number
    of training tasks up to 64, 0 for the paper's conv-only decoder, ``coefficient_hidden`` = 256; see
    ``generator.cvae``) and
    training options (``chunk_width``, ``center`` = "element", ``seed`` = 0, ``weight_decay`` = 0,
    ``grad_clip`` = 1, ``save_every`` = 100, ``base_model``, ``kl_weight`` = 1e-3,
    ``max_length`` = 512 prompt tokens for the task vector). Resumable, ``on_step`` and ``resume``
    exactly as ``train_generator_from_registry``. Returns the stored ``ArtifactInfo``.
    """
    import torch

    from generator.cvae import CVAEConfig, LoraCVAE
    from generator.cvae_training import CVAEDataset, train_cvae
    from generator.task_vector import TASK_VECTOR_FORMAT, model_identity, task_vector
    from generator.tokenizer import TokenNormalizer, token_mask
    from generator.training import resolve_device
    from registry.refs import validate_name

    status = on_status or (lambda message: None)
    validate_name(name)
    settings, model_options = CVAESettings.from_options(steps, lr, batch_size, config)
    seed, save_every, kl_weight, max_length = settings.seed, settings.save_every, settings.kl_weight, settings.max_length

    status("collecting harvested adapters")
    data = collect_training_set(reg, tasks, exclude_tasks, base_model=settings.base_model)
    device = resolve_device(device)
    precision = resolve_precision(settings.precision, device)  # the training forward's autocast
    status(f"loading the base model {data.base_model}")
    base, tokenizer = _load_base_for(data.base_model, data.base_fingerprint, device)
    base_identity = model_identity(base)
    cache = task_vector_cache(reg)
    vectors, t_vectors = {}, time.perf_counter()
    for i, task in enumerate(data.tasks):
        status(f"task vectors {i + 1}/{len(data.tasks)}: {task}")
        vectors[task] = task_vector(base, tokenizer, data.prompts[task], max_length=max_length, cache=cache,
                                    base_id=base_identity)  # (H,)
    task_vector_s = time.perf_counter() - t_vectors
    hidden = int(next(iter(vectors.values())).shape[0])

    try:
        layout, grids, checkpoints_per_task = token_grids(data, settings.chunk_width)  # task -> (K, T, h, w)
        # one basis direction per training task by default (enough to place each task's adapter), capped
        model_options.setdefault("basis_dim", min(len(data.tasks), MAX_DEFAULT_BASIS_DIM))
        cvae_config = CVAEConfig.from_layout(layout, cond_dim=hidden, **model_options)
        mask = token_mask(layout)
        normalizer = TokenNormalizer.fit(list(grids.values()), mask, center=settings.center)
        dataset = CVAEDataset.from_grids(grids, vectors, normalizer, mask)
    except (ValueError, TypeError) as err:
        raise GeneratorError(f"cannot build a CVAE for these adapters: {err}") from None
    del grids

    condition = {"format": TASK_VECTOR_FORMAT, "max_length": max_length, "chat": True, "hidden_size": hidden}
    fingerprint = cvae_fingerprint(data, cvae_config.to_dict(), base_identity, condition, settings, name, precision)
    def store(model, state, wall_time: float, resumed_from: int) -> tuple[dict, dict]:
        meta = {
            "format": CVAE_ARTIFACT_FORMAT,
            "arch": "cvae",
            "code_version": cvae_code_version(),
            "config": cvae_config.to_dict(),
            **training_meta(data, layout, exclude_tasks, checkpoints_per_task, state, {
                **settings.fingerprint_fields(), "steps": steps, "save_every": save_every, "resumed_from": resumed_from,
                "device": str(device), "fingerprint": fingerprint, "precision": precision}),
            "base_identity": base_identity,
            "condition": condition,
            "task_vector_sha256": {t: _vector_digest(v) for t, v in vectors.items()},
            "wall_time_s": round(wall_time, 3),
            "task_vector_s": round(task_vector_s, 3),
            "cvae_parameters": model.num_parameters(),
        }
        model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if "basis" in model_state:  # K * D dominates the artifact: stored in float16, widened on load
            model_state["basis"] = model_state["basis"].to(torch.float16)
        tensors = {f"{CVAE_PREFIX}{k}": v for k, v in model_state.items()}
        tensors[f"{NORMALIZER_PREFIX}mean"] = normalizer.mean.contiguous()
        tensors[f"{NORMALIZER_PREFIX}std"] = normalizer.std.contiguous()
        tensors |= {f"{TASK_VECTOR_PREFIX}{t}": v.float().contiguous() for t, v in vectors.items()}
        return tensors, meta

    return train_and_store(
        reg, WorkDir(reg.home / "work" / "generators" / fingerprint[:24]), artifact_type=CVAE_ARTIFACT_TYPE,
        steps=steps, resume=resume, status=status, build_model=lambda: LoraCVAE(cvae_config), seed=seed,
        device=device, save_every=save_every, on_step=on_step,
        record={"fingerprint": fingerprint, "name": name, "arch": "cvae", "base_model": data.base_model},
        store=store, train_chunk=lambda model, state, target, on_chunk_step: train_cvae(
            model, dataset, steps=target, lr=lr, batch_size=batch_size, device=device, on_step=on_chunk_step,
            state=state, seed=seed, kl_weight=kl_weight, weight_decay=settings.weight_decay,
            grad_clip=settings.grad_clip, precision=precision))


# -----------------------------------------------------------------------------
# loading a stored CVAE (``generator.service.load_generator_artifact`` dispatches here)


def build_cvae(info, tensors: Mapping, device) -> LoadedGenerator:
    """Check the CVAE artifact's layout, model, normaliser and task vectors agree, then build it."""
    import torch

    from generator.cvae import CVAEConfig, LoraCVAE
    from generator.cvae_training import check_cvae_layout
    from generator.tokenizer import TokenNormalizer, token_mask

    meta = info.meta
    bad = f"generator {info.ref} is unusable"
    layout = checked_layout(info, CVAE_ARTIFACT_FORMAT)
    model = model_for_layout(info, lambda: LoraCVAE(CVAEConfig.from_dict(meta["config"])), check_cvae_layout,
                              layout, "CVAE")
    config = model.config
    load_prefixed(model, tensors, CVAE_PREFIX, info, "CVAE")
    mask = token_mask(layout)
    try:
        normalizer = TokenNormalizer(tensors[f"{NORMALIZER_PREFIX}mean"], tensors[f"{NORMALIZER_PREFIX}std"], mask)
    except KeyError as err:
        raise GeneratorLayoutError(f"{bad}: normaliser tensor {err} missing") from None
    check_normalizer(info, normalizer, layout)
    vectors = {k[len(TASK_VECTOR_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(TASK_VECTOR_PREFIX)}
    if sorted(vectors) != sorted(meta.get("tasks", [])):
        raise GeneratorError(f"{bad}: stored task vectors ({', '.join(sorted(vectors))}) do not match its tasks "
                             f"({', '.join(meta.get('tasks', []))})")
    if any(tuple(v.shape) != (config.cond_dim,) for v in vectors.values()):
        raise GeneratorLayoutError(f"{bad}: task vectors are not of size {config.cond_dim}")
    check_peft_layout(info, layout)
    model = frozen(model, device)
    return LoadedGenerator(ref=info.ref, sha256=info.sha256, meta=meta, model=model, layout=layout,
                           normalizer=normalizer, device=torch.device(device), task_vectors=vectors, arch="cvae")


# -----------------------------------------------------------------------------
# generating (``generate_adapter`` dispatches here) and regenerating


def _decode_cvae(loaded: LoadedGenerator, vector, precision: str = "fp32") -> dict:
    """Decode z = 0 for a task vector; in ``bf16`` under autocast with the CVAE's frozen conv/linear
    weights in bfloat16 (``LoadedGenerator.model_for``); the weights returned are float32 (or the
    artifact's dtype) either way."""
    import torch

    from generator.cvae_training import generate_cvae_state_dict
    from registry.precision import autocast

    dtype = getattr(torch, str(loaded.meta.get("dtype", "float32")), torch.float32)
    with torch.inference_mode(), autocast(precision, loaded.device):
        return generate_cvae_state_dict(loaded.model_for(precision), vector.to(loaded.device), loaded.normalizer,
                                        loaded.layout, dtype=dtype)


def generate_cvae(reg, prompts: list[str], info, base_model, device, pooled: bool, precision: str | None = None):
    """The CVAE path of ``generate_state_dict_for`` / ``generate_adapter``: prompts -> the base's task
    vector -> decode z = 0. Returns (state dict, peft config, timings, None). ``precision`` applies to
    the decoding; the task vector is the base model's in fp32 (it is cached per prompts, so one
    prompt set always gives one vector)."""
    from generator.task_vector import task_vector

    start = time.perf_counter()
    check_base(info.meta, info.ref, base_model)
    loaded, cached = _load(reg, info, device)
    meta = loaded.meta
    precision = resolve_precision(precision, loaded.device)
    t_loaded = time.perf_counter()

    base, tokenizer = _load_base_for(meta["base_model"], meta.get("base_fingerprint"), loaded.device)
    hidden = getattr(base.config, "hidden_size", None)
    if hidden is not None and int(hidden) != loaded.model.config.cond_dim:
        raise GeneratorError(f"the base model {meta['base_model']} has hidden size {hidden}, generator "
                             f"{loaded.ref} takes task vectors of size {loaded.model.config.cond_dim}")
    t_base = time.perf_counter()
    condition = meta.get("condition", {})
    vector = task_vector(base, tokenizer, prompts, max_length=condition.get("max_length", 512),
                         cache=task_vector_cache(reg))  # (H,)
    sync_device(loaded.device)
    t_vector = time.perf_counter()
    state_dict = _decode_cvae(loaded, vector, precision)
    t_decoded = time.perf_counter()
    timings = {"load_s": 0.0 if cached else t_loaded - start, "encoder_s": t_base - t_loaded,
               "embed_s": t_vector - t_base, "decode_s": t_decoded - t_vector, "total_s": t_decoded - start,
               "cached": cached, "generator": loaded.ref, "generator_digest": loaded.sha256,
               "device": str(loaded.device), "arch": "cvae", "precision": precision,
               "task_vector_sha256": _vector_digest(vector)}
    return state_dict, generator_peft_config(meta), timings, None


def _load(reg, info, device) -> tuple[LoadedGenerator, bool]:
    from generator.training import resolve_device

    return load_cached(reg, info, resolve_device(device), build_cvae)


def _resolve_cvae(reg, generator_ref):
    if generator_ref is None:
        info = reg.latest_artifact(CVAE_ARTIFACT_TYPE)
        if info is None:
            raise GeneratorError("no trained CVAE generator in this registry: "
                                 "run `registry train-generator --arch cvae`")
        return info
    info = generator_ref if hasattr(generator_ref, "sha256") else resolve_any_generator(reg, generator_ref)
    if info.artifact_type != CVAE_ARTIFACT_TYPE:
        raise GeneratorError(f"generator {info.ref} is a {info.artifact_type}: regenerating a stored task needs a "
                             f"{CVAE_ARTIFACT_TYPE}")
    return info


def regenerate_task(reg, generator_ref: str | None, task: str, device=None, precision: str | None = None) -> dict:
    """The PEFT state dict a CVAE generator decodes (z = 0) from its stored vector of ``task``.

    Needs neither the base model nor any prompt: the storage story (one generator in place of the
    adapters it was trained on). ``generator_peft_config(info.meta)`` gives the matching config.
    ``precision`` (``auto`` when None, ``fp32``, ``bf16``) is the decoding's, as in ``generate_adapter``.
    """

    info = _resolve_cvae(reg, generator_ref)
    loaded, _ = _load(reg, info, device)
    if task not in loaded.task_vectors:
        raise GeneratorError(f"generator {loaded.ref} was not trained on task {task!r} "
                             f"(its tasks: {', '.join(sorted(loaded.task_vectors))})")
    return _decode_cvae(loaded, loaded.task_vectors[task], resolve_precision(precision, loaded.device))


def regenerate_adapter(reg, generator_ref: str | None, task: str, name: str, device=None,
                       tags: Sequence[str] = (), precision: str | None = None):
    """``regenerate_task`` stored as a new ``generated`` adapter version (task recorded; the recipe
    names the generator, its digest, the stored task vector's sha256 and the resolved precision).
    Returns its ``AdapterInfo``."""
    from registry.refs import validate_name

    validate_name(name)
    info = _resolve_cvae(reg, generator_ref)
    loaded, _ = _load(reg, info, device)
    precision = resolve_precision(precision, loaded.device)
    state_dict = regenerate_task(reg, info, task, device, precision)
    recipe = {"generator": info.ref, "generator_digest": info.sha256, "generator_type": CVAE_ARTIFACT_TYPE,
              "arch": "cvae", "regenerated_task": task, "precision": precision,
              "task_vector_sha256": _vector_digest(loaded.task_vectors[task])}
    return reg.add_weights(name, state_dict, generator_peft_config(info.meta), kind="generated", task=task,
                           tags=tags, recipe=recipe, parents=[])


# ICM-LoRA's CVAE behind the ``GeneratorBackend`` interface (``generator.backend``)
CVAE = FunctionBackend("cvae", CVAE_ARTIFACT_TYPE, DEFAULT_CVAE_BATCH_SIZE, train_cvae_from_registry, build_cvae,
                       generate_cvae, accepts_n_prompts=False)
