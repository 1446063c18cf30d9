"""Retrieve and compose registry adapters, LoraRetriever-style (DESIGN.md section 6), as library calls.

This module joins the registry (SQL + FAISS + blobs) to the pure math in ``retrieval.compose`` and
``retrieval.routing``. It never prints; the CLI (``cli/retrieval_commands.py``) does.

Representation. Every adapter is represented by the normalised mean embedding of its stored prompts
(``Registry.search``); a query (one prompt or a list of prompts) is embedded and averaged the same
way, and adapters are ranked by cosine similarity (inner product of unit vectors in FAISS).

The compatible pool. A retrieval never mixes adapters that cannot be used together:

1. **base model**: ``base_model`` when given, otherwise the base model of the top hit (the best
   adapter over the whole registry once ``kind`` and ``exclude_tasks`` are applied);
2. **layout**, depending on ``match``, again relative to the top hit (within that base model):

   - ``"layout"`` (default of :func:`retrieve`): the same layout fingerprint: the same wrapped modules,
     layers, shapes and ranks, so every composition strategy applies;
   - ``"modules"``: the same target modules (``q_proj``, ``v_proj``...), any rank: enough for
     ``mixture``, ``cat``, ``selection`` and the ``*svd`` merges, which is what
     :func:`compose_adapter` uses for them (and ``"layout"`` for the equal-rank strategies);
   - ``"base"``: only the base model (per-item routing handles mixed ranks and modules);
3. **kind**: ``kind`` may be one kind or several; ``None`` means every kind except ``composed``
   (a composed adapter stores its query prompts, so it would otherwise be retrieved for its own
   query and compositions would be composed again);
4. ``exclude_tasks``: adapters of these tasks are left out (the out-of-distribution setting);
   adapters without a task are never excluded;
5. only adapters embedded with the registry's encoder (the ones in its FAISS index) count.

``k`` larger than that pool is an error that states the pool size. With ``one_per_task`` the k hits
are k distinct tasks (the best-scoring checkpoint of each), and the pool size counts tasks: the
harvested zoo keeps several checkpoints per task, which would otherwise fill the top k with copies
of the same task.
"""

from __future__ import annotations

import importlib
import json
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from registry.errors import RegistryError
from registry.prompts import prompts_sha256

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from registry.store import AdapterInfo, Registry, SearchHit
    from retrieval.compose import LoraAdapter

ALL_KINDS = ("harvested", "imported", "generated", "composed")
DEFAULT_POOL_KINDS = ("harvested", "imported", "generated")
MATCH_MODES = ("layout", "modules", "base")
WEIGHT_MODES = ("uniform", "softmax")
PEFT_PREFIX = "base_model.model."
RECIPE_PROMPTS = 5  # how many query prompts the recipe keeps verbatim (all are stored as prompts)


class RetrievalError(RegistryError, ValueError):
    """A retrieval that cannot be done as asked: bad k, empty query, a pool too small (one line)."""


# --- the query ------------------------------------------------------------------------------------


