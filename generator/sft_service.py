"""The DnD decoder trained with the SFT objective, as a registry backend (``generator.sft`` is the math).

``registry train-generator --objective sft`` lands here. The artifact (type ``generator-dnd-sft``)
holds the decoder (``decoder.*``) and its residual head (``head.*``: anchor, per-module scale,
gate); its metadata records the decoder config, the layout and PEFT fields of the harvested
adapters it writes like, the base model, the encoder, the training tasks (and how many train items
each gave), the anchor adapter and how training went.

What it trains on: ``task_items`` (task -> [(prompt, answer)], the callers' task data; this package
does not read tasks itself) for every training task; the layout, PEFT fields and base model come
from the training tasks' harvested adapters (``collect_training_set``), which a task without a
harvest simply does not add to. The condition of each task is a draw of its own train prompts.
Training is resumable like the reconstruction generator's (``generator.workdir``).
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Mapping, Sequence

from generator.artifacts import (SFT_ARTIFACT_TYPE, LoadedGenerator, check_peft_layout, checked_layout, frozen,
                                 generator_peft_config, load_cached, load_prefixed, model_for_layout,
                                 resolve_any_generator)
from generator.backend import FunctionBackend, check_base, resolve_precision, sync_device
from generator.errors import GeneratorError, GeneratorLayoutError
from generator.trainset import collect_training_set
from generator.workdir import (WorkDir, model_and_state, run_chunked_training, sha256_json, source_version,
                               stored_artifact, training_meta)
from registry.precision import frozen_dtype, identity as precision_identity

ARTIFACT_FORMAT = "dnd-sft-generator-artifact/1"
SERVICE_VERSION = "dnd-sft-service/1"
SOURCE_FILES = ("sft.py", "sft_service.py", "dnd.py", "tokenizer.py", "condition.py")
DECODER_PREFIX = "decoder."
HEAD_PREFIX = "head."
GATED_PREFIX = "gated."  # the rank-gated head's shared LoRA and router (``generator.sft.RankGatedGenerator``)
HEADS = ("residual", "gated", "routed")  # routed: the gated head with the retrieval router
GATED_HEADS = ("gated", "routed")

DEFAULT_SFT_STEPS = 500
DEFAULT_SFT_LR = 1e-3
DEFAULT_TASKS_PER_STEP = 2
DEFAULT_ITEMS_PER_TASK = 4
ANCHOR_TRAINING = ("others", "own")  # what a training task retrieves as its anchor (train_dnd_sft)
DEFAULT_ANCHOR_K = 3  # --anchor retrieved: adapters fused, as `registry compose -k 3`
POOL_CENTROIDS = "pool.centroids"  # a retrieved-anchor generator's (N, C) prompt centroids of its pool
DECODER_OPTIONS = ("prompt_tokens", "n_layers", "kernel", "hidden_tokens", "shapes")


def lora_scaling(peft: Mapping) -> float:
    """PEFT's scaling (``registry.lm.lora_scaling``), refused in the SFT objective's words."""
    from registry import lm
    from registry.errors import RegistryError

    try:
        return lm.lora_scaling(peft)
    except RegistryError:
        raise GeneratorError("the SFT objective needs one rank and alpha for every module (no rank/alpha patterns)") from None


def _items_digest(task_items: Mapping[str, Sequence[tuple[str, str]]]) -> dict[str, str]:
    return {task: hashlib.sha256("\1".join(f"{p}\0{a}" for p, a in items).encode()).hexdigest()[:16]
            for task, items in sorted(task_items.items())}


def training_items(task_items: Mapping, tasks: Sequence[str] | None, exclude_tasks: Sequence[str],
                   items_per_task: int) -> dict[str, list]:
    """The SFT training tasks' items, sorted by task: ``tasks`` (None: all) minus ``exclude_tasks``;
    refuses a task with fewer than ``items_per_task`` items and an empty selection."""
    excluded = set(exclude_tasks)
    chosen = {t: list(v) for t, v in sorted(task_items.items()) if t not in excluded and (tasks is None or t in tasks)}
    short = [t for t, items in chosen.items() if len(items) < items_per_task]
    if short:
        raise GeneratorError(f"tasks with fewer than {items_per_task} train items: {', '.join(short)}")
    if not chosen:
        raise GeneratorError("no training task left after --exclude-tasks")
    return chosen


def adapter_tokens(reg, ref: str, layout, role: str = "anchor"):
    """A stored adapter as the token grid (T, h, w) of ``layout``: ``(its AdapterInfo, grid, its
    scaling)``; the anchor a generated LoRA starts from, or (``role``) the adapter under it."""
    from generator.tokenizer import state_dict_to_tokens

    info = reg.resolve(ref)
    state_dict, config = reg.load_weights(info.ref)
    try:
        return info, state_dict_to_tokens(state_dict, layout), lora_scaling(config)
    except (KeyError, ValueError) as err:
        raise GeneratorLayoutError(f"{role} {info.ref} does not fit the generator's LoRA layout: {err}") from None


def _anchor_pool(data, layout):
    """The retrieved anchor's pool: ``({task: its latest harvested REF}, (N, T, h, w) their token grids)``,
    tasks in sorted order (``data.checkpoints`` holds each task's adapters in (name, version) order)."""
    import torch

    from generator.tokenizer import state_dict_to_tokens

    latest = {}
    for adapter in data.adapters:
        latest[adapter["task"]] = adapter["ref"]
    tasks = sorted(latest)
    grids = torch.stack([state_dict_to_tokens(data.checkpoints[t][-1], layout) for t in tasks])  # (N, T, h, w)
    return {t: latest[t] for t in tasks}, grids


def _pool_digest(data, pool) -> str | None:
    if pool is None:
        return None
    digests = {a["ref"]: a["digest"] for a in data.adapters}
    return sha256_json({t: digests[ref] for t, ref in pool[0].items()})


def train_dnd_sft(reg, *, name: str = "dnd-sft", tasks: Sequence[str] | None = None,
                  exclude_tasks: Sequence[str] = (), steps: int = DEFAULT_SFT_STEPS, lr: float = DEFAULT_SFT_LR,
                  batch_size: int = DEFAULT_TASKS_PER_STEP, n_prompts: int = 16, device: str | None = None,
                  on_step: Callable[[int, int, float], bool | None] | None = None, resume: bool = True,
                  on_status: Callable[[str], None] | None = None, task_items: Mapping | None = None,
                  anchor: str | None = None, items_per_task: int = DEFAULT_ITEMS_PER_TASK, max_length: int = 160,
                  seed: int = 0, save_every: int = 50, grad_clip: float = 1.0, precision: str | None = None,
                  base_model: str | None = None, recon_weight: float = 0.0, contrast_weight: float = 0.0,
                  retrieved_anchor_k: int = 0, anchor_training: str = "others", head: str = "residual",
                  under: str | None = None, **decoder_options):
    """Train the DnD decoder through the frozen base (``generator.sft``) and store it (``ArtifactInfo``).

    ``batch_size`` is the number of tasks per step, each with ``items_per_task`` items; ``anchor`` a
    REF of the adapter the generated LoRA starts from (the multitask LoRA; None: a fixed random A
    with B = 0). ``recon_weight`` > 0 is objective "both": the distance of the generated grid to the
    task's harvested checkpoints (``generator.sft.recon_error``) is added as a regulariser.
    ``contrast_weight`` > 0 adds the condition-sensitivity hinge (``generator.sft.contrast_hinge``).
    ``retrieved_anchor_k`` > 0 (no ``anchor`` then): each generated LoRA starts from the fusion of the
    k training adapters nearest to its prompts (``generator.sft.nearest_pool``; the pool is each
    harvested training task's latest adapter). ``anchor_training`` says what a training task retrieves:
    "others" (leave-one-out: never itself, so the residual learns to correct a neighbour's adapter) or
    "own" (as at generation: its nearest adapters, itself first, so train and test anchors agree where
    the unseen task's nearest adapter is the right one, and the residual refines it; paraphrase split,
    README).
    ``under`` (a REF, e.g. the multitask LoRA) is an adapter the generated LoRA sits on: applied to
    the frozen base throughout training, so the decoder learns what to add to it, and stacked under
    every generated adapter (``generator.sft.stacked_lora``; rank doubles). On the paraphrase split
    the selected adapter plus the multitask LoRA beat both alone (README), and the residual can learn
    where the two interfere.
    ``head`` "gated" replaces the decoder + residual head by ``generator.sft.RankGatedGenerator``: the
    anchor LoRA trained on every task, its rank components scaled by gains read from the prompts."""

    import torch

    from generator.dnd import DnDConfig, DnDDecoder
    from generator.dnd_service import _encoder_for, _embed_prompts
    from generator.sft import (DEFAULT_ROUTER_TEMPERATURE, RankGatedGenerator, ResidualHead, SFTGenerator, SFTTask,
                               embedding_standardiser, fixed_lora, fused_anchor, nearest_pool, pool_centroids,
                               router_keys, train_sft)
    from generator.tokenizer import layout_from_state_dict, stack_token_grids, state_dict_to_tokens
    from generator.training import resolve_device
    from registry.lm import encode_example, use_training_attention
    from registry.refs import validate_name

    status = on_status or (lambda message: None)
    validate_name(name)
    unknown = sorted(set(decoder_options) - set(DECODER_OPTIONS))
    if unknown:
        raise GeneratorError(f"unknown option(s) for the SFT objective: {', '.join(unknown)}")
    if steps < 1 or batch_size < 1 or items_per_task < 1 or n_prompts < 1 or lr <= 0 or recon_weight < 0 or contrast_weight < 0:
        raise GeneratorError("steps, tasks per step, items per task and n_prompts must be >= 1, lr > 0 "
                             "and the reconstruction and contrast weights >= 0")
    if not task_items:
        raise GeneratorError("the SFT objective needs the training tasks' items (prompt, answer pairs)")
    if retrieved_anchor_k < 0 or (retrieved_anchor_k and anchor is not None):
        raise GeneratorError("a retrieved anchor takes k >= 1 adapters and no fixed --anchor REF")
    if anchor_training not in ANCHOR_TRAINING or (anchor_training != "others" and not retrieved_anchor_k):
        raise GeneratorError(f"the anchor in training is one of {', '.join(ANCHOR_TRAINING)}, and other than "
                             "'others' only with a retrieved anchor")
    if head not in HEADS:
        raise GeneratorError(f"unknown SFT head {head!r} (one of {', '.join(HEADS)})")
    if head in GATED_HEADS and (retrieved_anchor_k or under or recon_weight or set(decoder_options) - {"prompt_tokens"}):
        raise GeneratorError(f"the {head} head takes a fixed anchor only: no retrieved anchor, adapter under it, "
                             "reconstruction term or decoder options")
    task_items = training_items(task_items, tasks, exclude_tasks, items_per_task)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)

    status("collecting harvested adapters (layout, PEFT fields, base model)")
    harvested = [t for t in task_items if reg.list_adapters(kind="harvested", task=t)]
    if not harvested:
        raise GeneratorError("none of the SFT training tasks has a harvested adapter to take the layout from")
    # reconstruction needs every kept checkpoint; otherwise each task's final one gives the layout (and the pool)
    data = collect_training_set(reg, harvested, (), base_model=base_model, latest_only=not recon_weight)
    layout = layout_from_state_dict(next(iter(data.checkpoints.values()))[0])
    targets = {t: stack_token_grids(c, layout) for t, c in data.checkpoints.items()} if recon_weight else {}
    pool = _anchor_pool(data, layout) if retrieved_anchor_k else None  # (task -> latest ref, (N, T, h, w))
    data.checkpoints = {t: [] for t in data.checkpoints}  # only the layout was needed (and targets for "both")
    scaling = lora_scaling(data.peft_fields)
    anchor_info, anchor_tokens = None, None
    if pool is not None:
        anchor_tokens = pool[1].mean(dim=0)  # the fixed anchor (scale; nothing retrieved): the pool's mean
    if anchor is not None:
        anchor_info, anchor_tokens, _ = adapter_tokens(reg, anchor, layout)
    under_info, under_tokens, under_scaling = (adapter_tokens(reg, under, layout, "--under adapter")
                                               if under is not None else (None, None, None))

    status("loading the base model and the prompt encoder")
    from registry import base_models

    model, tokenizer = base_models.load_base(data.base_model, device=str(device), cached=False,
                                             dtype=frozen_dtype(precision))
    use_training_attention(model, device)
    encoder = _encoder_for(reg, {"encoder": reg.encoder_id}, device)
    embed_dim = int(encoder.dimension)
    decoder_config = DnDConfig.from_layout(layout, n_prompts=n_prompts, embed_dim=embed_dim, **decoder_options)

    status("embedding prompts and encoding train items")
    sft_tasks, centroids = [], None
    if pool is not None:
        pool_vectors = [torch.as_tensor(_embed_prompts(encoder, data.prompts[t], decoder_config.prompt_tokens)[1])
                        for t in pool[0]]  # each (P_t, C) sentence embeddings
        centroids = pool_centroids(pool_vectors)  # (N, C)
    for index, (task, items) in enumerate(task_items.items()):
        condition, vectors = _embed_prompts(encoder, [p for p, _ in items], decoder_config.prompt_tokens)  # (P, L, C)
        examples = [encode_example(tokenizer, p, a, max_length) for p, a in items]
        task_anchor = None
        if pool is not None:
            own = list(pool[0]).index(task) if task in pool[0] and anchor_training == "others" else None
            task_anchor = fused_anchor(pool[1][nearest_pool(torch.as_tensor(vectors), centroids, retrieved_anchor_k, own)])
        sft_tasks.append(SFTTask(task, condition.float().cpu(), examples, targets.get(task), task_anchor,
                                 key_index=index if head == "routed" else None))

    settings = {"lr": lr, "tasks_per_step": batch_size, "items_per_task": items_per_task, "seed": seed,
                "grad_clip": grad_clip, "max_length": max_length}
    if recon_weight:
        settings["recon_weight"] = recon_weight  # (absent for plain sft: earlier fingerprints stay valid)
    if contrast_weight:
        settings["contrast_weight"] = contrast_weight  # (likewise)
    if retrieved_anchor_k:
        settings["retrieved_anchor_k"] = retrieved_anchor_k  # (likewise)
    if anchor_training != "others":
        settings["anchor_training"] = anchor_training  # (likewise)
    if under_info is not None:
        settings["under"] = under_info.digest  # (likewise)
    if head != "residual":
        settings["head"] = head  # (likewise)
        settings["router_input"] = "standardised"  # the router reads (e - centre) / spread (a first try did not)
    if head == "routed":
        settings["router_temperature"] = DEFAULT_ROUTER_TEMPERATURE
    fingerprint = sha256_json({"items": _items_digest(task_items), "layout": layout.fingerprint,
                               "anchor": anchor_info.digest if anchor_info else _pool_digest(data, pool),
                               "config": decoder_config.to_dict(),
                               "encoder": reg.encoder_id, "base": data.base_fingerprint, "training": settings,
                               "name": name, **precision_identity(precision), "code": SERVICE_VERSION})
    work = WorkDir(reg.home / "work" / "generators" / fingerprint[:24])
    with work.locked():
        if not resume:
            work.clear()
        info = stored_artifact(reg, work, steps, SFT_ARTIFACT_TYPE, status)
        if info is not None:
            return info
        generator, state, record = model_and_state(
            work, lambda: (RankGatedGenerator(layout, decoder_config, anchor_tokens, seed=seed,
                                              standardiser=embedding_standardiser([t.condition for t in sft_tasks]),
                                              keys=router_keys([t.condition for t in sft_tasks]) if head == "routed" else None)
                           if head in GATED_HEADS else
                           SFTGenerator(DnDDecoder(decoder_config), ResidualHead(layout, anchor_tokens, seed=seed))),
            seed, steps)
        wall_before = float(record.get("wall_time_s", 0.0)) if record else 0.0
        resumed_from = state.step
        status(f"training on {device} through the base model" + (f", resuming at step {resumed_from}" if resumed_from else ""))
        with fixed_lora(model, layout, under_tokens, under_scaling, device):  # the adapter under the generated one
            generator, state, wall_time = run_chunked_training(
                work, generator, state, steps=steps, save_every=save_every, on_step=on_step, wall_before=wall_before,
                record={"fingerprint": fingerprint, "name": name},
                train_chunk=lambda gen, st, target, on_chunk_step: train_sft(
                    gen, model, sft_tasks, layout, steps=target, scaling=scaling, pad_id=tokenizer.pad_token_id,
                    lr=lr, tasks_per_step=batch_size, items_per_task=items_per_task, grad_clip=grad_clip, state=st,
                    device=device, precision=precision, recon_weight=recon_weight, contrast_weight=contrast_weight,
                    on_step=on_chunk_step))
        data.prompts = {t: [p for p, _ in items] for t, items in task_items.items()}
        data.checkpoints = {t: [] for t in task_items}
        meta = {
            "format": ARTIFACT_FORMAT,
            "code_version": source_version(SERVICE_VERSION, SOURCE_FILES),
            "config": decoder_config.to_dict(),
            **training_meta(data, layout, exclude_tasks, {t: 0 for t in task_items}, state, {
                **settings, "steps": steps, "save_every": save_every, "resumed_from": resumed_from,
                "device": str(device), "fingerprint": fingerprint, "precision": precision}),
            "objective": "both" if recon_weight else "sft",
            "parametrisation": ("shared LoRA B diag(g(prompts)) A, started from the anchor" if head in GATED_HEADS else
                                "fusion of the k nearest training adapters + gate * scale * decoder" if pool
                                else "anchor + gate * scale * decoder"),
            "head": head,
            **({"router_tasks": [t.name for t in sft_tasks]} if head == "routed" else {}),
            "anchor": anchor_info.ref if anchor_info else ("retrieved" if pool else None),
            **({"under": under_info.ref, "under_scaling": under_scaling} if under_info else {}),
            **({"anchor_pool": pool[0], "anchor_k": retrieved_anchor_k} if pool else {}),
            "items_per_task": {t: len(v) for t, v in task_items.items()},
            "scaling": scaling,
            "encoder": reg.encoder_id,
            "prompt_tokens": decoder_config.prompt_tokens,
            "n_prompts": n_prompts,
            "wall_time_s": round(wall_time, 3),
            "decoder_parameters": generator.num_parameters(),
        }
        if head in GATED_HEADS:
            tensors = {f"{GATED_PREFIX}{k}": v for k, v in generator.state_dict().items()}
        else:
            meta["gate"] = float(generator.head.gate.detach())
            tensors = {f"{DECODER_PREFIX}{k}": v for k, v in generator.decoder.state_dict().items()}
            tensors |= {f"{HEAD_PREFIX}{k}": v for k, v in generator.head.state_dict().items()}
        if centroids is not None:
            tensors[POOL_CENTROIDS] = centroids.contiguous()  # (N, C), rows in anchor_pool's order
        status("storing the generator")
        info = reg.add_artifact(name, SFT_ARTIFACT_TYPE, tensors, meta, base_model=data.base_model)
        work.mark_stored(info.ref, info.sha256, steps)
        return info


