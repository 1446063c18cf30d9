"""Per-item routing as a registry service: retrieve k adapters for each item of a mixed-task batch
(``retrieval.pool``) and run the batch in one forward pass, each item through the mixture of its
own adapters (``retrieval.routing``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from retrieval.composition import load_lora
from retrieval.pool import (WEIGHT_MODES, PoolCache, RetrievalError, check_k, check_match, pool_kinds, query_texts,
                            retrieve_vector)

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from registry.store import Registry


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

    check_k(k)
    kinds, match = pool_kinds(kind), check_match(match)
    texts = query_texts(prompts)
    if weights_mode not in WEIGHT_MODES:
        raise RetrievalError(f"unknown weights mode {weights_mode!r}: use 'uniform' or 'softmax'")
    if exclude_tasks_per_item is not None and len(exclude_tasks_per_item) != len(texts):
        raise RetrievalError(f"{len(texts)} items but {len(exclude_tasks_per_item)} exclude-task lists")
    vectors = embed_texts(texts, reg.encoder)  # (B, C): each item alone, unit rows
    pools = PoolCache(reg)
    plan = []
    for index, (text, vector) in enumerate(zip(texts, vectors)):
        exclude = exclude_tasks_per_item[index] if exclude_tasks_per_item is not None else ()
        hits = retrieve_vector(reg, vector, k, base_model=base_model, exclude_tasks=exclude, kinds=kinds,
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


def generate_routed(model, tokenizer, pool, plan: Sequence[RoutedItem], max_new_tokens: int,
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
    return generate_routed(model, tokenizer, plan_pool(reg, plan), plan, max_new_tokens, batch_size, chat)