def embed_query(reg: "Registry", prompts: str | Sequence[str],
                precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Embed a query: ``(per-prompt embeddings (n, C), normalised mean (C,))`` with the registry's encoder
    (``precision``: a resolved ``fp32`` or ``bf16``)."""
    from registry.embeddings import embed_texts, mean_embedding

    texts = _query_texts(prompts)
    embeddings = embed_texts(texts, reg.encoder, precision=precision)  # (n, C), unit rows
    return embeddings, mean_embedding(embeddings)


def resolve_precision(precision: str | None) -> str:
    """The precision the query is embedded in (``registry.precision.resolve`` on the CPU, where the
    encoder runs): ``fp32`` or ``bf16``; an unknown name is a one-line ``RetrievalError``."""
    from registry.precision import PrecisionError, resolve

    try:
        return resolve(precision, "cpu")
    except PrecisionError as err:
        raise RetrievalError(str(err)) from None


def _query_texts(prompts: str | Sequence[str]) -> list[str]:
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise RetrievalError("the query holds no prompts")
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise RetrievalError("the query holds an empty prompt: every prompt must be a non-empty string")
    return texts


# --- the compatible pool ----------------------------------------------------------------------------


def _check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise RetrievalError(f"k must be at least 1, got {k}")
    return k


def _kinds(kind: str | Sequence[str] | None) -> tuple[str, ...]:
    if kind is None:
        return DEFAULT_POOL_KINDS
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if not kinds or unknown:
        raise RetrievalError(f"unknown kind {unknown[0] if unknown else ''!r}: use {', '.join(ALL_KINDS)}")
    return kinds


def _check_match(match: str) -> str:
    if match not in MATCH_MODES:
        raise RetrievalError(f"unknown match {match!r}: use one of {', '.join(MATCH_MODES)}")
    return match


def _same_as(top: "AdapterInfo", match: str) -> Callable[["AdapterInfo"], bool]:
    """The compatibility predicate relative to the top hit (the base model is filtered separately)."""
    if match == "layout":
        return lambda info: info.layout_fingerprint == top.layout_fingerprint
    if match == "modules":
        modules = sorted(top.target_modules)
        return lambda info: sorted(info.target_modules) == modules
    return lambda info: True


def _task_key(info: "AdapterInfo") -> str:
    """Adapters of one task share a key; adapters without a task each count on their own."""
    return f"task:{info.task}" if info.task is not None else f"id:{info.id}"


class _PoolCache:
    """Candidate adapters per base model, listed once (batch retrievals ask for the same pool often)."""

    def __init__(self, reg: "Registry"):
        self.reg = reg
        self._by_base: dict[str, list] = {}

    def candidates(self, base_model: str) -> list["AdapterInfo"]:
        if base_model not in self._by_base:
            self._by_base[base_model] = [info for info in self.reg.list_adapters(base_model=base_model)
                                         if info.encoder == self.reg.encoder_id]
        return self._by_base[base_model]

    def size(self, base_model: str, kinds, exclude_tasks, same: Callable, one_per_task: bool) -> int:
        eligible = [info for info in self.candidates(base_model)
                    if info.kind in kinds and (info.task is None or info.task not in exclude_tasks) and same(info)]
        return len({_task_key(info) for info in eligible}) if one_per_task else len(eligible)


def _rank(reg: "Registry", vector: np.ndarray, k: int, *, base_model: str | None, kinds: tuple[str, ...],
          exclude_tasks: Sequence[str], layout: str | None = None,
          accept: Callable[["AdapterInfo"], bool] | None = None, one_per_task: bool = False) -> list["SearchHit"]:
    """The top-k hits for ``vector`` passing every filter; filters SQL cannot express run here, with
    the FAISS fetch widened until k hits pass or the index is exhausted."""
    single_kind = kinds[0] if len(kinds) == 1 else None
    post_filter = accept is not None or one_per_task or (single_kind is None and set(kinds) != set(ALL_KINDS))
    fetch = 4 * k if post_filter else k
    while True:
        hits = reg.search(vector, fetch, base_model=base_model, kind=single_kind, exclude_tasks=exclude_tasks,
                          layout=layout)
        selected, seen = [], set()
        for hit in hits:
            info = hit.adapter
            if info.kind not in kinds or (accept is not None and not accept(info)):
                continue
            if one_per_task:
                if _task_key(info) in seen:
                    continue
                seen.add(_task_key(info))
            selected.append(hit)
            if len(selected) == k:
                return selected
        if len(hits) < fetch:
            return selected
        fetch *= 4


def _describe_pool(base: str | None, match: str, top: "AdapterInfo | None", kinds, exclude_tasks,
                   one_per_task: bool) -> str:
    parts = [f"base {base}" if base else "any base"]
    if top is not None and match != "base":
        parts.append(f"same {'layout' if match == 'layout' else 'target modules'} as top hit {top.ref}")
    parts.append(f"kind {'/'.join(kinds)}")
    if exclude_tasks:
        parts.append(f"excluding task(s) {', '.join(exclude_tasks)}")
    if one_per_task:
        parts.append("counting one per task")
    return "; ".join(parts)


def _retrieve_vector(reg: "Registry", vector: np.ndarray, k: int, *, base_model: str | None,
                     exclude_tasks: Iterable[str], kinds: tuple[str, ...], one_per_task: bool, match: str,
                     pools: _PoolCache | None = None) -> list["SearchHit"]:
    """:func:`retrieve` for an embedded query (see the module docstring for the pool rule)."""
    from registry import base_models

    exclude = sorted(set(exclude_tasks))
    base_id = base_models.base_model_id(base_model) if base_model else None
    top = _rank(reg, vector, 1, base_model=base_id, kinds=kinds, exclude_tasks=exclude)
    if not top:
        raise RetrievalError(f"k={k} is larger than the compatible pool: 0 adapters with prompts "
                             f"({_describe_pool(base_id, match, None, kinds, exclude, one_per_task)})")
    top_info = top[0].adapter
    base = base_id or top_info.base_model
    same = _same_as(top_info, match)
    pools = pools or _PoolCache(reg)
    size = pools.size(base, kinds, exclude, same, one_per_task)
    if k > size:
        unit = "task" if one_per_task else "adapter"
        raise RetrievalError(f"k={k} is larger than the compatible pool: {size} {unit}{'s' if size != 1 else ''} "
                             f"({_describe_pool(base, match, top_info, kinds, exclude, one_per_task)})")
    return _rank(reg, vector, k, base_model=base, kinds=kinds, exclude_tasks=exclude,
                 layout=top_info.layout_fingerprint if match == "layout" else None,
                 accept=same if match == "modules" else None, one_per_task=one_per_task)


def retrieve(reg: "Registry", prompts: str | Sequence[str], k: int, base_model: str | None = None,
             exclude_tasks: Iterable[str] = (), kind: str | Sequence[str] | None = None,
             one_per_task: bool = False, match: str = "layout") -> list["SearchHit"]:
    """The k adapters nearest to ``prompts`` (their mean embedding) among compatible adapters, best first.

    Compatible: same base model (``base_model``, else the top hit's) and, per ``match``, the same
    layout / target modules as the top hit; ``kind`` (default: all but ``composed``);
    ``exclude_tasks`` removed. Raises ``RetrievalError`` for ``k < 1``, an empty query, or ``k``
    larger than that pool (the message states the pool size).
    """
    _check_k(k)
    kinds, match = _kinds(kind), _check_match(match)
    _, vector = embed_query(reg, prompts)
    return _retrieve_vector(reg, vector, k, base_model=base_model, exclude_tasks=exclude_tasks, kinds=kinds,
                            one_per_task=one_per_task, match=match)


# --- composition ------------------------------------------------------------------------------------


def load_lora(reg: "Registry", ref: "str | AdapterInfo") -> "LoraAdapter":
    """A registry adapter as a ``LoraAdapter`` (scaling from its config: r, lora_alpha, use_rslora).

    Keys get PEFT's ``base_model.model.`` prefix when they lack it, so adapters stored either way compose.
    """
    from retrieval.compose import CompositionError, LoraAdapter

    info = reg.resolve(ref) if isinstance(ref, str) else ref
    state_dict, config = reg.load_weights(info.ref)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CompositionError(f"{info.ref}: adapters with rank_pattern/alpha_pattern cannot be composed")
    if config.get("use_dora"):
        raise CompositionError(f"{info.ref}: DoRA adapters cannot be composed")
    state_dict = {key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key: value
                  for key, value in state_dict.items()}
    return LoraAdapter(state_dict=state_dict, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                       use_rslora=bool(config.get("use_rslora", False)), base_model=info.base_model,
                       name=info.ref, extra_config={"task_type": config.get("task_type") or "CAUSAL_LM"})


def _check_strategy(strategy: str, weights_mode: str = "uniform") -> None:
    from retrieval.compose import STRATEGIES, CompositionError

    if strategy not in STRATEGIES:
        raise CompositionError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if weights_mode not in WEIGHT_MODES:
        raise CompositionError(f"unknown weights mode {weights_mode!r}: use 'uniform' or 'softmax'")


def _json_safe(config: dict) -> dict:
    return json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


def _compose_infos(reg: "Registry", infos: Sequence["AdapterInfo"], weights: Sequence[float], strategy: str,
                   **strategy_kwargs) -> tuple[dict, dict, list[tuple[str, float]]]:
    """Load, compose, and return ``(state_dict, peft_config, parents)`` for explicit weights."""
    from retrieval.compose import compose_adapters, peft_config_dict

    adapters = [load_lora(reg, info) for info in infos]
    composed = compose_adapters(adapters, list(weights), strategy, **strategy_kwargs)
    if strategy == "selection":
        parents = [(composed.name, 1.0)]  # the chosen adapter (compose keeps its name, the REF)
    else:
        parents = [(info.ref, float(weight)) for info, weight in zip(infos, weights)]
    return dict(composed.state_dict), _json_safe(peft_config_dict(composed)), parents


def compose_from_hits(reg: "Registry", hits: Sequence["SearchHit"], strategy: str = "mixture",
                      weights_mode: str = "uniform", temperature: float = 1.0, density: float | None = None,
                      svd_rank: int | None = None, seed: int | None = None,
                      **strategy_kwargs) -> tuple[dict, dict, list[tuple[str, float]]]:
    """Compose retrieved adapters: ``(state_dict, peft_config, parents [(REF, weight)])``, PEFT-loadable.

    Weights are ``1/k`` (``uniform``) or ``softmax(score / temperature)``. Adapters of different base
    models or target modules raise ``CompositionError``; equal-rank strategies (``fusion``,
    ``linear``, ``ties``, ``dare_*``, ``magnitude_prune``) refuse different ranks while ``mixture``,
    ``cat`` and the ``*svd`` merges take them. ``selection`` records the chosen adapter as sole parent.
    """
    from retrieval.compose import CompositionError, retrieval_weights

    _check_strategy(strategy, weights_mode)
    if not hits:
        raise CompositionError("no adapters to compose (k == 0)")
    weights = retrieval_weights([hit.score for hit in hits], weights_mode, temperature).tolist()
    return _compose_infos(reg, [hit.adapter for hit in hits], weights, strategy, density=density,
                          svd_rank=svd_rank, seed=seed, **strategy_kwargs)


def _match_for(strategy: str) -> str:
    from retrieval.compose import EQUAL_RANK_STRATEGIES

    return "layout" if strategy in EQUAL_RANK_STRATEGIES else "modules"


def _strategy_recipe(density, svd_rank, seed, strategy_kwargs) -> dict:
    extra = {"density": density, "svd_rank": svd_rank, "seed": seed, **strategy_kwargs}
    return {key: value for key, value in extra.items() if value is not None}


def compose_adapter(reg: "Registry", prompts: str | Sequence[str], k: int = 3, strategy: str = "mixture",
                    name: str | None = None, *, exclude_tasks: Iterable[str] = (), weights_mode: str = "uniform",
                    temperature: float = 1.0, task: str | None = None, base_model: str | None = None,
                    kind: str | Sequence[str] | None = None, one_per_task: bool = False,
                    match: str | None = None, density: float | None = None, svd_rank: int | None = None,
                    seed: int | None = None, tags: Iterable[str] = (), precision: str | None = None,
                    **strategy_kwargs) -> "AdapterInfo":
    """Retrieve the k adapters nearest to ``prompts``, compose them and store a ``composed`` adapter.

    The new version records lineage (parents with their weights) and a recipe: ``strategy``, ``k``,
    ``weights_mode`` (+ ``temperature``), ``query_prompts_sha256`` (:func:`prompts_sha256`), the first
    few ``query_prompts``, ``scores``, ``retrieved`` REFs, ``exclude_tasks``, the strategy arguments and
    ``timing_s`` (retrieve / compose; storing is the rest of the call). Its prompts are the query
    prompts, so it is searchable.
    ``match`` defaults to ``"layout"`` for equal-rank strategies and ``"modules"`` otherwise.
    ``precision`` (``auto`` when None, ``fp32``, ``bf16``; recorded in the recipe) is the one the query
    is embedded in; the composition itself is weight arithmetic (sums, SVDs) and stays float32.
    Nothing is written when anything fails.
    """
    from registry.refs import validate_name

    _check_k(k)
    _check_strategy(strategy, weights_mode)
    precision = resolve_precision(precision)
    kinds = _kinds(kind)
    match = _check_match(match or _match_for(strategy))
    texts = _query_texts(prompts)
    digest = prompts_sha256(texts)
    name = validate_name(name or f"composed-{strategy}-{digest[:10]}")
    exclude = sorted(set(exclude_tasks))

    start = time.perf_counter()
    embeddings, vector = embed_query(reg, texts, precision)
    hits = _retrieve_vector(reg, vector, k, base_model=base_model, exclude_tasks=exclude, kinds=kinds,
                            one_per_task=one_per_task, match=match)
    retrieved = time.perf_counter()
    state_dict, peft_config, parents = compose_from_hits(reg, hits, strategy, weights_mode, temperature,
                                                         density=density, svd_rank=svd_rank, seed=seed,
                                                         **strategy_kwargs)
    composed = time.perf_counter()
    recipe = {
        "strategy": strategy,
        "k": k,
        "weights_mode": weights_mode,
        **({"temperature": temperature} if weights_mode == "softmax" else {}),
        "query_prompts_sha256": digest,
        "query_prompts": texts[:RECIPE_PROMPTS],
        "n_query_prompts": len(texts),
        "scores": [round(hit.score, 6) for hit in hits],
        "retrieved": [hit.adapter.ref for hit in hits],
        "retrieved_tasks": [hit.adapter.task for hit in hits],
        "exclude_tasks": exclude,
        "one_per_task": one_per_task,
        "match": match,
        "kinds": list(kinds),
        "encoder": reg.encoder_id,
        "precision": precision,
        **_strategy_recipe(density, svd_rank, seed, strategy_kwargs),
        "timing_s": {"retrieve": round(retrieved - start, 4), "compose": round(composed - retrieved, 4)},
    }
    return reg.add_weights(name, state_dict, peft_config, kind="composed", task=task, prompts=texts,
                           prompt_embeddings=embeddings, recipe=recipe, parents=parents, tags=tags)


def compose_refs(reg: "Registry", refs: Sequence[str], weights: Sequence[float] | None = None,
                 strategy: str = "mixture", name: str | None = None, *, prompts: Sequence[str] | None = None,
                 task: str | None = None, density: float | None = None, svd_rank: int | None = None,
                 seed: int | None = None, tags: Iterable[str] = (), **strategy_kwargs) -> "AdapterInfo":
    """Compose explicitly named adapters (``registry compose --from a@1 --from b@2``) and store the result.

    ``weights`` default to uniform ``1/len(refs)``. The stored prompts are ``prompts`` or, by default,
    the parents' own prompts (so the result is searchable). Nothing is written when anything fails.
    """
    from registry.refs import validate_name
    from retrieval.compose import CompositionError

    _check_strategy(strategy)
    refs = list(refs)
    if not refs:
        raise CompositionError("no adapters to compose: give at least one REF")
    if weights is None or len(weights) == 0:
        weights = [1.0 / len(refs)] * len(refs)
    weights = [float(w) for w in weights]
    if len(weights) != len(refs):
        raise CompositionError(f"got {len(weights)} weights for {len(refs)} adapters")
    infos = [reg.resolve(ref) for ref in refs]
    name = validate_name(name or f"composed-{strategy}-{prompts_sha256([i.digest for i in infos])[:10]}")

    start = time.perf_counter()
    state_dict, peft_config, parents = _compose_infos(reg, infos, weights, strategy, density=density,
                                                      svd_rank=svd_rank, seed=seed, **strategy_kwargs)
    composed = time.perf_counter()
    texts, embeddings = _parent_prompts(reg, infos) if prompts is None else (_query_texts(prompts), None)
    recipe = {"strategy": strategy, "refs": [info.ref for info in infos], "weights": weights,
              **_strategy_recipe(density, svd_rank, seed, strategy_kwargs),
              "timing_s": {"compose": round(composed - start, 4)}}
    return reg.add_weights(name, state_dict, peft_config, kind="composed", task=task, prompts=texts,
                           prompt_embeddings=embeddings, recipe=recipe, parents=parents, tags=tags)


def _parent_prompts(reg: "Registry", infos: Sequence["AdapterInfo"], limit: int = 64
                    ) -> tuple[list[str], np.ndarray | None]:
    """The parents' stored prompts (deduplicated, at most ``limit``) and, when all were embedded by this
    registry's encoder, their stored embeddings (no re-encoding)."""
    texts, vectors, seen = [], [], set()
    reuse = all(info.encoder == reg.encoder_id for info in infos)
    for info in infos:
        stored = reg.prompts(info.ref)
        embedded = reg.prompt_embeddings(info.ref) if reuse and stored else None
        for index, text in enumerate(stored):
            if text in seen or len(texts) >= limit:
                continue
            seen.add(text)
            texts.append(text)
            if embedded is not None:
                vectors.append(embedded[index])
    return texts, (np.stack(vectors) if reuse and vectors else None)


# --- tasks (from the harvest side) -------------------------------------------------------------------


def _harvest(module: str):
    try:
        return importlib.import_module(f"harvest.{module}")
    except ModuleNotFoundError as err:
        raise RegistryError(f"this needs the harvest package (harvest.{module}), which is not available: "
                            f"{err}; give prompts with --prompts FILE instead") from None


# --- routing: mixed-task batches -----------------------------------------------------------------------


@dataclass
class RoutedItem:
    """One batch item's retrieved adapters and their mixture weights."""

    prompt: str
    hits: list = field(default_factory=list)  # list[SearchHit], best first
    weights: list[float] = field(default_factory=list)

    @property
    def route(self) -> list[tuple[str, float]]:
        """``[(REF, weight)]``: the item's row of the batch x pool mapping matrix."""
        return [(hit.adapter.ref, weight) for hit, weight in zip(self.hits, self.weights)]

    @property
    def refs(self) -> list[str]:
        return [hit.adapter.ref for hit in self.hits]


def model_base_id(model) -> str | None:
    """The registry base-model id of a loaded HF model (from the folder it was loaded from), if known."""
    from registry import base_models

    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return base_models.base_model_id(name) if name else None


def route_plan(reg: "Registry", prompts: Sequence[str], k: int = 1, *, base_model: str | None = None,
               exclude_tasks_per_item: Sequence[Iterable[str]] | None = None, weights_mode: str = "uniform",
               temperature: float = 1.0, kind: str | Sequence[str] | None = None, one_per_task: bool = False,
               match: str = "base") -> list[RoutedItem]:
    """Retrieve k adapters per item (each item embedded alone) with its mixture weights.

    ``match="base"`` by default: an item's adapters only need the same base model, since routing
    handles different ranks and target modules.
    """
    from retrieval.compose import retrieval_weights
    from registry.embeddings import embed_texts

    _check_k(k)
    kinds, match = _kinds(kind), _check_match(match)
    texts = _query_texts(prompts)
    if weights_mode not in WEIGHT_MODES:
        raise RetrievalError(f"unknown weights mode {weights_mode!r}: use 'uniform' or 'softmax'")
    if exclude_tasks_per_item is not None and len(exclude_tasks_per_item) != len(texts):
        raise RetrievalError(f"{len(texts)} items but {len(exclude_tasks_per_item)} exclude-task lists")
    vectors = embed_texts(texts, reg.encoder)  # (B, C): each item alone, unit rows
    pools = _PoolCache(reg)
    plan = []
    for index, (text, vector) in enumerate(zip(texts, vectors)):
        exclude = exclude_tasks_per_item[index] if exclude_tasks_per_item is not None else ()
        hits = _retrieve_vector(reg, vector, k, base_model=base_model, exclude_tasks=exclude, kinds=kinds,
                                one_per_task=one_per_task, match=match, pools=pools)
        weights = retrieval_weights([hit.score for hit in hits], weights_mode, temperature).tolist()
        plan.append(RoutedItem(text, hits, weights))
    return plan


def plan_pool(reg: "Registry", plan: Sequence[RoutedItem]):
    """The ``LoraPool`` of every adapter the plan uses, each loaded once, keyed by REF."""
    from retrieval.routing import build_lora_pool

    refs = list(dict.fromkeys(ref for item in plan for ref in item.refs))
    infos = {hit.adapter.ref: hit.adapter for item in plan for hit in item.hits}
    return build_lora_pool({ref: load_lora(reg, infos[ref]) for ref in refs})


def _generate_routed(model, tokenizer, pool, plan: Sequence[RoutedItem], max_new_tokens: int,
                     batch_size: int | None, chat: bool | None = None) -> list[str]:
    """Greedy completions of the plan's prompts, ``batch_size`` items per forward pass."""
    from registry.chat import render_prompt, uses_chat
    from retrieval.routing import route_generate

    chat = uses_chat(tokenizer) if chat is None else chat
    # with chat, route_generate renders the template itself; without, the plain rendering is done here
    prompts = [item.prompt if chat else render_prompt(tokenizer, item.prompt, chat=False) for item in plan]
    batch_size = batch_size or len(plan)
    outputs: list[str] = []
    for first in range(0, len(plan), batch_size):
        chunk = plan[first:first + batch_size]
        outputs += route_generate(model, tokenizer, pool, [item.route for item in chunk],
                                  prompts[first:first + batch_size], max_new_tokens=max_new_tokens, chat=chat)
    return [output.strip() for output in outputs]


def route_items(reg: "Registry", model, tokenizer, prompts: Sequence[str], k: int = 1, *,
                exclude_tasks_per_item: Sequence[Iterable[str]] | None = None, weights_mode: str = "uniform",
                temperature: float = 1.0, base_model: str | None = None, kind: str | Sequence[str] | None = None,
                one_per_task: bool = False, max_new_tokens: int = 32, batch_size: int | None = None,
                chat: bool | None = None) -> list[str]:
    """Answer a mixed-task batch: retrieve k adapters per item, run the items together, each through the
    ``mixture`` of its own adapters (LoraRetriever's batched mapping, ``retrieval.routing``).

    ``model`` is the plain base model (not a PeftModel); ``base_model`` defaults to the model's own
    id. Prompts go through the chat template when the tokenizer has one (``chat``), as the harvest
    trains and evaluates; greedy decoding; ``batch_size`` items per pass (default: all at once).
    """
    plan = route_plan(reg, prompts, k, base_model=base_model or model_base_id(model),
                      exclude_tasks_per_item=exclude_tasks_per_item, weights_mode=weights_mode,
                      temperature=temperature, kind=kind, one_per_task=one_per_task)
    return _generate_routed(model, tokenizer, plan_pool(reg, plan), plan, max_new_tokens, batch_size, chat)


def _interleave(tasks, n_per_task: int) -> list[tuple[Any, Any]]:
    """(task, example) pairs, round-robin over the tasks so every batch mixes tasks."""
    columns = [[(task, example) for example in task.split("test")[:n_per_task]] for task in tasks]
    items = []
    for row in range(max((len(column) for column in columns), default=0)):
        items += [column[row] for column in columns if row < len(column)]
    return items


def routed_accuracy(reg: "Registry", tasks: Sequence[Any], n_per_task: int = 10, k: int = 1, *,
                    base: str | None = None, model=None, tokenizer=None, batch_size: int = 16,
                    exclude_own: bool = False, weights_mode: str = "uniform", temperature: float = 1.0,
                    kind: str | Sequence[str] | None = None, one_per_task: bool = False,
                    max_new_tokens: int | None = None, one_by_one: bool = True, with_base: bool = False,
                    device: str | None = None) -> dict:
    """Accuracy of per-item routing on a mixed batch of several tasks' test items, and its throughput.

    Items (the first ``n_per_task`` test examples of each task, interleaved) are routed through their
    own k retrieved adapters (mixture; ``exclude_own`` removes each item's own task from its pool,
    the out-of-distribution setting) and scored with their task's metric. Reports accuracy per task
    and overall, the retrieval top-1 hit rate (top adapter of the item's own task), and items/s of
    the routed batches vs the same items one by one (same adapters; pool stacked once; retrieval
    timed apart). ``with_base`` adds the base model's accuracy on the same items.
    """
    from registry import base_models

    metrics = _harvest("metrics")
    _check_k(k)
    if not tasks:
        raise RetrievalError("no tasks to evaluate")
    if n_per_task < 1:
        raise RetrievalError(f"n_per_task must be at least 1, got {n_per_task}")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise RetrievalError(f"tasks are given twice: {sorted(n for n, c in Counter(names).items() if c > 1)}")
    items = _interleave(tasks, n_per_task)
    if not items:
        raise RetrievalError("the tasks have no test items")
    if model is None:
        model, tokenizer = base_models.load_base(base, device=device)
    elif tokenizer is None:
        raise RetrievalError("pass the tokenizer together with the model")
    if max_new_tokens is None:
        evaluate = _harvest("evaluate")
        max_new_tokens = max(task.info.max_new_tokens
                             or evaluate.default_max_new_tokens(tokenizer, task.split("test")[:n_per_task])
                             for task in tasks)

    start = time.perf_counter()
    plan = route_plan(reg, [example.prompt for _, example in items], k, base_model=model_base_id(model),
                      exclude_tasks_per_item=[[task.name] if exclude_own else [] for task, _ in items],
                      weights_mode=weights_mode, temperature=temperature, kind=kind, one_per_task=one_per_task)
    retrieve_s = time.perf_counter() - start
    pool = plan_pool(reg, plan)

    start = time.perf_counter()
    outputs = _generate_routed(model, tokenizer, pool, plan, max_new_tokens, batch_size)
    batched_s = time.perf_counter() - start
    result_items = []
    per_task: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0.0, "top1_own_task": 0})
    for (task, example), item, output in zip(items, plan, outputs):
        score = metrics.score(task.metric, output, example.answer)
        own = item.hits[0].adapter.task == task.name
        stats = per_task[task.name]
        stats["n"] += 1
        stats["correct"] += score
        stats["top1_own_task"] += int(own)
        result_items.append({"task": task.name, "prompt": example.prompt, "answer": example.answer,
                             "prediction": output, "score": score, "route": item.route,
                             "retrieved_tasks": [hit.adapter.task for hit in item.hits]})

    throughput = {"items": len(items), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                  "retrieve_seconds": retrieve_s, "batched_seconds": batched_s,
                  "batched_items_per_s": len(items) / batched_s}
    if one_by_one:
        start = time.perf_counter()
        singles = [_generate_routed(model, tokenizer, pool, [item], max_new_tokens, 1)[0] for item in plan]
        single_s = time.perf_counter() - start
        throughput |= {"one_by_one_seconds": single_s, "one_by_one_items_per_s": len(items) / single_s,
                       "speedup": single_s / batched_s,
                       "one_by_one_agreement": sum(a == b for a, b in zip(singles, outputs)) / len(items)}

    total = len(items)
    report = {
        "k": k, "exclude_own": exclude_own, "weights_mode": weights_mode, "n_per_task": n_per_task,
        "items": total,
        "accuracy": sum(item["score"] for item in result_items) / total,
        "retrieval_top1": sum(s["top1_own_task"] for s in per_task.values()) / total,
        "per_task": {name: {"n": s["n"], "accuracy": s["correct"] / s["n"],
                            "retrieval_top1": s["top1_own_task"] / s["n"]} for name, s in per_task.items()},
        "throughput": throughput,
        "predictions": result_items,
    }
    if with_base:
        evaluate = _harvest("evaluate")
        prompts = [example.prompt for _, example in items]
        base_outputs, _ = evaluate.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size)
        base_scores = [metrics.score(task.metric, output, example.answer)
                       for (task, example), output in zip(items, base_outputs)]
        report["base_accuracy"] = sum(base_scores) / total
        for name in report["per_task"]:
            scores = [s for (task, _), s in zip(items, base_scores) if task.name == name]
            report["per_task"][name]["base_accuracy"] = sum(scores) / len(scores)
    return report