def build_dnd_sft(info, tensors: Mapping, device) -> LoadedGenerator:
    """Check the artifact's layout, decoder and head, then build the ``SFTGenerator``."""
    import torch

    from generator.dnd import DnDConfig, DnDDecoder
    from generator.sft import RankGatedGenerator, ResidualHead, SFTGenerator
    from generator.training import check_layout

    layout = checked_layout(info, ARTIFACT_FORMAT)
    if info.meta.get("head", "residual") in GATED_HEADS:
        try:
            config = DnDConfig.from_dict(info.meta["config"])
            keys = (torch.zeros(len(info.meta["router_tasks"]), config.embed_dim)  # (K, C), loaded below
                    if info.meta["head"] == "routed" else None)
            generator = RankGatedGenerator(layout, config, keys=keys)
        except (KeyError, TypeError, ValueError) as err:
            raise GeneratorLayoutError(f"generator {info.ref} is unusable: {err}") from None
        load_prefixed(generator, tensors, GATED_PREFIX, info, f"{info.meta['head']} head")
        check_peft_layout(info, layout)
        return LoadedGenerator(ref=info.ref, sha256=info.sha256, meta=info.meta, model=frozen(generator, device),
                               layout=layout, normalizer=None, device=torch.device(device), task_vectors=None,
                               arch="dnd-sft")
    decoder = model_for_layout(info, lambda: DnDDecoder(DnDConfig.from_dict(info.meta["config"])), check_layout,
                               layout, "decoder")
    load_prefixed(decoder, tensors, DECODER_PREFIX, info, "decoder")
    head = ResidualHead(layout)
    load_prefixed(head, tensors, HEAD_PREFIX, info, "head")
    check_peft_layout(info, layout)
    pool = None
    if info.meta.get("anchor") == "retrieved":  # the pool's prompt centroids, one row per pool task
        centroids, tasks = tensors.get(POOL_CENTROIDS), list(info.meta.get("anchor_pool") or {})
        if centroids is None or centroids.ndim != 2 or centroids.shape[0] != len(tasks) or not tasks:
            raise GeneratorLayoutError(f"generator {info.ref} is unusable: its anchor pool and centroids disagree")
        pool = dict(zip(tasks, centroids.float()))
    generator = frozen(SFTGenerator(decoder, head), device)
    return LoadedGenerator(ref=info.ref, sha256=info.sha256, meta=info.meta, model=generator, layout=layout,
                           normalizer=None, device=torch.device(device), task_vectors=pool, arch="dnd-sft")


