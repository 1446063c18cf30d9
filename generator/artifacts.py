"""Stored generators: their artifact types, finding one, checking and loading it (cached per
process, one ``LoadedGenerator`` for every architecture), and the PEFT config of what they write.

Each architecture's backend (``generator.dnd_service``, ``generator.cvae_service``) supplies the
``build(info, tensors, device)`` that turns an artifact's tensors into a ``LoadedGenerator``;
``load_cached`` decodes an artifact once per process per (digest, metadata, device).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping

from generator.decode import DecodePlan
from generator.errors import GeneratorError, GeneratorLayoutError
from generator.workdir import sha256_json
from registry.errors import NotFound

ARTIFACT_TYPE = "generator-dnd"  # the DnD generator's (the default one)
CVAE_ARTIFACT_TYPE = "generator-cvae"
GENERATOR_TYPE_PREFIX = "generator-"
SFT_ARTIFACT_TYPE = "generator-dnd-sft"  # the DnD decoder trained through the base model (generator.sft_service)
GENERATOR_TYPES = (ARTIFACT_TYPE, CVAE_ARTIFACT_TYPE, SFT_ARTIFACT_TYPE)
NORMALIZER_PREFIX = "normalizer."


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

def checked_layout(info, expected_format: str):
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

def load_prefixed(model, tensors: Mapping, prefix: str, info, what: str) -> None:
    """Load the artifact tensors under ``prefix`` into ``model``; a shape mismatch is a layout error."""
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise GeneratorLayoutError(f"generator {info.ref} is unusable: {what} weights do not fit its config "
                                   f"({first[1].strip() if len(first) > 1 else first[0]})") from None

def model_for_layout(info, build_model, check, layout, what: str):
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


def check_normalizer(info, normalizer, layout) -> None:
    """A stored normaliser must fit the layout: std (T,), mean (T,) or (T, h, w), mask (T, h, w) if any."""
    T, h, w = layout.shape
    mask = getattr(normalizer, "mask", None)
    if (normalizer.std.shape != (T,) or normalizer.mean.shape not in ((T,), (T, h, w))
            or (mask is not None and tuple(mask.shape) != (T, h, w))):
        raise GeneratorLayoutError(f"generator {info.ref} is unusable: normaliser shapes do not match layout "
                                   f"{layout.shape}")


def check_peft_layout(info, layout) -> None:
    """The artifact's recorded PEFT fields (target modules, rank) agree with its layout."""
    bad = f"generator {info.ref} is unusable"
    peft = info.meta.get("peft_config", {})
    if sorted(peft.get("target_modules") or []) != layout.target_modules:
        raise GeneratorLayoutError(f"{bad}: target_modules {peft.get('target_modules')} do not match the layout "
                                   f"{layout.target_modules}")
    if not peft.get("rank_pattern") and {m.rank for m in layout.modules} != {peft.get("r")}:
        raise GeneratorLayoutError(f"{bad}: r={peft.get('r')} does not match the layout's ranks")


def frozen(model, device):
    """``model`` on ``device`` in eval mode with every parameter frozen (an inference copy)."""
    model = model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_cached(reg, info, device, build: Callable) -> tuple[LoadedGenerator, bool]:
    """(generator, cache hit) for a resolved ArtifactInfo: ``build(info, tensors, device)`` runs once
    per process per artifact (digest + metadata) and device."""
    # the metadata is part of the key: two artifacts can share their tensors (same blob) but differ in
    # their recorded layout, config or base, and each must be checked on its own
    key = (info.sha256, sha256_json(info.meta), str(device))
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached, True
    tensors, info = reg.load_artifact(info.ref, info.artifact_type)
    loaded = build(info, tensors, device)
    with _CACHE_LOCK:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = loaded
    return loaded, False


def generator_peft_config(meta: Mapping) -> dict:
    """The ``adapter_config.json`` fields of the adapters a generator (DnD or CVAE) writes."""
    return {**meta["peft_config"], "peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
            "bias": "none", "base_model_name_or_path": meta["base_model"]}