# --- retrieval quality -------------------------------------------------------------------------------


def retrieval_accuracy(reg: "Registry", tasks: dict[str, Sequence[str]], k: int = 3, exclude_own: bool = False,
                       *, base_model: str | None = None, kind: str | Sequence[str] | None = "harvested",
                       one_per_task: bool = True, match: str = "base") -> dict:
    """How often retrieval finds each test prompt's own task: top-1 accuracy and recall@k.

    ``tasks`` maps a task name to its test prompts (not the prompts stored with its adapters). Each
    prompt is embedded alone. With ``one_per_task`` (default) the k hits are k distinct tasks (the
    best checkpoint of each), so recall@k asks "is the own task among the k nearest tasks" rather
    than counting several checkpoints of one task. ``exclude_own`` removes the prompt's own task from
    the pool: accuracy and recall are then 0 by construction and are reported as ``None``; the
    ``neighbours`` table (top-1 retrieved task per own task) is the useful output. ``kind`` defaults to
    ``harvested`` (the zoo).
    """
    from registry.embeddings import embed_texts

    _check_k(k)
    kinds, match = _kinds(kind), _check_match(match)
    if not tasks:
        raise RetrievalError("no tasks given")
    pairs = [(task, prompt) for task, prompts in tasks.items() for prompt in prompts]
    if not pairs:
        raise RetrievalError("the tasks hold no test prompts")
    texts = _query_texts([prompt for _, prompt in pairs])
    vectors = embed_texts(texts, reg.encoder)  # (n, C): each prompt alone
    pools = _PoolCache(reg)
    per_task: dict[str, dict] = {name: {"n": 0, "top1": 0, "recall": 0} for name in tasks}
    neighbours: dict[str, Counter] = {name: Counter() for name in tasks}
    latencies = []
    for (task, _), vector in zip(pairs, vectors):
        start = time.perf_counter()
        hits = _retrieve_vector(reg, vector, k, base_model=base_model, exclude_tasks=[task] if exclude_own else [],
                                kinds=kinds, one_per_task=one_per_task, match=match, pools=pools)
        latencies.append(time.perf_counter() - start)
        stats = per_task[task]
        stats["n"] += 1
        stats["top1"] += int(hits[0].adapter.task == task)
        stats["recall"] += int(task in {hit.adapter.task for hit in hits})
        neighbours[task][hits[0].adapter.task] += 1
    total = len(pairs)
    recall_key = f"recall@{k}"
    return {
        "k": k, "n": total, "exclude_own": exclude_own, "one_per_task": one_per_task,
        "top1_accuracy": None if exclude_own else sum(s["top1"] for s in per_task.values()) / total,
        recall_key: None if exclude_own else sum(s["recall"] for s in per_task.values()) / total,
        "per_task": {name: {"n": s["n"],
                            "top1_accuracy": None if exclude_own or not s["n"] else s["top1"] / s["n"],
                            recall_key: None if exclude_own or not s["n"] else s["recall"] / s["n"]}
                     for name, s in per_task.items()},
        "neighbours": {name: dict(counter.most_common()) for name, counter in neighbours.items()},
        "search_ms_p50": 1000 * statistics.median(latencies),
    }
