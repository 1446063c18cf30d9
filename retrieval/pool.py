"""The retrieval pool and search: which registry adapters a query may retrieve, best first
(LoraRetriever-style, DESIGN.md section 6). Used by composition (``retrieval.composition``) and
per-item routing (``retrieval.routing_service``). It never prints; the CLI does.

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

from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from registry.errors import RegistryError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from registry.store import AdapterInfo, Registry, SearchHit

ALL_KINDS = ("harvested", "imported", "generated", "composed")
DEFAULT_POOL_KINDS = ("harvested", "imported", "generated")
MATCH_MODES = ("layout", "modules", "base")
WEIGHT_MODES = ("uniform", "softmax")


class RetrievalError(RegistryError, ValueError):
    """A retrieval that cannot be done as asked: bad k, empty query, a pool too small (one line)."""


# --- the query ------------------------------------------------------------------------------------


def embed_query(reg: "Registry", prompts: str | Sequence[str],
                precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Embed a query: ``(per-prompt embeddings (n, C), normalised mean (C,))`` with the registry's encoder
    (``precision``: a resolved ``fp32`` or ``bf16``)."""
    from registry.embeddings import embed_texts, mean_embedding

    texts = query_texts(prompts)
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


def query_texts(prompts: str | Sequence[str]) -> list[str]:
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise RetrievalError("the query holds no prompts")
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise RetrievalError("the query holds an empty prompt: every prompt must be a non-empty string")
    return texts


# --- the compatible pool ----------------------------------------------------------------------------


def check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise RetrievalError(f"k must be at least 1, got {k}")
    return k


def pool_kinds(kind: str | Sequence[str] | None) -> tuple[str, ...]:
    if kind is None:
        return DEFAULT_POOL_KINDS
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if not kinds or unknown:
        raise RetrievalError(f"unknown kind {unknown[0] if unknown else ''!r}: use {', '.join(ALL_KINDS)}")
    return kinds


def check_match(match: str) -> str:
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


class PoolCache:
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


def retrieve_vector(reg: "Registry", vector: np.ndarray, k: int, *, base_model: str | None,
                     exclude_tasks: Iterable[str], kinds: tuple[str, ...], one_per_task: bool, match: str,
                     pools: PoolCache | None = None) -> list["SearchHit"]:
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
    pools = pools or PoolCache(reg)
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
    check_k(k)
    kinds, match = pool_kinds(kind), check_match(match)
    _, vector = embed_query(reg, prompts)
    return retrieve_vector(reg, vector, k, base_model=base_model, exclude_tasks=exclude_tasks, kinds=kinds,
                            one_per_task=one_per_task, match=match)
