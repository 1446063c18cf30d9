"""Retrieval and composition of LoRA adapters (LoraRetriever-style), as pure library code.

``retrieval.compose``: merge k adapters into one PEFT-loadable adapter (selection, mixture, fusion and
PEFT's ``add_weighted_adapter`` strategies). ``retrieval.routing``: run a mixed-task batch in one
forward pass, each item through its own adapters. Names are imported lazily, so importing the package
(e.g. for a sibling module) does not pull in torch or peft.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "compose": [
        "STRATEGIES",
        "CompositionError",
        "LoraAdapter",
        "compose_adapters",
        "composed_delta_weights",
        "load_adapter_dir",
        "peft_config_dict",
        "retrieval_weights",
        "save_adapter_dir",
    ],
    "routing": [
        "LoraPool",
        "RoutingError",
        "build_lora_pool",
        "route_forward",
        "route_generate",
        "route_generate_ids",
        "routed_lora",
        "routing_matrix",
        "routing_throughput",
    ],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    """Import ``retrieval.<module>`` on first access of one of its public names."""
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"retrieval.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
