"""How sure the base model is of its first answer token on a task's prompts, with one adapter or
another: the signal of the entropy gate (``compose --add ... --gate``, ``generate --gate``).

No answers are needed, only the prompts. An adapter that fits a task tends to make the model open
its answers to that task's prompts with a peaked next-token distribution; one trained on another
skill tends to leave it unsure. It is a gate between two candidates, not a router over a pool. On
the README's held-out arithmetic tasks ("The entropy gate"), the lowest-entropy adapter of a whole
pool was the best one on only some tasks, but between the multitask LoRA alone and the multitask LoRA
plus the task's source adapter it picked the more accurate one on 5 of 6 reworded tasks, and it kept
the multitask LoRA alone where the retrieved adapter was of another skill (plus_words given
times_small: entropy 0.49 against 1.25, accuracy 0.64 against 0.16).

The adapters are added by forward hooks on a private copy of the base (never on the per-process
cached one other callers share), so no PEFT model is built per candidate and any rank works.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Mapping, Sequence

from registry.chat import render_prompt
from registry.errors import RegistryError
from registry.lm import add_low_rank, lora_scaling, shared_prefix_length
from registry.peft_io import PEFT_PREFIX, parse_lora_key

GATE_PROMPTS = 16  # prompts the gate reads: enough to average out one odd prompt, cheap enough to stay < 0.5 s

_MODELS: dict = {}  # (base, device) -> (model, tokenizer): the gate's own copy of each base
_LOCK = threading.Lock()  # the hooks are added to a shared copy: one gate at a time per process


@contextmanager
def lora_hooks(model, state_dict: Mapping, peft_config: Mapping):
    """Within the block ``model`` runs with the PEFT LoRA ``state_dict`` added to its linears by
    forward hooks (``scaling * x A^T B^T`` each); the model's own weights are untouched."""
    scaling = lora_scaling(peft_config)
    factors: dict[str, dict[str, object]] = {}
    for key, tensor in state_dict.items():
        parsed = parse_lora_key(key)
        if parsed is not None:
            factors.setdefault(parsed.module.removeprefix(PEFT_PREFIX), {})[parsed.part] = tensor
    modules = dict(model.named_modules())
    missing = [name for name in factors if name not in modules]
    if missing:
        raise RegistryError(f"adapter module {missing[0]} is not in the base model")
    device = next(model.parameters()).device
    handles = []
    try:
        for name, parts in factors.items():
            a, b = parts["A"].to(device).float(), parts["B"].to(device).float()  # (r, in), (out, r)
            handles.append(modules[name].register_forward_hook(
                lambda _module, inputs, output, a=a, b=b: add_low_rank(output, inputs[0], a, b, scaling)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def next_token_entropy(model, tokenizer, prompts: Sequence[str], batch_size: int = 16):
    """Entropy (nats) of the model's next-token distribution right after each chat-rendered prompt: (P,).

    The prompts' shared head (system turn, user-turn opening) runs once and its keys and values are
    reused by every batch, as in ``harvest.evaluate.generate``; the tails are left-padded after it
    (the mask hides the padding, the positions skip it)."""
    import copy

    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rendered = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    head = rendered[0][:shared_prefix_length(rendered)]
    body, lm_head = model.get_decoder(), model.get_output_embeddings()
    entropies = []
    with torch.inference_mode():
        head_cache = body(input_ids=torch.tensor([head], device=device), use_cache=True).past_key_values if head else None
        for start in range(0, len(rendered), batch_size):
            tails = [ids[len(head):] for ids in rendered[start:start + batch_size]]
            width = max(len(t) for t in tails)
            input_ids = torch.tensor([[pad_id] * (width - len(t)) + t for t in tails], device=device)  # (B, W)
            tail_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)
            positions = len(head) + (tail_mask.cumsum(-1) - 1).clamp(min=0)  # padding skipped
            mask = torch.cat([torch.ones(len(tails), len(head), dtype=torch.long, device=device), tail_mask], 1)
            cache = None
            if head_cache is not None:
                cache = copy.deepcopy(head_cache)
                cache.batch_repeat_interleave(len(tails))  # (1, ...) -> (B, ...) per layer
            hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          past_key_values=cache, use_cache=cache is not None).last_hidden_state  # (B, W, H)
            logp = lm_head(hidden[:, -1]).float().log_softmax(-1)  # (B, V): the first answer token
            entropies.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(entropies)  # (P,)


def _gate_model(base_model: str | None, device):
    from registry import base_models

    device = device or base_models.default_device()
    key = (str(base_models.resolve_base_dir(base_model)), str(device))
    if key not in _MODELS:
        _MODELS[key] = base_models.load_base(base_model, device=str(device), cached=False)
    return _MODELS[key]


def mean_entropies(base_model: str | None, prompts: Sequence[str], adapters: Sequence[tuple[Mapping, Mapping]],
                   device=None, limit: int = GATE_PROMPTS) -> list[float]:
    """Mean first-answer-token entropy over (the first ``limit`` of) ``prompts`` for each
    ``(state_dict, peft_config)`` in ``adapters`` on ``base_model`` (``device`` None: CUDA when present)."""
    prompts = list(prompts)[:limit]
    with _LOCK:
        model, tokenizer = _gate_model(base_model, device)
        result = []
        for state_dict, peft_config in adapters:
            with lora_hooks(model, state_dict, peft_config):
                result.append(float(next_token_entropy(model, tokenizer, prompts).mean()))
    return result


def entropy_gate(base_model: str | None, prompts: Sequence[str], fallback: tuple[Mapping, Mapping],
                 candidate: tuple[Mapping, Mapping], device=None) -> tuple[bool, dict]:
    """Keep ``candidate`` only if it answers ``prompts`` with a lower mean first-token entropy than
    ``fallback`` (ties keep the fallback). Returns ``(keep, {"fallback": H0, "candidate": H1})``."""
    fallback_h, candidate_h = mean_entropies(base_model, prompts, [fallback, candidate], device)
    return candidate_h < fallback_h, {"fallback": fallback_h, "candidate": candidate_h}
