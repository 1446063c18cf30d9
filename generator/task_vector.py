"""The ICM-LoRA condition: a task's prompts -> one task vector (H,) from the base LLM.

ICM-LoRA (seed 003) conditions its CVAE on a *task vector*: the last layer's hidden state at the
last position of each task sample, averaged over the samples, taken from the **fine-tuned** model.

What we use, and why:

- **The base model, not the fine-tuned one.** At generation time the task is unseen: there is no
  fine-tuned model to ask (making one is what the generator replaces). The base model's
  representation of the task's prompts is what is available, so we use it for both training and
  generation; using the fine-tuned models at training time would make training vectors live in a
  different space than the ones the generator is given later. A consequence: every checkpoint of a
  task shares the task's vector (the paper's varies a little per checkpoint).
- **Prompts only, rendered with the chat template** (user turn + opened assistant turn, as the
  adapters see them when they answer), so the last position is where the model is about to answer.
  Tokenizers without a chat template get the raw prompt + newline (like ``harvest.train``).
- **Last layer = the decoder's final hidden state after its final norm** (what the LM head reads;
  ``model.get_decoder()(...).last_hidden_state``), which also skips the vocabulary projection.
- **Last position = the last non-pad token.** Prompts are batched with left padding (the
  attention mask hides the pads) and position ids are rebuilt from the mask, so a padded prompt
  gets the positions it gets alone and the same hidden state up to float error (RoPE models would
  match anyway, being relative; absolute-position models need the ids). The last token is found
  from the mask, not assumed at index -1.

Everything runs without gradients and returns float32 tensors on the CPU. A cache (any mutable
mapping, e.g. ``TaskVectorCache`` on disk) skips the forward pass for prompt sets already seen by
the same base; its key covers the base's identity, the rendered prompts and ``max_length``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, MutableMapping, Sequence

import torch
from torch import Tensor

TASK_VECTOR_FORMAT = "icm-task-vector/base-last-token-mean/1"
DEFAULT_MAX_LENGTH = 512


# -----------------------------------------------------------------------------
# prompts -> per-prompt last hidden states


def render_prompts(tokenizer, prompts: Sequence[str], chat: bool = True) -> list[str]:
    """Prompt texts as the model sees them: chat template with the assistant turn opened."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("a task vector needs at least one prompt")
    from registry.chat import render_prompts as render

    return render(tokenizer, prompts, chat)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _last_hidden_state(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """(B, S) -> (B, S, H): the decoder's final (normed) hidden state, without the LM head."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is not None and decoder is not model:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False)
        return out.last_hidden_state
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1]


@torch.no_grad()
def prompt_states(model, tokenizer, prompts: Sequence[str], batch_size: int = 16,
                  device: str | torch.device | None = None, *, max_length: int | None = DEFAULT_MAX_LENGTH,
                  chat: bool = True) -> Tensor:
    """Each prompt's last-layer hidden state at its last real token: (P, H) float32 on the CPU.

    ``device`` is where the inputs go (default: the model's device; the model is not moved).
    Prompts longer than ``max_length`` tokens keep their last ``max_length`` tokens.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    texts = render_prompts(tokenizer, prompts, chat)
    device = torch.device(device) if device is not None else _model_device(model)
    from registry.chat import uses_chat

    chat_rendered = chat and uses_chat(tokenizer)
    saved = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    was_training = model.training
    model.eval()
    states = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              truncation=max_length is not None, max_length=max_length,
                              add_special_tokens=not chat_rendered)
            input_ids = batch["input_ids"].to(device)                # (B, S)
            attention_mask = batch["attention_mask"].to(device)      # (B, S)
            if bool((attention_mask.sum(dim=1) == 0).any()):
                raise ValueError("a prompt rendered to zero tokens")
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)  # (B, S): 0.. per prompt
            hidden = _last_hidden_state(model, input_ids, attention_mask, position_ids)  # (B, S, H)
            positions = torch.arange(input_ids.shape[1], device=device)              # (S,)
            last = (attention_mask.long() * positions).argmax(dim=1)                 # (B,) last real token
            picked = hidden[torch.arange(hidden.shape[0], device=device), last]      # (B, H)
            states.append(picked.float().cpu())
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = saved
        model.train(was_training)
    return torch.cat(states)  # (P, H)


# -----------------------------------------------------------------------------
# task vector (+ cache)


def model_identity(model) -> str:
    """A cheap identity of a base model: its config (minus the path) and a sample of its weights."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(vars(model.config))
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    params = list(model.named_parameters())
    for name, param in params[:2] + params[-2:]:  # embeddings, first layer ... last layer, final norm
        digest.update(name.encode("utf-8"))
        digest.update(param.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def task_vector_key(model, tokenizer, prompts: Sequence[str], *, max_length: int | None = DEFAULT_MAX_LENGTH,
                    chat: bool = True, base_id: str | None = None) -> str:
    """The cache key of a task vector: sha256 over format, base identity, rendered prompts, max_length."""
    payload = {"format": TASK_VECTOR_FORMAT, "base": base_id or model_identity(model),
               "prompts": render_prompts(tokenizer, prompts, chat), "max_length": max_length}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def task_vector(model, tokenizer, prompts: Sequence[str], batch_size: int = 16,
                device: str | torch.device | None = None, *, max_length: int | None = DEFAULT_MAX_LENGTH,
                chat: bool = True, cache: MutableMapping[str, Tensor] | None = None,
                base_id: str | None = None) -> Tensor:
    """The task vector (H,): the mean over prompts of ``prompt_states`` (see the module docstring).

    With ``cache``, a vector stored under ``task_vector_key(...)`` is returned without running the
    model, and a computed one is stored. ``base_id`` (e.g. the registry's base fingerprint)
    replaces the cheap ``model_identity`` in the key.
    """
    key = None
    if cache is not None:
        key = task_vector_key(model, tokenizer, prompts, max_length=max_length, chat=chat, base_id=base_id)
        hit = cache.get(key)
        if hit is not None:
            return hit.float().cpu().clone()
    vector = prompt_states(model, tokenizer, prompts, batch_size, device, max_length=max_length,
                           chat=chat).mean(dim=0)  # (H,)
    if cache is not None:
        cache[key] = vector
    return vector


def task_vectors(model, tokenizer, prompts_by_task: Mapping[str, Sequence[str]], batch_size: int = 16,
                 device: str | torch.device | None = None, **kwargs) -> dict[str, Tensor]:
    """task -> task vector (H,), for several tasks (same options as ``task_vector``)."""
    return {task: task_vector(model, tokenizer, prompts, batch_size, device, **kwargs)
            for task, prompts in sorted(prompts_by_task.items())}


class TaskVectorCache(MutableMapping):
    """A directory of ``<key>.safetensors`` files (one (H,) tensor each), usable as ``cache=``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise KeyError(key)
        return self.directory / f"{key}.safetensors"

    def __getitem__(self, key: str) -> Tensor:
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.exists():
            raise KeyError(key)
        return load_file(str(path))["task_vector"]

    def __setitem__(self, key: str, value: Tensor) -> None:
        from registry.atomic import atomic_save_tensors

        atomic_save_tensors(self._path(key), {"task_vector": value.float()})

    def __delitem__(self, key: str) -> None:
        path = self._path(key)
        if not path.exists():
            raise KeyError(key)
        path.unlink()

    def __iter__(self):
        if not self.directory.exists():
            return iter(())
        return iter(sorted(p.name[:-len(".safetensors")] for p in self.directory.glob("*.safetensors")))

    def __len__(self) -> int:
        return sum(1 for _ in self)
