"""Retrieval and composition of LoRA adapters (LoraRetriever-style).

Pure math: ``retrieval.compose`` (merge k adapters into one PEFT-loadable adapter: selection,
mixture, fusion and PEFT's ``add_weighted_adapter`` strategies) and ``retrieval.routing`` (run a
mixed-task batch in one forward pass, each item through its own adapters). Registry services:
``retrieval.pool`` (the compatible pool, search), ``retrieval.composition`` and
``retrieval.routing_service``; ``retrieval.service`` gathers their public names. Import the
submodules; the package itself imports nothing (so it stays cheap).
"""
