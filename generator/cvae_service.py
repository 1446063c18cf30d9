"""ICM-LoRA's conditional VAE (seed 003; ``generator.cvae``) as a registry generator.

    from generator.cvae_service import regenerate_task, train_cvae_from_registry
    from generator.service import generate_adapter

    artifact = train_cvae_from_registry(reg, exclude_tasks=["held_out"], steps=2000)
    info = generate_adapter(reg, prompts, name="held-out-cvae", generator_ref=artifact.ref)
    state_dict = regenerate_task(reg, artifact.ref, "add_sub")

The CVAE goes through the same doors as DnD (``generator.service``, which holds everything both
share): ``train_generator_from_registry(arch="cvae")`` calls ``train_cvae_from_registry``, which
trains on the same training set, conditioned on per-task *task vectors* from the base model
(``generator.task_vector``, cached under ``<home>/work/task-vectors/``), resumably, into an artifact
of type ``generator-cvae`` (``cvae.*`` weights, ``normalizer.*``, ``task_vector.<task>`` for every
training task). ``generate_adapter`` / ``generate_state_dict_for`` dispatch on the artifact's type
to ``_generate_cvae`` (prompts -> the base's task vector -> decode z = 0), and
``load_generator_artifact`` to ``_build_cvae``; ``regenerate_task`` re-creates a training task's
adapter from its stored vector, with neither the base model nor a prompt.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from generator.service import (CVAE_ARTIFACT_TYPE, DEFAULT_LR, DEFAULT_SAVE_EVERY, DEFAULT_STEPS, NORMALIZER_PREFIX,
                               GeneratorError, GeneratorLayoutError, LoadedGenerator, _check_base,
                               _checked_layout, _load_prefixed, _model_and_state, _model_for_layout, _sha256_json,
                               _stored_artifact, _sync, _WorkDir, collect_training_set, generator_peft_config,
                               load_generator_artifact, resolve_any_generator, resolve_precision, run_chunked_training,
                               training_meta)
from registry.errors import RegistryError
from registry.precision import identity as precision_identity

# The artifact's format, code version and tensor-name prefixes (its type, ``CVAE_ARTIFACT_TYPE``, is
# ``generator.service``'s, which dispatches on it).
CVAE_ARTIFACT_FORMAT = "cvae-generator-artifact/1"
CVAE_SERVICE_VERSION = "cvae-service/3"
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


# -----------------------------------------------------------------------------
# training


def cvae_code_version() -> str:
    """``CVAE_SERVICE_VERSION`` plus a hash of the CVAE path's source files."""
    digest = hashlib.sha256()
    folder = Path(__file__).resolve().parent
    for module in ("tokenizer.py", "cvae.py", "task_vector.py", "training.py", "service.py", "cvae_service.py"):
        path = folder / module
        if path.exists():
            digest.update(path.read_bytes())
    return f"{CVAE_SERVICE_VERSION}+{digest.hexdigest()[:12]}"


