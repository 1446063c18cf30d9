"""Per-sample LoRA routing for mixed-task batches (LoraRetriever's batched mapping).

A pool of P adapters is stacked per wrapped Linear: ``A`` as (P, R, in) and ``B`` as (P, out, R), ranks
zero-padded to the largest R and each adapter's scaling folded into its B. A batch x pool mapping matrix
M (B, P) says how much of each adapter every item gets, and each wrapped Linear adds

    delta(x)_b = Σ_p M[b, p] s_p B_p A_p x_b

to its output. Each item's row only has its k retrieved adapters, so M is turned into (B, K) gather
indices and weights, and the item's K adapters are concatenated along the rank (the ``mixture``
composition, per item): two batched matmuls per Linear, one forward pass for the whole batch.

The adapters are attached to a plain transformers model with forward hooks that are removed on exit;
the model's own weights are never changed.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence, Union

import torch

from registry.errors import RegistryError
from registry.lm import contiguous_head_input
from retrieval.compose import LoraAdapter, load_adapter_dir

PEFT_PREFIX = "base_model.model."

Routing = Sequence[Sequence[tuple[str, float]]]
AdapterSource = Union[LoraAdapter, str, os.PathLike]


class RoutingError(RegistryError, ValueError):
    """A bad routing request: unknown adapter, empty route, batch mismatch (one-line message)."""


@dataclass
class LoraPool:
    """P adapters stacked per module: ``lora_a[m]`` (P, R, in), ``lora_b[m]`` (P, out, R), scaling in B."""

    names: list[str]
    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]

    @property
    def modules(self) -> list[str]:
        """Model-relative paths of the wrapped modules (``model.layers.0.self_attn.q_proj``...)."""
        return list(self.lora_a)


def _as_adapter(name: str, source: AdapterSource) -> LoraAdapter:
    """A ``LoraAdapter`` from itself or from a PEFT directory."""
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_adapter_dir(source, name=name)
    raise RoutingError(f"adapter {name!r}: give a LoraAdapter or a PEFT directory, not {type(source).__name__} "
                       "(a bare state dict has no alpha/rank, so its scaling is unknown)")


def build_lora_pool(adapters: Mapping[str, AdapterSource]) -> LoraPool:
    """Stack the adapters per module; adapters may differ in rank and in target modules."""
    if not adapters:
        raise RoutingError("the adapter pool is empty")
    names = list(adapters)
    loaded = [_as_adapter(name, adapters[name]) for name in names]
    bases = {adapter.base_model for adapter in loaded if adapter.base_model}
    if len(bases) > 1:
        raise RoutingError(f"pool adapters were trained on different base models: {sorted(bases)}")
    max_rank = max(adapter.rank for adapter in loaded)
    # every module any adapter wraps, in first-seen order
    modules: dict[str, tuple[int, int]] = {}
    for adapter in loaded:
        for module in adapter.modules:
            lora_a, lora_b = adapter.factors(module)
            shape = (lora_a.shape[1], lora_b.shape[0])
            if modules.setdefault(module, shape) != shape:
                raise RoutingError(f"module {module} has different in/out shapes across the pool")
    lora_a_stacks, lora_b_stacks = {}, {}
    for module, (fan_in, fan_out) in modules.items():
        stack_a = torch.zeros(len(loaded), max_rank, fan_in)  # (P, R, in)
        stack_b = torch.zeros(len(loaded), fan_out, max_rank)  # (P, out, R)
        for index, adapter in enumerate(loaded):
            if module + ".lora_A.weight" not in adapter.state_dict:
                continue  # this adapter leaves the module alone: zero delta
            lora_a, lora_b = adapter.factors(module)
            rank = lora_a.shape[0]
            stack_a[index, :rank] = lora_a.float()
            stack_b[index, :, :rank] = adapter.scaling * lora_b.float()  # fold the scaling into B
        path = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        lora_a_stacks[path], lora_b_stacks[path] = stack_a, stack_b
    return LoraPool(names=names, lora_a=lora_a_stacks, lora_b=lora_b_stacks)


def routing_matrix(routing: Routing, names: Sequence[str]) -> torch.Tensor:
    """The (B, P) mapping matrix: ``M[b, p]`` = weight of adapter ``names[p]`` for item b."""
    column = {name: index for index, name in enumerate(names)}
    matrix = torch.zeros(len(routing), len(names))
    for row, route in enumerate(routing):
        if len(route) == 0:
            raise RoutingError(f"item {row} has no adapters: every item needs k >= 1")
        for name, weight in route:
            if name not in column:
                raise RoutingError(f"item {row} routes to unknown adapter {name!r}")
            if not math.isfinite(float(weight)):
                raise RoutingError(f"item {row}: weight of {name!r} is not finite")
            matrix[row, column[name]] += float(weight)
    return matrix


def _gather_routes(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) pool indices and weights of each row's non-zero entries, K = most per row (zero-weight pads)."""
    k = max(int((matrix != 0).sum(dim=1).max()), 1)
    indices = matrix.abs().topk(k, dim=1).indices  # (B, K)
    return indices, matrix.gather(1, indices)


