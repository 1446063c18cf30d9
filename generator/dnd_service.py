"""The Drag-and-Drop generator as a registry backend (``generator.dnd`` is the model).

A trained DnD generator is one registry artifact of type ``generator-dnd``: its tensors are the
decoder weights (``decoder.*``) and the token normaliser (``normalizer.*``); its metadata records
the decoder config, the LoRA layout it produces (and that layout's fingerprint), the base model, the
prompt encoder, the PEFT fields to write, exactly which adapters and tasks it was trained on, and how
the training went.

Training is resumable (``generator.workdir``): the state is saved every ``save_every`` steps under
``<home>/work/generators/<fingerprint>/``, where the fingerprint (``dnd_fingerprint``) covers the
training set (adapter refs + digests), the prompts, the decoder config, the encoder, the settings'
canonical form (``DnDSettings.fingerprint_fields``) and the precision, but not the number of
steps; rerunning the same call continues from there, and rerunning a finished one returns the
artifact it already stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from generator.artifacts import (ARTIFACT_TYPE, NORMALIZER_PREFIX, LoadedGenerator, check_normalizer, check_peft_layout,
                                 checked_layout,
                                 frozen, generator_peft_config, load_cached, load_prefixed, model_for_layout,
                                 resolve_generator)
from generator.backend import FunctionBackend, check_base, resolve_precision, sync_device
from generator.errors import GeneratorError, GeneratorLayoutError
from generator.trainset import TrainingSet, collect_training_set, token_grids
from generator.workdir import WorkDir, sha256_json, source_version, train_and_store, training_meta
from registry.precision import identity as precision_identity

ARTIFACT_FORMAT = "dnd-generator-artifact/1"
SERVICE_VERSION = "dnd-service/1"  # part of the resume fingerprint: unchanged, so old work dirs still resume
DECODER_PREFIX = "decoder."

# Training defaults (CPU-friendly; seed 000 used 10,000 steps at lr 3e-5, batch 8 on an H100).
DEFAULT_STEPS = 2000
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 8
DEFAULT_SAVE_EVERY = 100
DEFAULT_N_PROMPTS = 16
# Options of ``train_generator_from_registry(**config)``: decoder shape and training settings.
DECODER_OPTIONS = ("prompt_tokens", "n_layers", "kernel", "hidden_tokens", "shapes")
TRAINING_OPTIONS = ("chunk_width", "center", "spread_weighting", "seed", "weight_decay", "grad_clip",
                    "save_every", "base_model", "precision")
SOURCE_FILES = ("tokenizer.py", "condition.py", "dnd.py", "training.py", "decode.py", "dnd_service.py")


# -----------------------------------------------------------------------------
# settings and identity


@dataclass(frozen=True)
class DnDSettings:
    """How a DnD generator trains, validated once (``from_options``). Values keep the types they were
    given where the old dict did (``lr``, ``grad_clip``), so the fingerprint of a call is unchanged."""

    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE
    n_prompts: int = DEFAULT_N_PROMPTS
    seed: int = 0
    center: str = "element"
    spread_weighting: bool = False
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    save_every: int = DEFAULT_SAVE_EVERY
    chunk_width: int | None = None
    base_model: str | None = None
    precision: str | None = None

    @classmethod
    def from_options(cls, steps: int, lr: float, batch_size: int, n_prompts: int,
                     options: Mapping) -> tuple["DnDSettings", dict]:
        """(settings, decoder options) from ``train_generator_from_registry``'s arguments; options set to
        None take their defaults; unknown ones are refused."""
        if steps < 1 or batch_size < 1 or n_prompts < 1 or lr <= 0:
            raise GeneratorError("steps, batch size and n_prompts must be >= 1 and lr > 0")
        unknown = sorted(set(options) - set(DECODER_OPTIONS) - set(TRAINING_OPTIONS))
        if unknown:
            raise GeneratorError(f"unknown generator option(s): {', '.join(unknown)}")
        given = {k: options[k] for k in TRAINING_OPTIONS if options.get(k) is not None}
        decoder = {k: options[k] for k in DECODER_OPTIONS if options.get(k) is not None}
        settings = cls(lr=lr, batch_size=batch_size, n_prompts=n_prompts, seed=int(given.get("seed", 0)),
                       center=given.get("center", "element"),
                       spread_weighting=bool(given.get("spread_weighting", False)),
                       weight_decay=float(given.get("weight_decay", 0.0)), grad_clip=given.get("grad_clip", 1.0),
                       save_every=max(1, int(given.get("save_every", DEFAULT_SAVE_EVERY))),
                       chunk_width=given.get("chunk_width"), base_model=given.get("base_model"),
                       precision=given.get("precision"))
        return settings, decoder

    def fingerprint_fields(self) -> dict:
        """The canonical form in the resume fingerprint and the artifact's ``training`` record."""
        return {"lr": self.lr, "batch_size": self.batch_size, "seed": self.seed, "center": self.center,
                "spread_weighting": self.spread_weighting, "weight_decay": self.weight_decay,
                "grad_clip": self.grad_clip}


