"""Evaluating a base model, alone or with a LoRA, on a task's test split.

Batched greedy decoding with left padding through the chat template (the same rendering the
harvest trains on), stopping at the end-of-turn token; every generation is scored with the task's
metric (``harvest.metrics.score``). ``max_new_tokens`` defaults per task to the longest reference
answer in tokens plus a margin, so a verbose base model still gets room to state its answer.

Precision (``registry.precision``): in ``bf16`` a base loaded here is stored in bfloat16 and decoding
runs under bf16 autocast (an attached LoRA keeps float32 weights). Greedy completions can differ
from fp32 on a few items; ``benchmarks/bench_harvest.py --eval`` measures by how much.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harvest.metrics import score
from harvest.tasks import Example, Task
from harvest.train import HarvestConfig, HarvestError, configure_threads, lora_config, render_prompt
from registry.lm import contiguous_head_input, lean_lora_layers, shared_prefix_length


@dataclass
class Prediction:
    prompt: str
    answer: str
    prediction: str
    score: float


@dataclass
class EvalResult:
    task: str
    metric: str
    accuracy: float
    n: int
    predictions: list[Prediction] = field(default_factory=list)
    seconds: float = 0.0
    new_tokens: int = 0
    precision: str = "fp32"

    @property
    def correct(self) -> int:
        return int(round(sum(p.score for p in self.predictions)))

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "accuracy": self.accuracy, "n": self.n,
                "seconds": self.seconds, "precision": self.precision, "predictions": [p.__dict__ for p in self.predictions]}


# Greedy decoding on CPU is bound by per-token overhead, not arithmetic: one batch of 64 decodes
# about twice the items per second of four batches of 16 (SmolLM2, bf16, one thread, 64 add_sub /
# plus_words test items: 21.3 / 23.9 vs 11.4 items/s), and the KV cache of 64 rows stays small.
DEFAULT_EVAL_BATCH = 64


def default_max_new_tokens(tokenizer, examples: list[Example], margin: int = 16, cap: int = 96) -> int:
    longest = max((len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples), default=8)
    return min(cap, longest + margin)


def _infer_lora(state_dict: dict) -> tuple[int, list[str]]:
    ranks, targets = set(), set()
    from registry.peft_io import parse_lora_key

    for key, tensor in state_dict.items():
        parsed = parse_lora_key(key)
        if parsed is not None and parsed.part == "A":
            ranks.add(int(tensor.shape[0]))
            targets.add(parsed.module.rsplit(".", 1)[-1])
    if not ranks:
        raise HarvestError("the adapter state dict has no lora_A weights")
    if len(ranks) > 1:
        raise HarvestError(f"mixed LoRA ranks in one state dict: {sorted(ranks)}")
    return ranks.pop(), sorted(targets)


def attach_adapter(model, adapter: Any, lora: HarvestConfig | dict | None = None):
    """Wrap ``model`` with a LoRA given as a PEFT folder or a PEFT state dict (modifies ``model``);
    its layers add the update with one fused ``addmm`` (``registry.lm.lean_lora_layers``).

    For a state dict the rank and targets are read from the shapes and keys; alpha and rsLoRA come
    from ``lora`` (a HarvestConfig or an adapter_config dict), else alpha = 2 * rank.
    """
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    if isinstance(adapter, (str, os.PathLike)):
        path = Path(adapter)
        if not (path / "adapter_config.json").exists():
            raise HarvestError(f"not a PEFT adapter folder (no adapter_config.json): {path}")
        return lean_lora_layers(PeftModel.from_pretrained(model, path, is_trainable=False))
    rank, targets = _infer_lora(adapter)
    if isinstance(lora, HarvestConfig):
        config = HarvestConfig(rank=rank, alpha=lora.alpha, target_modules=tuple(targets), use_rslora=lora.use_rslora)
    elif isinstance(lora, dict):
        config = HarvestConfig(rank=rank, alpha=float(lora.get("lora_alpha", 2 * rank)), target_modules=tuple(targets),
                               use_rslora=bool(lora.get("use_rslora", False)))
    else:
        config = HarvestConfig(rank=rank, alpha=2.0 * rank, target_modules=tuple(targets))
    peft_model = get_peft_model(model, lora_config(config))
    result = set_peft_model_state_dict(peft_model, adapter)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise HarvestError(f"adapter keys do not fit the model, e.g. {unexpected[0]}")
    return lean_lora_layers(peft_model)


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, batch_size: int = DEFAULT_EVAL_BATCH,
             share_prefix: bool = True) -> tuple[list[str], int]:
    """Greedy completions of ``prompts`` (chat-rendered, batched by length).

    Chat-rendered prompts share a long head (system turn, user-turn opening): with ``share_prefix``
    its keys and values are computed once and reused by every batch, and each batch holds only the
    prompts' own tails, left-padded after the shared head (the attention mask hides the padding and
    the position ids skip it, so the completions are those of the unshared run). On SmolLM2 the head
    is 24-34 of 37-73 prompt tokens (add_sub, family_relation, word_reversal, ja_kanji_numbers).
    """
    import copy

    import torch

    device = next(model.parameters()).device
    contiguous_head_input(model)
    rendered = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(rendered[i]))
    outputs: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head = rendered[0][:shared_prefix_length(rendered)] if share_prefix else []
    head_cache = None
    new_tokens = 0
    with torch.inference_mode():
        if head:
            head_cache = model(input_ids=torch.tensor([head], device=device), use_cache=True).past_key_values
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            tails = [rendered[i][len(head):] for i in idx]
            width = max(len(t) for t in tails)
            input_ids = torch.tensor([head + [pad_id] * (width - len(t)) + t for t in tails], device=device)
            attention = torch.tensor([[1] * len(head) + [0] * (width - len(t)) + [1] * len(t) for t in tails],
                                     device=device)  # (B, head + width)
            cache = None
            if head_cache is not None:
                cache = copy.deepcopy(head_cache)
                cache.batch_repeat_interleave(len(idx))  # (1, ...) -> (B, ...) per layer
            out = model.generate(input_ids=input_ids, attention_mask=attention, past_key_values=cache,
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            gen = out[:, input_ids.shape[1]:]  # (B, new)
            for row, i in enumerate(idx):
                ids = gen[row].tolist()
                if tokenizer.eos_token_id in ids:
                    ids = ids[:ids.index(tokenizer.eos_token_id)]
                new_tokens += len(ids)
                outputs[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return outputs, new_tokens


def evaluate(
    task: Task,
    model=None,
    tokenizer=None,
    *,
    base: str | os.PathLike | None = None,
    adapter: Any = None,
    lora: HarvestConfig | dict | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = DEFAULT_EVAL_BATCH,
    max_new_tokens: int | None = None,
    device: str | None = None,
    threads: int | None = None,
    precision: str | None = None,
) -> EvalResult:
    """Accuracy of a model on ``task``'s ``split`` plus per-item predictions.

    Either pass a loaded ``model`` (a base or a PeftModel) + ``tokenizer``, or a ``base`` name/path
    (default SmolLM2). ``adapter`` (a PEFT folder or a PEFT state dict) is attached to a fresh copy
    of the base, so cached models are never modified. ``precision``: ``auto``/``fp32``/``bf16``.
    """
    from registry import base_models
    from registry import precision as precisions

    examples = task.split(split)[:limit] if limit else task.split(split)
    if device in (None, "cpu"):
        configure_threads(threads)
    run_device = device or (next(model.parameters()).device if model is not None else base_models.default_device())
    precision = precisions.resolve(precision, run_device)
    if model is None:
        model, tokenizer = base_models.load_base(base, device=device, dtype=precisions.frozen_dtype(precision),
                                                 cached=adapter is None)
    elif tokenizer is None:
        raise HarvestError("pass the tokenizer together with the model")
    if adapter is not None:
        model = attach_adapter(model, adapter, lora)
    model.eval()
    max_new = max_new_tokens or task.info.max_new_tokens or default_max_new_tokens(tokenizer, examples)
    t0 = time.perf_counter()
    with precisions.autocast(precision, run_device):
        outputs, new_tokens = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new,
                                       batch_size=batch_size)
    seconds = time.perf_counter() - t0
    predictions = [Prediction(e.prompt, e.answer, out, score(task.metric, out, e.answer))
                   for e, out in zip(examples, outputs)]
    accuracy = sum(p.score for p in predictions) / len(predictions) if predictions else 0.0
    return EvalResult(task=task.name, metric=task.metric, accuracy=accuracy, n=len(predictions),
                      predictions=predictions, seconds=seconds, new_tokens=new_tokens, precision=precision)
