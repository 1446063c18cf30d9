"""The generators as a registry service: the doors every caller uses, whatever the architecture.

    from registry import Registry
    from generator.service import train_generator_from_registry, generate_adapter

    reg = Registry.open()
    artifact = train_generator_from_registry(reg, exclude_tasks=["held_out"], steps=2000)
    info = generate_adapter(reg, prompts, name="held-out-dnd")    # a `generated` adapter

Each architecture is a ``GeneratorBackend`` (``generator.backend``: train, build, generate):
``generator.dnd_service.DND`` and ``generator.cvae_service.CVAE``. The doors dispatch on the
architecture (training) or on the stored artifact's type (loading, generating). What the backends
share has its own module: the training set (``generator.trainset``), the resumable work folder and
training loop (``generator.workdir``), finding and loading a stored generator
(``generator.artifacts``), the errors (``generator.errors``).

The generator packages read and write only through the ``Registry`` API, never print, and report
progress through callbacks. Every refusal is a one-line ``RegistryError`` subclass raised before
anything is written. The names callers import from here (errors, artifact types, the CVAE's
regenerate functions, the training set) are imported below.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from generator.artifacts import (ARTIFACT_TYPE, CVAE_ARTIFACT_TYPE, GENERATOR_TYPES,
                                 LoadedGenerator, clear_generator_cache, generator_peft_config, load_cached,
                                 resolve_any_generator, resolve_generator)
from generator.backend import GeneratorBackend, clean_prompts, resolve_precision
from generator.cvae_service import (CVAE, DEFAULT_CVAE_BATCH_SIZE, regenerate_adapter, regenerate_task,
                                    train_cvae_from_registry)
from generator.dnd_service import (DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_N_PROMPTS, DEFAULT_SAVE_EVERY,
                                   DEFAULT_STEPS, DND)
from generator.errors import GeneratorError, GeneratorLayoutError, TrainingStopped
from generator.sft_service import DEFAULT_TASKS_PER_STEP, SFT
from generator.trainset import TrainingSet, collect_training_set
from registry.prompts import prompts_sha256

__all__ = ["ARCHES", "ARTIFACT_TYPE", "BACKENDS", "CVAE_ARTIFACT_TYPE", "DEFAULT_BATCH_SIZE", "DEFAULT_CVAE_BATCH_SIZE",
           "DEFAULT_LR", "DEFAULT_SAVE_EVERY", "DEFAULT_STEPS", "GENERATOR_TYPES", "GeneratorError",
           "GeneratorLayoutError", "LoadedGenerator", "TrainingSet", "TrainingStopped", "backend_of",
           "clear_generator_cache", "collect_training_set", "generate_adapter", "generate_state_dict_for",
           "generator_peft_config", "list_generators", "load_generator_artifact", "prompts_sha256", "regenerate_adapter",
           "regenerate_task", "resolve_any_generator", "resolve_generator", "train_cvae_from_registry",
           "train_generator_from_registry"]

BACKENDS: dict[str, GeneratorBackend] = {backend.arch: backend for backend in (DND, CVAE, SFT)}
ARCHES = ("dnd", "cvae")  # the --arch names; the SFT-trained DnD is --arch dnd --objective sft
OBJECTIVES = ("recon", "sft", "both")  # both: sft + the reconstruction regulariser (DEFAULT_RECON_WEIGHT)
DEFAULT_RECON_WEIGHT = 0.1


def backend_of(info) -> GeneratorBackend:
    """The backend of a stored generator (by its artifact type)."""
    for backend in BACKENDS.values():
        if backend.artifact_type == info.artifact_type:
            return backend
    raise GeneratorError(f"generator {info.ref} has type {info.artifact_type}, which this version cannot use "
                         f"(known: {', '.join(GENERATOR_TYPES)})")


def train_generator_from_registry(
    reg, name: str | None = None, tasks: Sequence[str] | None = None, exclude_tasks: Sequence[str] = (),
    steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, batch_size: int | None = None,
    n_prompts: int = DEFAULT_N_PROMPTS, device: str | None = None,
    on_step: Callable[[int, int, float], bool | None] | None = None, resume: bool = True,
    on_status: Callable[[str], None] | None = None, arch: str = "dnd", objective: str = "recon", **config,
):
    """Train a generator (DnD by default) on the registry's harvested adapters and store it as an artifact.

    ``objective="sft"`` trains the DnD decoder through the frozen base model instead of onto
    harvested weights (``generator.sft_service.train_dnd_sft``; ``config`` then takes ``task_items``
    (task -> [(prompt, answer)]), ``anchor`` (a REF, e.g. the multitask LoRA) or ``retrieved_anchor_k``
    (the anchor is the fusion of the k nearest training adapters), ``items_per_task`` and
    the decoder options; ``batch_size`` is tasks per step); ``objective="both"`` adds the
    reconstruction regulariser (``recon_weight``, default ``DEFAULT_RECON_WEIGHT``) to it. ``arch="cvae"`` trains the ICM-LoRA CVAE instead (``train_cvae_from_registry``: ``n_prompts``
    is not used, ``config`` takes the CVAE's options); with ``objective="sft"`` that CVAE (``recon_steps``)
    is then fine-tuned through the base model for ``steps`` (``generator.cvae_sft.train_cvae_sft``); ``name`` defaults to the arch's name and
    ``batch_size`` to the arch's default (8 for DnD, 4 for the CVAE).

    ``config`` takes decoder options (``prompt_tokens`` L = 64, ``n_layers`` = 4, ``kernel`` = 5,
    ``hidden_tokens`` = 64, ``shapes``) and training options (``chunk_width``, ``center`` =
    "element", ``spread_weighting`` = False, ``seed`` = 0, ``weight_decay`` = 0, ``grad_clip`` = 1,
    ``save_every`` = 100, ``base_model``, ``precision`` = auto: the training forward's autocast,
    ``registry.precision``; recorded in the artifact): ``generator.dnd_service.DnDSettings``.
    ``on_step(step, steps, loss)`` runs after every step; returning False stops training (state
    saved, ``TrainingStopped`` raised). ``resume=False`` discards saved state and starts over.
    Returns the stored ``ArtifactInfo``.
    """
    if arch not in ARCHES:
        raise GeneratorError(f"unknown generator architecture {arch!r}: one of {', '.join(ARCHES)}")
    if objective not in OBJECTIVES or (objective == "both" and arch != "dnd"):
        raise GeneratorError(f"unknown objective {objective!r} for {arch}: "
                             + ("recon, sft or both" if arch == "dnd" else "recon or sft"))
    if arch == "cvae" and objective == "sft":
        from generator.cvae_sft import train_cvae_sft

        return train_cvae_sft(reg, name=name or "cvae-sft", tasks=tasks, exclude_tasks=exclude_tasks, steps=steps,
                              lr=lr, batch_size=DEFAULT_TASKS_PER_STEP if batch_size is None else batch_size,
                              n_prompts=n_prompts, device=device, on_step=on_step, resume=resume,
                              on_status=on_status, **config)
    if objective == "both":
        config.setdefault("recon_weight", DEFAULT_RECON_WEIGHT)
    elif "recon_weight" in config and objective != "sft":
        raise GeneratorError("a reconstruction weight applies to --objective both (or sft) only")
    backend = SFT if objective in ("sft", "both") else BACKENDS[arch]
    return backend.train(reg, name=name or (f"{arch}-{objective}" if objective != "recon" else arch), tasks=tasks,
                         exclude_tasks=exclude_tasks, steps=steps, lr=lr,
                         batch_size=backend.default_batch_size if batch_size is None else batch_size,
                         n_prompts=n_prompts, device=device, on_step=on_step, resume=resume, on_status=on_status,
                         **config)


def load_generator_artifact(reg, generator_ref=None, device=None) -> tuple[LoadedGenerator, bool]:
    """(generator, cache hit): decoded once per process per artifact (digest + metadata) and device.

    ``generator_ref`` is a REF (of a DnD or a CVAE generator), None (the latest DnD generator) or an
    already resolved ArtifactInfo.
    """
    from generator.training import resolve_device

    info = generator_ref if hasattr(generator_ref, "sha256") else resolve_any_generator(reg, generator_ref)
    return load_cached(reg, info, resolve_device(device), backend_of(info).build)


def generate_state_dict_for(reg, prompts: Sequence[str], generator_ref: str | None = None,
                            base_model: str | None = None, device=None,
                            precision: str | None = None, gate: bool = False) -> tuple[dict, dict, dict]:
    """Prompts -> (PEFT state dict, adapter_config dict, timings) without storing anything.

    ``generator_ref`` names a DnD or a CVAE generator (dispatched on its artifact type; None: the
    latest DnD generator). ``precision`` is ``auto`` (None: ``$REGISTRY_PRECISION`` or auto), ``fp32``
    or ``bf16`` (``registry.precision``): in bf16 the prompt encoder and the decoder run under bf16
    autocast with their frozen weights in bfloat16; the weights returned are float32 either way.
    timings: ``load_s`` (resolving + decoding the artifact, 0 on a cache hit), ``encoder_s`` (loading
    the prompt encoder, for a CVAE the base LLM; ~0 once loaded), ``embed_s`` (for a CVAE: the task
    vector), ``decode_s`` (decoder + de-tokenising), ``total_s``, ``cached``, ``generator`` (its ref),
    ``generator_digest``, ``device``, ``arch``, ``precision`` (the resolved one). ``gate``: see
    :func:`gated`.
    """
    prompts = clean_prompts(prompts)
    resolve_precision(precision, "cpu")  # an unknown name fails before anything is loaded
    info = resolve_any_generator(reg, generator_ref)
    _check_gate(info, gate)
    state_dict, peft_config, timings, _ = backend_of(info).generate(reg, prompts, info, base_model, device,
                                                                    pooled=False, precision=precision)
    if gate:
        state_dict, peft_config = gated(reg, info, prompts, state_dict, peft_config, timings, device)
    return state_dict, peft_config, timings


def _check_gate(info, gate: bool) -> None:
    if gate and not info.meta.get("under"):
        raise GeneratorError(f"generator {info.ref} has no adapter under it (train-generator --under): "
                             "the entropy gate has nothing to fall back to")


def gated(reg, info, prompts: Sequence[str], state_dict: dict, peft_config: dict, timings: dict, device=None
          ) -> tuple[dict, dict]:
    """The entropy gate (``registry.confidence``): the generated adapter, or the adapter the generator
    sits on (``meta["under"]``, e.g. the multitask LoRA) alone when the base answers the prompts more
    surely with that one. For a task none of the generator's pool fits, the retrieved anchor and the
    residual built on it can only hurt (README: 0.060 against the multitask LoRA's 0.213 on the small
    variants split); the gate is what lets the generator fall back. Adds ``gate`` (both entropies and
    which was kept) and ``gate_s`` to ``timings``."""
    from registry.confidence import entropy_gate

    start = time.perf_counter()
    fallback = reg.load_weights(info.meta["under"])
    keep, entropies = entropy_gate(info.meta.get("base_model"), prompts, fallback, (state_dict, peft_config),
                                   device)
    timings["gate"] = {"signal": "first-token entropy", "under": entropies["fallback"],
                       "generated": entropies["candidate"], "kept": "generated" if keep else "under"}
    timings["gate_s"] = time.perf_counter() - start
    timings["total_s"] = timings.get("total_s", 0.0) + timings["gate_s"]
    return (state_dict, peft_config) if keep else fallback


def generate_adapter(reg, prompts: Sequence[str], name: str, generator_ref: str | None = None,
                     task: str | None = None, base_model: str | None = None, device=None,
                     timings: dict | None = None, tags: Sequence[str] = (), precision: str | None = None,
                     gate: bool = False):
    """Prompts -> a new ``generated`` adapter version; returns its ``AdapterInfo``.

    ``generator_ref`` names a DnD or a CVAE generator (dispatched on its artifact type; None: the
    latest DnD generator); ``precision`` as in ``generate_state_dict_for``. The recipe records the
    generator (ref + digest + type + arch), the resolved precision and the prompts' sha256; the
    prompts are stored with the adapter (so it is searchable; for DnD their sentence embeddings come
    from the same encoder pass as the condition). Pass a dict as ``timings`` to receive the
    breakdown of ``generate_state_dict_for`` plus ``store_s``. With ``gate`` (:func:`gated`) the recipe
    records the gate, and where it kept the adapter under the generator, that adapter is the only parent.
    """
    from registry.refs import validate_name

    validate_name(name)
    prompts = clean_prompts(prompts)
    resolve_precision(precision, "cpu")  # an unknown name fails before anything is loaded
    info = resolve_any_generator(reg, generator_ref)
    _check_gate(info, gate)
    state_dict, peft_config, measured, vectors = backend_of(info).generate(reg, prompts, info, base_model, device,
                                                                           pooled=True, precision=precision)
    if gate:
        state_dict, peft_config = gated(reg, info, prompts, state_dict, peft_config, measured, device)
    start = time.perf_counter()
    recipe = {"generator": measured["generator"], "generator_digest": measured["generator_digest"],
              "generator_type": info.artifact_type, "arch": measured["arch"], "precision": measured["precision"],
              "objective": info.meta.get("objective", "recon"),
              "prompts_sha256": prompts_sha256(prompts), "n_prompts": len(prompts)}
    if measured.get("task_vector_sha256"):
        recipe["task_vector_sha256"] = measured["task_vector_sha256"]
    anchors = measured.get("anchor_adapters") or []  # a retrieved anchor: the adapters it fused, equal shares
    if anchors:
        recipe["anchor_adapters"] = anchors
    under = measured.get("under_adapter")  # the adapter stacked under it, at full weight
    if under:
        recipe["under_adapter"] = under
    if gate:
        recipe["gate"] = measured["gate"]
        if measured["gate"]["kept"] == "under":
            anchors = []  # the stored adapter is the one under the generator, alone
    info = reg.add_weights(name, state_dict, peft_config, kind="generated", task=task, prompts=prompts,
                           prompt_embeddings=vectors, tags=tags, recipe=recipe,
                           parents=[(ref, 1.0 / len(anchors)) for ref in anchors] + ([(under, 1.0)] if under else []))
    measured["store_s"] = time.perf_counter() - start
    measured["total_s"] += measured["store_s"]
    if timings is not None:
        timings.update(measured)
    return info


def list_generators(reg) -> list:
    """All stored generator artifacts (every type ``generator-*``), oldest first."""
    return reg.list_artifacts("generator-")
