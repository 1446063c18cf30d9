"""Composition as a registry service: retrieve the nearest adapters (``retrieval.pool``), merge them
with the pure functions of ``retrieval.compose``, store a ``composed`` adapter with its lineage and
recipe. Nothing is written when anything fails."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from registry.prompts import prompts_sha256
from retrieval.pool import (WEIGHT_MODES, RetrievalError, check_k, check_match, embed_query, pool_kinds, query_texts,
                            resolve_precision, retrieve_vector)

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from registry.store import AdapterInfo, Registry, SearchHit
    from retrieval.compose import LoraAdapter

PEFT_PREFIX = "base_model.model."
RECIPE_PROMPTS = 5  # how many query prompts the recipe keeps verbatim (all are stored as prompts)


# --- composition ------------------------------------------------------------------------------------


def load_lora(reg: "Registry", ref: "str | AdapterInfo") -> "LoraAdapter":
    """A registry adapter as a ``LoraAdapter`` (scaling from its config: r, lora_alpha, use_rslora).

    Keys get PEFT's ``base_model.model.`` prefix when they lack it, so adapters stored either way compose.
    """
    from retrieval.compose import CompositionError

    info = reg.resolve(ref) if isinstance(ref, str) else ref
    state_dict, config = reg.load_weights(info.ref)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CompositionError(f"{info.ref}: adapters with rank_pattern/alpha_pattern cannot be composed")
    if config.get("use_dora"):
        raise CompositionError(f"{info.ref}: DoRA adapters cannot be composed")
    state_dict = {key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key: value
                  for key, value in state_dict.items()}
    return lora_with_config(state_dict, config, info.ref, info.base_model)


def lora_with_config(state_dict: dict, config: dict, name: str, base_model: str | None) -> "LoraAdapter":
    """A PEFT state dict and its adapter_config as a ``LoraAdapter`` (r, lora_alpha, use_rslora, task type)."""
    from retrieval.compose import LoraAdapter

    return LoraAdapter(state_dict=state_dict, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                       use_rslora=bool(config.get("use_rslora", False)), base_model=base_model,
                       name=name, extra_config={"task_type": config.get("task_type") or "CAUSAL_LM"})


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


def add_adapters(reg: "Registry", state_dict: dict, peft_config: dict, added: Sequence["str | LoraAdapter"]
                 ) -> tuple[dict, dict, list[tuple[str, float]]]:
    """A composed adapter plus the ``added`` adapters at full weight: ``ΔW = ΔW_composed + Σ ΔW_added``,
    their factors stacked along the rank (``cat``, weights 1). This puts a generic adapter (the
    multitask LoRA) under a retrieved one: on the paraphrase split the selected adapter plus the
    multitask LoRA beat both alone (README). ``added``: REFs, or adapters already loaded
    (:func:`load_lora`). Returns ``(state_dict, peft_config, added parents)``."""
    from retrieval.compose import compose_adapters, peft_config_dict

    composed = lora_with_config(state_dict, peft_config, "composed", peft_config.get("base_model_name_or_path"))
    extras = [load_lora(reg, ref) if isinstance(ref, str) else ref for ref in added]
    summed = compose_adapters([composed, *extras], [1.0] * (1 + len(extras)), "cat")
    return dict(summed.state_dict), _json_safe(peft_config_dict(summed)), [(a.name, 1.0) for a in extras]


def added_alone(loras: Sequence["LoraAdapter"]) -> tuple[dict, dict]:
    """The added adapters summed (ranks stacked, weights 1): what a gated composition falls back to."""
    from retrieval.compose import compose_adapters, peft_config_dict

    summed = loras[0] if len(loras) == 1 else compose_adapters(list(loras), [1.0] * len(loras), "cat")
    return dict(summed.state_dict), _json_safe(peft_config_dict(summed))


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
                    add: Sequence[str] = (), gate: bool = False, **strategy_kwargs) -> "AdapterInfo":
    """Retrieve the k adapters nearest to ``prompts``, compose them and store a ``composed`` adapter.

    The new version records lineage (parents with their weights) and a recipe: ``strategy``, ``k``,
    ``weights_mode`` (+ ``temperature``), ``query_prompts_sha256`` (:func:`prompts_sha256`), the first
    few ``query_prompts``, ``scores``, ``retrieved`` REFs, ``exclude_tasks``, the strategy arguments and
    ``timing_s`` (retrieve / compose; storing is the rest of the call). Its prompts are the query
    prompts, so it is searchable.
    ``match`` defaults to ``"layout"`` for equal-rank strategies and ``"modules"`` otherwise.
    ``precision`` (``auto`` when None, ``fp32``, ``bf16``; recorded in the recipe) is the one the query
    is embedded in; the composition itself is weight arithmetic (sums, SVDs) and stays float32.
    ``add`` names adapters summed at full weight onto the composition (:func:`add_adapters`; recorded
    as parents with weight 1 and in the recipe's ``added``). With ``gate`` (needs ``add``) the
    composition is kept only if the base answers ``prompts`` more surely with it than with the added
    adapters alone (``registry.confidence.entropy_gate``); otherwise the stored adapter is the added
    ones alone. The recipe's ``gate`` records both entropies and which was kept.
    Nothing is written when anything fails.
    """
    from registry.refs import validate_name

    check_k(k)
    if gate and not add:
        raise RetrievalError("the entropy gate chooses between a composition and the --add adapters: give --add")
    added = [reg.resolve(ref).ref for ref in add]  # an unknown REF fails before anything is computed
    _check_strategy(strategy, weights_mode)
    precision = resolve_precision(precision)
    kinds = pool_kinds(kind)
    match = check_match(match or _match_for(strategy))
    texts = query_texts(prompts)
    digest = prompts_sha256(texts)
    name = validate_name(name or f"composed-{strategy}-{digest[:10]}")
    exclude = sorted(set(exclude_tasks))

    start = time.perf_counter()
    embeddings, vector = embed_query(reg, texts, precision)
    hits = retrieve_vector(reg, vector, k, base_model=base_model, exclude_tasks=exclude, kinds=kinds,
                            one_per_task=one_per_task, match=match)
    retrieved = time.perf_counter()
    state_dict, peft_config, parents = compose_from_hits(reg, hits, strategy, weights_mode, temperature,
                                                         density=density, svd_rank=svd_rank, seed=seed,
                                                         **strategy_kwargs)
    gate_record = None
    if added:
        extras = [load_lora(reg, ref) for ref in added]  # read once: summed on, and the gate's fallback
        fallback = added_alone(extras) if gate else None
        state_dict, peft_config, added_parents = add_adapters(reg, state_dict, peft_config, extras)
        parents = [*parents, *added_parents]
        if gate:
            from registry.confidence import entropy_gate

            gate_start = time.perf_counter()
            keep, entropies = entropy_gate(hits[0].adapter.base_model, texts, fallback, (state_dict, peft_config))
            gate_record = {"signal": "first-token entropy", **entropies, "kept": "composition" if keep else "added",
                           "seconds": round(time.perf_counter() - gate_start, 4)}
            if not keep:
                state_dict, peft_config = fallback
                parents = added_parents
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
        **({"added": added} if added else {}),
        **({"gate": gate_record} if gate_record else {}),
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
    texts, embeddings = _parent_prompts(reg, infos) if prompts is None else (query_texts(prompts), None)
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