def _routed_factors(pool: LoraPool, module: str, indices: torch.Tensor, weights: torch.Tensor,
                    like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's K adapters concatenated along rank: A (B, K*R, in), B (B, out, K*R), weights in B."""
    batch, k = indices.shape
    stack_a = pool.lora_a[module].to(like)
    stack_b = pool.lora_b[module].to(like)
    rank = stack_a.shape[1]
    lora_a = stack_a[indices].reshape(batch, k * rank, -1)  # (B, K, R, in) -> (B, K*R, in)
    lora_b = stack_b[indices] * weights.to(like)[:, :, None, None]  # (B, K, out, R), w folded in
    lora_b = lora_b.permute(0, 2, 1, 3).reshape(batch, -1, k * rank)  # (B, out, K*R)
    return lora_a, lora_b


@contextlib.contextmanager
def routed_lora(model: torch.nn.Module, pool: LoraPool, routing: Routing | torch.Tensor) -> Iterator[torch.Tensor]:
    """Attach the pool to ``model`` with per-item routing for the duration of the block; yields M (B, P)."""
    if hasattr(model, "peft_config"):
        raise RoutingError("routed_lora needs the plain base model, not a PeftModel")
    matrix = routing if isinstance(routing, torch.Tensor) else routing_matrix(routing, pool.names)
    if matrix.dim() != 2 or matrix.shape[1] != len(pool.names):
        raise RoutingError(f"mapping matrix must be (batch, {len(pool.names)}), got {tuple(matrix.shape)}")
    indices, weights = _gather_routes(matrix.float())
    handles = []
    try:
        for module_path in pool.modules:
            try:
                linear = model.get_submodule(module_path)
            except AttributeError:
                raise RoutingError(f"the model has no module {module_path!r} (adapter for another base?)") from None
            lora_a, lora_b = _routed_factors(pool, module_path, indices.to(linear.weight.device),
                                             weights, linear.weight)
            handles.append(linear.register_forward_hook(_make_hook(module_path, lora_a, lora_b)))
        yield matrix
    finally:
        for handle in handles:
            handle.remove()


def _make_hook(module_path: str, lora_a: torch.Tensor, lora_b: torch.Tensor):
    """A forward hook adding ``B_b (A_b x_b)`` per item b to a Linear's output."""
    batch = lora_a.shape[0]

    def hook(module, args, output):
        x = args[0]
        if x.shape[0] != batch:
            raise RoutingError(f"{module_path}: batch of {x.shape[0]} items but routing for {batch}")
        x = x.reshape(batch, -1, x.shape[-1]).to(lora_a.dtype)  # (B, T, in)
        hidden = torch.bmm(x, lora_a.transpose(1, 2))  # (B, T, K*R)
        delta = torch.bmm(hidden, lora_b.transpose(1, 2))  # (B, T, out)
        return output + delta.reshape(output.shape).to(output.dtype)

    return hook


def _pool(adapters: LoraPool | Mapping[str, AdapterSource]) -> LoraPool:
    return adapters if isinstance(adapters, LoraPool) else build_lora_pool(adapters)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at each item's first real token."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def route_forward(model: torch.nn.Module, adapters: LoraPool | Mapping[str, AdapterSource], routing: Routing,
                  input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) of one forward pass, each item through its own routed adapters.

    Left padding is handled: positions are counted from each item's first real token.
    """
    pool = _pool(adapters)
    if len(routing) != input_ids.shape[0]:
        raise RoutingError(f"{input_ids.shape[0]} items but {len(routing)} routes")
    kwargs = {}
    if attention_mask is not None:
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
    with routed_lora(model, pool, routing):
        return model(input_ids=input_ids, use_cache=False, **kwargs).logits


@torch.no_grad()
def route_generate_ids(model: torch.nn.Module, adapters: LoraPool | Mapping[str, AdapterSource], routing: Routing,
                       input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 32,
                       eos_token_id: int | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """Greedy generation for a left-padded batch; returns only the new tokens (B, <= max_new_tokens)."""
    pool = _pool(adapters)
    if len(routing) != input_ids.shape[0]:
        raise RoutingError(f"{input_ids.shape[0]} items but {len(routing)} routes")
    if attention_mask[:, -1].min() == 0:
        raise RoutingError("generation needs left padding (attention_mask ends with 0 for some item)")
    contiguous_head_input(model)
    with routed_lora(model, pool, routing):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, num_beams=1, eos_token_id=eos_token_id,
                                pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id)
    return output[:, input_ids.shape[1]:]


def tokenize_left_padded(tokenizer, prompts: Sequence[str], chat: bool = False) -> dict[str, torch.Tensor]:
    """Token ids and attention mask with left padding (optionally through the chat template)."""
    if chat:
        from registry.chat import render_prompts

        prompts = render_prompts(tokenizer, prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tokenizer.padding_side = side
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def route_generate(model: torch.nn.Module, tokenizer, adapters: LoraPool | Mapping[str, AdapterSource],
                   routing: Routing, prompts: Sequence[str], max_new_tokens: int = 32, chat: bool = False
                   ) -> list[str]:
    """Greedy completions of ``prompts`` in one batch, each prompt through its own routed adapters."""
    if len(prompts) != len(routing):
        raise RoutingError(f"{len(prompts)} prompts but {len(routing)} routes")
    encoded = tokenize_left_padded(tokenizer, prompts, chat=chat)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    new_tokens = route_generate_ids(model, adapters, routing, encoded["input_ids"].to(device),
                                    encoded["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def routing_throughput(model: torch.nn.Module, tokenizer, adapters: LoraPool | Mapping[str, AdapterSource],
                       routing: Routing, prompts: Sequence[str], max_new_tokens: int = 16,
                       batch_size: int | None = None, chat: bool = False) -> dict[str, float]:
    """Items/s of routed batched generation vs the same items one at a time (same adapters, same math).

    The pool is stacked once beforehand; both timings include tokenisation and generation only.
    """
    pool = _pool(adapters)
    batch_size = batch_size or len(prompts)
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        route_generate(model, tokenizer, pool, routing[first:first + batch_size], prompts[first:first + batch_size],
                       max_new_tokens=max_new_tokens, chat=chat)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    for prompt, route in zip(prompts, routing):
        route_generate(model, tokenizer, pool, [route], [prompt], max_new_tokens=max_new_tokens, chat=chat)
    single_s = time.perf_counter() - start
    return {
        "items": float(len(prompts)),
        "batch_size": float(batch_size),
        "batched_seconds": batched_s,
        "one_by_one_seconds": single_s,
        "batched_items_per_s": len(prompts) / batched_s,
        "one_by_one_items_per_s": len(prompts) / single_s,
        "speedup": single_s / batched_s,
    }
