"""Prompt -> LoRA generation: a Drag-and-Drop (DnD) hyper-convolutional decoder and ICM-LoRA's CVAE.

- ``tokenizer``: PEFT LoRA state dict <-> token grid (T, h, w), layout derived from the adapter's
  own shapes, fingerprinted; per-token normalisation fitted over training adapters.
- ``condition``: prompts -> the frozen encoder's token-level hidden states (N, L, C).
- ``dnd``: the hyper-convolutional decoder (B, N, L, C) -> (B, T, h, w) and its config.
- ``training``: in-memory dataset, resumable training loop, pickle-free saving, generation.
- ``cvae``: ICM-LoRA's conditional VAE over flattened normalised LoRA weights, conditioned on a
  task vector; dataset, resumable training, generation (decode z = 0).
- ``task_vector``: prompts -> the base LLM's last-layer, last-token hidden state, averaged (H,);
  an on-disk cache.
- ``service``: the registry glue: what both share (training set, resumable work folder, loading,
  the train-generator / generate / generators doors, which dispatch on the architecture) and the
  DnD generator; ``cvae_service``: the CVAE's (training, loading, generating, regenerate). Not
  re-exported here: import ``generator.service`` (it re-exports ``cvae_service``'s public names).

Pure library code: no database, no CLI. Heavy imports (torch) happen when a submodule is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tokenizer": ["LoraLayout", "ModuleLayout", "TokenNormalizer", "layout_from_state_dict",
                  "state_dict_to_tokens", "tokens_to_state_dict", "token_mask", "stack_token_grids",
                  "suggest_chunk_width"],
    "condition": ["encode_prompt_tokens", "pad_or_cut"],
    "dnd": ["DnDConfig", "DnDDecoder", "HyperConvLayer", "feature_shapes", "geometric_steps"],
    "training": ["GeneratorDataset", "TrainState", "LayoutMismatch", "train_generator",
                 "save_training_state", "load_training_state", "save_generator", "load_generator",
                 "generate_tokens", "generate_state_dict", "group_prompts", "spread_weights",
                 "weighted_mse", "check_layout", "resolve_device"],
    "cvae": ["CVAEConfig", "LoraCVAE", "CVAEDataset", "ConvEncoder", "ConvDecoder", "PatchConv",
             "PatchConvTranspose", "auto_strides", "cvae_loss", "train_cvae", "check_cvae_layout",
             "generate_cvae_state_dict", "flatten_tokens", "unflatten_tokens", "state_dict_to_flat",
             "flat_to_state_dict"],
    "task_vector": ["task_vector", "task_vectors", "prompt_states", "render_prompts", "task_vector_key",
                    "model_identity", "TaskVectorCache"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    """Import the submodule that defines ``name`` on first use (keeps ``import generator`` cheap)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'generator' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
