"""Prompt -> LoRA generation: a Drag-and-Drop (DnD) hyper-convolutional decoder and ICM-LoRA's CVAE.

The math (no database, no CLI; torch imported when a submodule is used):

- ``tokenizer``: PEFT LoRA state dict <-> token grid (T, h, w), layout derived from the adapter's
  own shapes, fingerprinted; per-token normalisation fitted over training adapters;
- ``condition``: prompts -> the frozen encoder's token-level hidden states (N, L, C);
- ``dnd``: the hyper-convolutional decoder (B, N, L, C) -> (B, T, h, w) and its config;
  ``training``: its in-memory dataset, resumable training loop, pickle-free saving, generation;
- ``cvae``: ICM-LoRA's conditional VAE over flattened normalised LoRA weights, conditioned on a
  task vector; ``cvae_training``: its dataset, training and decoding (z = 0);
- ``task_vector``: prompts -> the base LLM's last-layer, last-token hidden state, averaged (H,);
- ``decode``: normalised tokens -> state dict in one gather (``DecodePlan``).

The registry service: ``service`` (the doors: train-generator, generate, generators), which
dispatches to a ``backend.GeneratorBackend`` — ``dnd_service.DND`` or ``cvae_service.CVAE`` — and
what they share: ``trainset`` (the training set), ``workdir`` (resumable training), ``artifacts``
(finding and loading stored generators), ``errors``. Import the submodules; this package imports
nothing.
"""
