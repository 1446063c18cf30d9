"""Retrieval, composition and routing as registry services: the names callers import.

- ``retrieval.pool``: the compatible pool and the search (``retrieve``; the pool rule is in its
  docstring);
- ``retrieval.composition``: retrieve + compose + store a ``composed`` adapter (``compose_adapter``,
  ``compose_refs``, ``compose_from_hits``, ``load_lora``);
- ``retrieval.routing_service``: per-item routing of a mixed-task batch (``route_plan``,
  ``route_items``).

The accuracy measurements (``retrieval_accuracy``, ``routed_accuracy``) use task data and live in
``evaluation.accuracy``.
"""

from __future__ import annotations

from registry.prompts import prompts_sha256
from retrieval.composition import compose_adapter, compose_from_hits, compose_refs, load_lora
from retrieval.pool import (ALL_KINDS, DEFAULT_POOL_KINDS, MATCH_MODES, WEIGHT_MODES, RetrievalError, embed_query,
                            resolve_precision, retrieve)
from retrieval.routing_service import RoutedItem, model_base_id, plan_pool, route_items, route_plan

__all__ = ["ALL_KINDS", "DEFAULT_POOL_KINDS", "MATCH_MODES", "WEIGHT_MODES", "RetrievalError", "RoutedItem",
           "compose_adapter", "compose_from_hits", "compose_refs", "embed_query", "load_lora", "model_base_id",
           "plan_pool", "prompts_sha256", "resolve_precision", "retrieve", "route_items", "route_plan"]