_POOL_GRIDS: dict = {}  # (registry home, REF, layout) -> (T, h, w): a retrieved anchor's adapters, per process
_POOL_GRIDS_MAX = 32


def retrieved_anchor(reg, loaded: LoadedGenerator, vectors) -> tuple[object, list[str]]:
    """The fused anchor (T, h, w) for prompts with sentence embeddings ``vectors`` (P, C) and the REFs
    it fused: the ``anchor_k`` pool adapters nearest to the prompts (``generator.sft.nearest_pool``)."""
    import torch

    from generator.sft import fused_anchor, nearest_pool

    tasks = list(loaded.task_vectors)
    centroids = torch.stack([loaded.task_vectors[t] for t in tasks])  # (N, C)
    refs = [loaded.meta["anchor_pool"][tasks[i]]
            for i in nearest_pool(torch.as_tensor(vectors).float().cpu(), centroids, int(loaded.meta["anchor_k"]))]
    return fused_anchor([_stored_grid(reg, loaded, ref, "fuse its anchor adapter") for ref in refs]), refs


def _stored_grid(reg, loaded: LoadedGenerator, ref: str, use: str):
    """A stored adapter the generator builds on, as its layout's token grid (T, h, w); cached per process."""
    from generator.tokenizer import state_dict_to_tokens
    from registry.errors import RegistryError

    key = (str(reg.home), ref, loaded.layout.fingerprint)
    if key not in _POOL_GRIDS:
        try:
            state_dict, _ = reg.load_weights(ref)
        except RegistryError as err:  # a deleted or corrupted adapter: say which
            raise GeneratorError(f"generator {loaded.ref} cannot {use} {ref}: {err}") from None
        if len(_POOL_GRIDS) >= _POOL_GRIDS_MAX:
            _POOL_GRIDS.pop(next(iter(_POOL_GRIDS)))
        _POOL_GRIDS[key] = state_dict_to_tokens(state_dict, loaded.layout).float()
    return _POOL_GRIDS[key]