def dnd_fingerprint(data: TrainingSet, decoder_config: dict, encoder_id: str, settings: DnDSettings, name: str,
                    precision: str) -> str:
    """The training's identity (its work folder): everything that changes the result but the steps."""
    return sha256_json({"adapters": [[a["ref"], a["digest"]] for a in data.adapters], "prompts": data.prompts,
                        "config": decoder_config, "encoder": encoder_id, "training": settings.fingerprint_fields(),
                        "name": name, **precision_identity(precision), "code": SERVICE_VERSION})


def code_version() -> str:
    """``SERVICE_VERSION`` plus a hash of the DnD path's source files (recorded, not fingerprinted)."""
    return source_version(SERVICE_VERSION, SOURCE_FILES)


# -----------------------------------------------------------------------------
# training


def train_dnd(reg, *, name: str = "dnd", tasks: Sequence[str] | None = None, exclude_tasks: Sequence[str] = (),
              steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH_SIZE,
              n_prompts: int = DEFAULT_N_PROMPTS, device: str | None = None,
              on_step: Callable[[int, int, float], bool | None] | None = None, resume: bool = True,
              on_status: Callable[[str], None] | None = None, **options):
    """Train a DnD generator on the registry's harvested adapters and store it (``ArtifactInfo``);
    the options are ``train_generator_from_registry``'s."""
    import torch

    from generator.dnd import DnDConfig, DnDDecoder
    from generator.tokenizer import TokenNormalizer, token_mask
    from generator.training import GeneratorDataset, resolve_device, train_generator
    from registry.embeddings import load_encoder
    from registry.refs import validate_name

    status = on_status or (lambda message: None)
    validate_name(name)
    settings, decoder_options = DnDSettings.from_options(steps, lr, batch_size, n_prompts, options)
    precision = resolve_precision(settings.precision, resolve_device(device))

    status("collecting harvested adapters")
    data = collect_training_set(reg, tasks, exclude_tasks, base_model=settings.base_model)
    status("loading the prompt encoder")
    encoder = load_encoder(reg.encoder)
    dimension = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    embed_dim = int(dimension())
    try:
        layout, grids, checkpoints_per_task = token_grids(data, settings.chunk_width)  # task -> (K, T, h, w)
        decoder_config = DnDConfig.from_layout(layout, n_prompts=n_prompts, embed_dim=embed_dim, **decoder_options)
        mask = token_mask(layout)
        normalizer = TokenNormalizer.fit(list(grids.values()), mask, center=settings.center)
    except (ValueError, TypeError) as err:
        raise GeneratorError(f"cannot build a generator for these adapters: {err}") from None

    status("embedding prompts")
    dataset = GeneratorDataset(grids, data.prompts, n_prompts=n_prompts, normalizer=normalizer, mask=mask,
                               encoder=encoder, prompt_tokens=decoder_config.prompt_tokens,
                               spread_weighting=settings.spread_weighting)
    del grids  # the dataset holds the normalised copy

    fingerprint = dnd_fingerprint(data, decoder_config.to_dict(), reg.encoder_id, settings, name, precision)
    device = resolve_device(device)

    def store(model, state, wall_time: float, resumed_from: int) -> tuple[dict, dict]:
        meta = {
            "format": ARTIFACT_FORMAT,
            "code_version": code_version(),
            "config": decoder_config.to_dict(),
            **training_meta(data, layout, exclude_tasks, checkpoints_per_task, state, {
                **settings.fingerprint_fields(), "steps": steps, "save_every": settings.save_every,
                "resumed_from": resumed_from, "device": str(device), "fingerprint": fingerprint,
                "precision": precision}),
            "encoder": reg.encoder_id,
            "prompt_tokens": decoder_config.prompt_tokens,
            "n_prompts": n_prompts,
            "wall_time_s": round(wall_time, 3),
            "decoder_parameters": model.num_parameters(),
        }
        tensors = {f"{DECODER_PREFIX}{k}": v for k, v in model.state_dict().items()}
        tensors |= {f"{NORMALIZER_PREFIX}{k}": v for k, v in normalizer.state_dict().items()}
        return tensors, meta

    return train_and_store(
        reg, WorkDir(reg.home / "work" / "generators" / fingerprint[:24]), artifact_type=ARTIFACT_TYPE, steps=steps,
        resume=resume, status=status, build_model=lambda: DnDDecoder(decoder_config), seed=settings.seed,
        device=device, save_every=settings.save_every, on_step=on_step,
        record={"fingerprint": fingerprint, "name": name, "base_model": data.base_model}, store=store,
        train_chunk=lambda model, state, target, on_chunk_step: train_generator(
            model, dataset, steps=target, lr=lr, batch_size=batch_size, device=device, on_step=on_chunk_step,
            state=state, seed=settings.seed, weight_decay=settings.weight_decay, grad_clip=settings.grad_clip,
            precision=precision))