def _split_cvae_config(config: Mapping) -> tuple[dict, dict]:
    unknown = sorted(set(config) - set(CVAE_OPTIONS) - set(CVAE_TRAINING_OPTIONS))
    if unknown:
        raise GeneratorError(f"unknown CVAE option(s): {', '.join(unknown)}")
    model = {k: config[k] for k in CVAE_OPTIONS if config.get(k) is not None}
    training = {k: config[k] for k in CVAE_TRAINING_OPTIONS if config.get(k) is not None}
    return model, training


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

    from generator.cvae import DEFAULT_KL_WEIGHT, CVAEConfig, LoraCVAE
    from generator.cvae_training import CVAEDataset, train_cvae
    from generator.task_vector import DEFAULT_MAX_LENGTH, TASK_VECTOR_FORMAT, model_identity, task_vector
    from generator.tokenizer import TokenNormalizer, layout_from_state_dict, stack_token_grids, token_mask
    from generator.training import resolve_device
    from registry.refs import validate_name

    status = on_status or (lambda message: None)
    validate_name(name)
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise GeneratorError("steps and batch size must be >= 1 and lr > 0")
    model_options, training_options = _split_cvae_config(config)
    seed = int(training_options.get("seed", 0))
    save_every = max(1, int(training_options.get("save_every", DEFAULT_SAVE_EVERY)))
    center = training_options.get("center", "element")
    weight_decay = float(training_options.get("weight_decay", 0.0))
    grad_clip = training_options.get("grad_clip", 1.0)
    kl_weight = float(training_options.get("kl_weight", DEFAULT_KL_WEIGHT))
    max_length = int(training_options.get("max_length", DEFAULT_MAX_LENGTH))
    if kl_weight < 0 or max_length < 1:
        raise GeneratorError("kl_weight must be >= 0 and max_length >= 1")

    status("collecting harvested adapters")
    data = collect_training_set(reg, tasks, exclude_tasks, base_model=training_options.get("base_model"))
    device = resolve_device(device)
    precision = resolve_precision(training_options.get("precision"), device)  # the training forward's autocast
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

    first = next(iter(data.checkpoints.values()))[0]
    checkpoints_per_task = {t: len(v) for t, v in data.checkpoints.items()}
    try:
        layout = layout_from_state_dict(first, training_options.get("chunk_width"))
        grids = {}  # task -> (K, T, h, w); each task's state dicts are freed once tokenized
        for task in data.tasks:
            grids[task] = stack_token_grids(data.checkpoints[task], layout)
            data.checkpoints[task] = []
        # one basis direction per training task by default (enough to place each task's adapter), capped
        model_options.setdefault("basis_dim", min(len(data.tasks), MAX_DEFAULT_BASIS_DIM))
        cvae_config = CVAEConfig.from_layout(layout, cond_dim=hidden, **model_options)
        mask = token_mask(layout)
        normalizer = TokenNormalizer.fit(torch.cat(list(grids.values())), mask, center=center)
        dataset = CVAEDataset.from_grids(grids, vectors, normalizer, mask)
    except (ValueError, TypeError) as err:
        raise GeneratorError(f"cannot build a CVAE for these adapters: {err}") from None
    del grids

    settings = {"lr": lr, "batch_size": batch_size, "seed": seed, "center": center, "kl_weight": kl_weight,
                "weight_decay": weight_decay, "grad_clip": grad_clip}
    condition = {"format": TASK_VECTOR_FORMAT, "max_length": max_length, "chat": True, "hidden_size": hidden}
    fingerprint = _sha256_json({"arch": "cvae", "adapters": [[a["ref"], a["digest"]] for a in data.adapters],
                                "prompts": data.prompts, "config": cvae_config.to_dict(), "base": base_identity,
                                "condition": condition, "training": settings, "name": name,
                                **precision_identity(precision),
                                "code": CVAE_SERVICE_VERSION})
    work = _WorkDir(reg.home / "work" / "generators" / fingerprint[:24])
    with work.locked():
        if not resume:
            work.clear()
        info = _stored_artifact(reg, work, steps, CVAE_ARTIFACT_TYPE, status)
        if info is not None:
            return info
        model, state, record = _model_and_state(work, lambda: LoraCVAE(cvae_config), seed, steps)
        wall_before = float(record.get("wall_time_s", 0.0)) if record else 0.0
        resumed_from = state.step
        status(f"training on {device}" + (f", resuming at step {resumed_from}" if resumed_from else ""))

        model, state, wall_time = run_chunked_training(
            work, model, state, steps=steps, save_every=save_every, on_step=on_step, wall_before=wall_before,
            record={"fingerprint": fingerprint, "name": name, "arch": "cvae"},
            train_chunk=lambda model, state, target, on_chunk_step: train_cvae(
                model, dataset, steps=target, lr=lr, batch_size=batch_size, device=device, on_step=on_chunk_step,
                state=state, seed=seed, kl_weight=kl_weight, weight_decay=weight_decay, grad_clip=grad_clip,
                precision=precision))

        meta = {
            "format": CVAE_ARTIFACT_FORMAT,
            "arch": "cvae",
            "code_version": cvae_code_version(),
            "config": cvae_config.to_dict(),
            **training_meta(data, layout, exclude_tasks, checkpoints_per_task, state, {
                **settings, "steps": steps, "save_every": save_every, "resumed_from": resumed_from,
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
        status("storing the generator")
        info = reg.add_artifact(name, CVAE_ARTIFACT_TYPE, tensors, meta, base_model=data.base_model)
        work.mark_stored(info.ref, info.sha256, steps)
        return info


# -----------------------------------------------------------------------------
# loading a stored CVAE (``load_generator_artifact`` dispatches here)


def _build_cvae(info, tensors: Mapping, device) -> LoadedGenerator:
    """Check the CVAE artifact's layout, model, normaliser and task vectors agree, then build it."""
    import torch

    from generator.cvae import CVAEConfig, LoraCVAE
    from generator.cvae_training import check_cvae_layout
    from generator.tokenizer import TokenNormalizer, token_mask

    meta = info.meta
    bad = f"generator {info.ref} is unusable"
    layout = _checked_layout(info, CVAE_ARTIFACT_FORMAT)
    model = _model_for_layout(info, lambda: LoraCVAE(CVAEConfig.from_dict(meta["config"])), check_cvae_layout,
                              layout, "CVAE")
    config = model.config
    _load_prefixed(model, tensors, CVAE_PREFIX, info, "CVAE")
    mask = token_mask(layout)
    try:
        normalizer = TokenNormalizer(tensors[f"{NORMALIZER_PREFIX}mean"], tensors[f"{NORMALIZER_PREFIX}std"], mask)
    except KeyError as err:
        raise GeneratorLayoutError(f"{bad}: normaliser tensor {err} missing") from None
    T, h, w = layout.shape
    if normalizer.std.shape != (T,) or normalizer.mean.shape not in ((T,), (T, h, w)):
        raise GeneratorLayoutError(f"{bad}: normaliser shapes do not match layout {layout.shape}")
    vectors = {k[len(TASK_VECTOR_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(TASK_VECTOR_PREFIX)}
    if sorted(vectors) != sorted(meta.get("tasks", [])):
        raise GeneratorError(f"{bad}: stored task vectors ({', '.join(sorted(vectors))}) do not match its tasks "
                             f"({', '.join(meta.get('tasks', []))})")
    if any(tuple(v.shape) != (config.cond_dim,) for v in vectors.values()):
        raise GeneratorLayoutError(f"{bad}: task vectors are not of size {config.cond_dim}")
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


def _generate_cvae(reg, prompts: list[str], info, base_model, device, pooled: bool, precision: str | None = None):
    """The CVAE path of ``generate_state_dict_for`` / ``generate_adapter``: prompts -> the base's task
    vector -> decode z = 0. Returns (state dict, peft config, timings, None). ``precision`` applies to
    the decoding; the task vector is the base model's in fp32 (it is cached per prompts, so one
    prompt set always gives one vector)."""
    from generator.service import resolve_precision
    from generator.task_vector import task_vector

    start = time.perf_counter()
    _check_base(info.meta, info.ref, base_model)
    loaded, cached = load_generator_artifact(reg, info, device)
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
    _sync(loaded.device)
    t_vector = time.perf_counter()
    state_dict = _decode_cvae(loaded, vector, precision)
    t_decoded = time.perf_counter()
    timings = {"load_s": 0.0 if cached else t_loaded - start, "encoder_s": t_base - t_loaded,
               "embed_s": t_vector - t_base, "decode_s": t_decoded - t_vector, "total_s": t_decoded - start,
               "cached": cached, "generator": loaded.ref, "generator_digest": loaded.sha256,
               "device": str(loaded.device), "arch": "cvae", "precision": precision,
               "task_vector_sha256": _vector_digest(vector)}
    return state_dict, generator_peft_config(meta), timings, None


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
    from generator.service import resolve_precision

    info = _resolve_cvae(reg, generator_ref)
    loaded, _ = load_generator_artifact(reg, info, device)
    if task not in loaded.task_vectors:
        raise GeneratorError(f"generator {loaded.ref} was not trained on task {task!r} "
                             f"(its tasks: {', '.join(sorted(loaded.task_vectors))})")
    return _decode_cvae(loaded, loaded.task_vectors[task], resolve_precision(precision, loaded.device))


def regenerate_adapter(reg, generator_ref: str | None, task: str, name: str, device=None,
                       tags: Sequence[str] = (), precision: str | None = None):
    """``regenerate_task`` stored as a new ``generated`` adapter version (task recorded; the recipe
    names the generator, its digest, the stored task vector's sha256 and the resolved precision).
    Returns its ``AdapterInfo``."""
    from generator.service import resolve_precision
    from registry.refs import validate_name

    validate_name(name)
    info = _resolve_cvae(reg, generator_ref)
    loaded, _ = load_generator_artifact(reg, info, device)
    precision = resolve_precision(precision, loaded.device)
    state_dict = regenerate_task(reg, info, task, device, precision)
    recipe = {"generator": info.ref, "generator_digest": info.sha256, "generator_type": CVAE_ARTIFACT_TYPE,
              "arch": "cvae", "regenerated_task": task, "precision": precision,
              "task_vector_sha256": _vector_digest(loaded.task_vectors[task])}
    return reg.add_weights(name, state_dict, generator_peft_config(info.meta), kind="generated", task=task,
                           tags=tags, recipe=recipe, parents=[])