def with_under(reg, loaded: LoadedGenerator, state_dict: dict, peft_config: dict) -> tuple[dict, dict]:
    """A generated LoRA with the adapter it was trained on top of (``meta["under"]``) stacked under it:
    ``(state dict, adapter_config)`` of rank ``2r`` and the generator's scaling (``stacked_lora``)."""
    from generator.sft import stacked_lora
    from generator.tokenizer import tokens_to_state_dict

    under = tokens_to_state_dict(_stored_grid(reg, loaded, loaded.meta["under"], "add the adapter under it,"),
                                 loaded.layout)
    scaling = float(loaded.meta["scaling"])
    stacked = stacked_lora([(state_dict, scaling), (under, float(loaded.meta["under_scaling"]))], loaded.layout, scaling)
    rank = 2 * int(peft_config["r"])
    alpha = scaling * (rank ** 0.5 if peft_config.get("use_rslora") else rank)
    return stacked, {**peft_config, "r": rank, "lora_alpha": alpha}


def generate_dnd_sft(reg, prompts: list[str], generator_ref, base_model, device, pooled: bool,
                     precision: str | None = None):
    import torch

    from generator.dnd_service import _encoder_for, _embed_prompts
    from generator.tokenizer import tokens_to_state_dict
    from generator.training import group_prompts, resolve_device
    from registry.precision import autocast

    start = time.perf_counter()
    info = generator_ref if hasattr(generator_ref, "sha256") else resolve_any_generator(reg, generator_ref)
    check_base(info.meta, info.ref, base_model)
    loaded, cached = load_cached(reg, info, resolve_device(device), build_dnd_sft)
    precision = resolve_precision(precision, loaded.device)
    t_loaded = time.perf_counter()
    encoder = _encoder_for(reg, loaded.meta, loaded.device)
    t_encoder = time.perf_counter()
    condition, vectors = _embed_prompts(encoder, prompts, int(loaded.meta["prompt_tokens"]), precision)  # (P, L, C)
    sync_device(loaded.device)
    t_embedded = time.perf_counter()
    generator = loaded.model
    anchor, anchor_refs = (retrieved_anchor(reg, loaded, vectors) if loaded.task_vectors is not None
                           else (None, []))                                                    # (T, h, w)
    anchor_s = time.perf_counter() - t_embedded
    with torch.inference_mode(), autocast(precision, loaded.device):
        groups = group_prompts(condition.to(loaded.device).float(), generator.config.n_prompts)  # (G, N, L, C)
        weights = generator.weights(groups, anchor).float().cpu()                                # (T, h, w)
    state_dict, peft_config = tokens_to_state_dict(weights, loaded.layout), generator_peft_config(loaded.meta)
    under = loaded.meta.get("under")  # the adapter the generator sits on, stacked under its output
    if under:
        state_dict, peft_config = with_under(reg, loaded, state_dict, peft_config)
    t_decoded = time.perf_counter()
    vectors = vectors if pooled and loaded.meta.get("encoder") == reg.encoder_id else None
    timings = {"load_s": 0.0 if cached else t_loaded - start, "encoder_s": t_encoder - t_loaded,
               "embed_s": t_embedded - t_encoder, "decode_s": t_decoded - t_embedded,  # decode_s includes anchor_s
               "anchor_s": anchor_s, "total_s": t_decoded - start, "cached": cached,
               "generator": loaded.ref, "generator_digest": loaded.sha256, "device": str(loaded.device),
               "arch": "dnd-sft", "precision": precision}
    if anchor_refs:
        timings["anchor_adapters"] = anchor_refs
    if under:
        timings["under_adapter"] = under
    return state_dict, peft_config, timings, vectors


# the SFT-trained DnD generator behind the ``GeneratorBackend`` interface (``generator.backend``)
SFT = FunctionBackend("dnd-sft", SFT_ARTIFACT_TYPE, DEFAULT_TASKS_PER_STEP, train_dnd_sft, build_dnd_sft,
                      generate_dnd_sft)