# -----------------------------------------------------------------------------
# loading and generating


def build_dnd(info, tensors: Mapping, device) -> LoadedGenerator:
    """Check the artifact's layout, decoder and normaliser agree, then build the decoder."""
    import torch

    from generator.dnd import DnDConfig, DnDDecoder
    from generator.tokenizer import TokenNormalizer
    from generator.training import check_layout

    meta = info.meta
    layout = checked_layout(info, ARTIFACT_FORMAT)
    model = model_for_layout(info, lambda: DnDDecoder(DnDConfig.from_dict(meta["config"])), check_layout,
                              layout, "decoder")
    load_prefixed(model, tensors, DECODER_PREFIX, info, "decoder")
    normalizer = TokenNormalizer.from_state_dict(
        {k[len(NORMALIZER_PREFIX):]: v for k, v in tensors.items() if k.startswith(NORMALIZER_PREFIX)})
    check_normalizer(info, normalizer, layout)
    check_peft_layout(info, layout)
    model = frozen(model, device)
    return LoadedGenerator(ref=info.ref, sha256=info.sha256, meta=meta, model=model, layout=layout,
                           normalizer=normalizer, device=torch.device(device))


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


def generate_dnd(reg, prompts: list[str], generator_ref, base_model, device, pooled: bool, precision: str | None = None):
    import torch

    from generator.training import check_layout, group_prompts, resolve_device
    from registry.precision import autocast

    start = time.perf_counter()
    info = generator_ref if hasattr(generator_ref, "sha256") else resolve_generator(reg, generator_ref)
    check_base(info.meta, info.ref, base_model)
    loaded, cached = load_cached(reg, info, resolve_device(device), build_dnd)
    meta = loaded.meta
    precision = resolve_precision(precision, loaded.device)
    model = loaded.model_for(precision)
    plan = loaded.decode_plan()
    check_layout(loaded.model, loaded.layout)
    t_loaded = time.perf_counter()

    encoder = _encoder_for(reg, meta, loaded.device)
    t_encoder = time.perf_counter()
    condition, vectors = _embed_prompts(encoder, prompts, int(meta["prompt_tokens"]), precision)  # (P, L, C)
    sync_device(loaded.device)
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


# the DnD generator behind the ``GeneratorBackend`` interface (``generator.backend``)
DND = FunctionBackend("dnd", ARTIFACT_TYPE, DEFAULT_BATCH_SIZE, train_dnd, build_dnd, generate_dnd)
