"""Harvesting: fine-tune a PEFT LoRA on a task and collect checkpoints near the end of training.

The base model stays frozen; only the LoRA A/B matrices train (AdamW, warmup then cosine decay).
Each example is rendered with the tokenizer's chat template (user = prompt, assistant = answer) and
the loss covers the answer tokens and the end-of-turn token only. To keep a CPU step cheap the model
body runs once and the LM head is applied only at answer positions (the head over a 49k vocabulary
is about a quarter of SmolLM2's forward cost); batches are length-bucketed with right padding.

DnD-style collection: ``n_checkpoints`` snapshots taken every ``checkpoint_every`` steps, ending at
the final step (so they sit in the flat tail of training). Each goes to
``on_checkpoint(step, loss, lora_state_dict)`` with PEFT state-dict keys
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), CPU tensors.

Resuming: with ``work_dir``, the trainer state (LoRA weights, AdamW moments and step counts, the
step, torch RNG, the loss history and which checkpoints were emitted) is written every
``save_every`` steps and at every checkpoint, as ``state.safetensors`` + ``state.json`` (no
pickle), atomically. The data order is a pure function of ``(seed, epoch)``, so a resumed harvest
replays exactly the batches an uninterrupted one would have seen and ends at the same weights (on
the same device and thread count). A checkpoint emitted just before a crash, before the state was
saved, is emitted again on resume: consumers should key checkpoints by step.

Precision (``registry.precision``): with ``bf16`` the frozen base is stored in bfloat16 and the
forward runs under bf16 autocast; the LoRA parameters, their gradients and AdamW's moments stay
float32. The resolved precision is part of the resume fingerprint (a work dir of an fp32 run is not
resumed in bf16) and of the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from harvest.tasks import Example, Task
from registry.lm import collate, encode_example, lean_lora_layers  # shared with the generators' SFT objective
from registry.errors import RegistryError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BUCKET_BATCHES = 16  # batches per length-sorting window
_STATE_JSON = "state.json"
_STATE_TENSORS = "state.safetensors"


class HarvestError(RegistryError):
    """Bad harvest settings or a work dir that belongs to another harvest (one-line message)."""


@dataclass
class HarvestConfig:
    """Settings of one harvest. The defaults are the measured CPU recipe for SmolLM2-135M."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    use_rslora: bool = False
    steps: int = 120
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_length: int = 160
    n_checkpoints: int = 10
    checkpoint_every: int | None = None  # None: spread the checkpoints over the last ~25% of steps
    save_every: int = 20
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise HarvestError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise HarvestError(f"alpha must be positive, got {self.alpha!r}")
        if not self.target_modules:
            raise HarvestError("target_modules is empty")
        for name, value in (("steps", self.steps), ("batch_size", self.batch_size), ("max_length", self.max_length),
                            ("n_checkpoints", self.n_checkpoints), ("save_every", self.save_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise HarvestError(f"{name} must be a positive integer, got {value!r}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise HarvestError(f"checkpoint_every must be a positive integer, got {self.checkpoint_every!r}")
        if self.n_checkpoints > self.steps:
            raise HarvestError(f"n_checkpoints ({self.n_checkpoints}) exceeds steps ({self.steps})")
        if not self.lr > 0:
            raise HarvestError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.dropout < 1:
            raise HarvestError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.warmup_steps < 0:
            raise HarvestError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "HarvestConfig":
        data = dict(data)
        if "target_modules" in data:
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)


@dataclass
class HarvestResult:
    """What a harvest produced. ``state_dict`` is the final LoRA (PEFT keys, CPU tensors)."""

    state_dict: dict
    peft_config: dict  # the adapter_config.json content
    base_model_id: str
    config: HarvestConfig
    losses: list[float]
    checkpoints: list[tuple[int, float]]  # (step, loss) of each emitted checkpoint
    steps: int
    seconds: float
    tokens: int  # tokens (prompt + answer, no padding) processed by the steps run in this call
    resumed_from: int = 0
    earlier_seconds: float = 0.0  # training time spent by the interrupted runs this one resumed
    precision: str = "fp32"  # the resolved precision the steps ran in

    @property
    def total_seconds(self) -> float:
        """Training time over every run of this harvest, resumed ones included."""
        return self.earlier_seconds + self.seconds
    extra: dict = field(default_factory=dict)

    @property
    def sec_per_step(self) -> float:
        done = self.steps - self.resumed_from
        return self.seconds / done if done else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: the argument, else ``$OMP_NUM_THREADS``, else the usable cores.

    On a machine whose cores are busy with other work, fewer threads is faster: measured on 2 shared
    cores, 2 threads took up to 10 s/step under load against 2.6-5 s/step with 1 thread (1.2 s/step
    with 2 threads when idle).
    """
    import torch

    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            threads = int(env)
        else:
            try:
                threads = len(os.sched_getaffinity(0))
            except AttributeError:  # not Linux
                threads = os.cpu_count() or 1
    threads = max(1, int(threads))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def lr_at(step: int, config: HarvestConfig) -> float:
    """Learning rate for update number ``step`` (1-based): linear warmup, then cosine to min_lr_ratio.

    The curve of transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` (tests/test_train.py
    compares them), read at the 1-based update number. Not that scheduler itself: as a ``LambdaLR``
    it gives update k the factor of k - 1, so the first update would run at lr 0 and every later one
    a step behind, which changes every harvest (and its id); a pure function also needs no
    scheduler state in the resumable work dir.
    """
    if config.warmup_steps and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def checkpoint_steps(config: HarvestConfig) -> list[int]:
    """The steps at which checkpoints are emitted: ``n_checkpoints`` evenly spaced, ending at the last step."""
    n, steps = config.n_checkpoints, config.steps
    every = config.checkpoint_every or max(1, round(0.25 * steps / n))
    if n > 1 and (n - 1) * every >= steps:
        every = max(1, (steps - 1) // (n - 1))
    return sorted(steps - i * every for i in range(n))


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of example indices for one epoch: shuffled, length-bucketed, batch order shuffled.

    A pure function of its arguments (``random.Random`` with a string seed is stable across runs).
    """
    rng = random.Random(f"harvest:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * _BUCKET_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


def render_prompt(tokenizer, prompt: str) -> str:
    """The generation prompt text for ``prompt`` (``registry.chat.render_prompt``: the chat template
    with the assistant turn opened), the same text evaluation, routing and task vectors use."""
    from registry.chat import render_prompt as render

    return render(tokenizer, prompt)


# --------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------


def linear_leaf_names(model) -> set[str]:
    import torch

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def lora_config(config: HarvestConfig, base_model_id: str | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        lora_dropout=config.dropout,
        use_rslora=config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_id,
    )


def peft_config_dict(config: HarvestConfig, base_model_id: str) -> dict:
    """The ``adapter_config.json`` content for a LoRA trained with ``config``."""
    out = lora_config(config, base_model_id).to_dict()
    return json.loads(json.dumps(out, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


def save_adapter(out_dir: str | os.PathLike, state_dict: dict, config: HarvestConfig, base_model_id: str) -> Path:
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from registry.peft_io import write_adapter_dir

    return write_adapter_dir(out_dir, state_dict, peft_config_dict(config, base_model_id))


def _loss_fn(peft_model):
    """``loss(input_ids, attention_mask, labels)`` over the PEFT model's base (``registry.lm.answer_loss``)."""
    from registry.lm import answer_loss

    return answer_loss(peft_model.get_base_model())


def _fingerprint(config: HarvestConfig, base_id: str, examples: list[Example], precision: str = "fp32") -> str:
    digest = hashlib.sha256()
    settings = config.to_dict()
    settings.pop("save_every", None)  # how often state is saved does not change the result
    from registry.precision import identity

    digest.update(json.dumps({"config": settings, "base": base_id, **identity(precision)}, sort_keys=True).encode())
    for example in examples:
        digest.update(json.dumps([example.prompt, example.answer]).encode())
    return digest.hexdigest()


def _lora_state(peft_model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


# --------------------------------------------------------------------------------------------
# Trainer state on disk (safetensors + JSON, no pickle)
# --------------------------------------------------------------------------------------------


def _save_state(work_dir: Path, named_params, optimizer, meta: dict) -> None:
    import torch

    tensors = {}
    for name, param in named_params:
        tensors[f"param/{name}"] = param.detach().cpu().contiguous()
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                value = state[key]
                value = value if torch.is_tensor(value) else torch.tensor(float(value))
                tensors[f"{key}/{name}"] = value.detach().cpu().reshape(value.shape).contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    from registry import faults
    from registry.atomic import atomic_save_tensors, atomic_write_json

    # The tensors go to a file of their own step, then the JSON (the commit point) names that file,
    # then older tensor files go: a kill anywhere leaves a JSON and the tensors it names, never the
    # JSON of one step beside the tensors of another.
    tensors_name = f"state-{int(meta['step']):08d}.safetensors"
    atomic_save_tensors(work_dir / tensors_name, tensors)
    faults.point("harvest.state_between_files")
    atomic_write_json(work_dir / _STATE_JSON, {**meta, "tensors": tensors_name}, indent=1)
    for old in [work_dir / _STATE_TENSORS, *work_dir.glob("state-*.safetensors")]:
        if old.name != tensors_name:
            old.unlink(missing_ok=True)


def _load_state(work_dir: Path) -> tuple[dict, dict] | None:
    from safetensors.torch import load_file

    if not (work_dir / _STATE_JSON).exists():
        return None
    meta = json.loads((work_dir / _STATE_JSON).read_text())
    tensors = work_dir / meta.get("tensors", _STATE_TENSORS)  # older work dirs: one fixed name
    if not tensors.exists():
        return None
    return meta, load_file(str(tensors))


def clear_work_dir(work_dir: str | os.PathLike) -> None:
    for name in (_STATE_JSON, _STATE_TENSORS, _STATE_JSON + ".tmp", _STATE_TENSORS + ".tmp"):
        try:
            (Path(work_dir) / name).unlink()
        except FileNotFoundError:
            pass
    for path in Path(work_dir).glob("state-*.safetensors"):
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The harvest
# --------------------------------------------------------------------------------------------


def harvest(
    task: Task | Iterable[Example] | Iterable[tuple[str, str]],
    *,
    base: str | os.PathLike | None = None,
    config: HarvestConfig | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: bool = True,
    keep_work_dir: bool = False,
    on_step: Callable[[int, float], Any] | None = None,
    on_checkpoint: Callable[[int, float, dict], Any] | None = None,
    device: str | None = None,
    threads: int | None = None,
    model=None,
    tokenizer=None,
    precision: str | None = None,
    attention: str | None = None,
    fused_lora: bool = True,
) -> HarvestResult:
    """Fine-tune a LoRA on ``task``'s train split and return the final adapter.

    ``base`` is a base name or folder (``registry.base_models``); pass ``model`` + ``tokenizer``
    instead to train on an already loaded, unwrapped model (it gets LoRA layers injected and, in
    bf16, its frozen weights cast to bfloat16). ``precision`` is ``auto``/``fp32``/``bf16``
    (``registry.precision``; None: auto). ``attention`` is the transformers attention kernel to
    train with (None: ``eager`` on CPU, the model's own elsewhere). ``fused_lora`` adds each LoRA
    update with one ``addmm`` (``registry.lm.lean_lora_layers``; False: PEFT's own forward, the same math).
    With ``work_dir`` the run is resumable (see module docstring); on success the state files are
    removed unless ``keep_work_dir``.
    """
    import torch
    from peft import get_peft_model

    from registry import base_models
    from registry import precision as precisions

    config = config or HarvestConfig()
    config.validate()
    examples = list(task.train) if isinstance(task, Task) else [
        e if isinstance(e, Example) else Example(*e) for e in task]
    if not examples:
        raise HarvestError("the task has no training examples")

    device = device or base_models.default_device()
    precision = precisions.resolve(precision, device)
    if device == "cpu":
        configure_threads(threads)
    if model is None:
        model, tokenizer = base_models.load_base(base, device=device, dtype=precisions.frozen_dtype(precision),
                                                 cached=False)
        base_id = base_models.base_model_id(base)
    else:
        if tokenizer is None:
            raise HarvestError("pass the tokenizer together with the model")
        base_id = base_models.base_model_id(base) if base is not None else str(
            getattr(model.config, "_name_or_path", "") or "")
        model.to(device=device, dtype=precisions.frozen_dtype(precision))
    if attention is None and str(device).startswith("cpu"):
        attention = "eager"
    if attention is not None and hasattr(model, "set_attn_implementation"):
        # training on CPU: the plain attention's backward is cheaper than SDPA's for our short padded
        # batches (bench_harvest, add_sub, one thread: 1.81 vs 2.43 s/step in bf16, 2.52 vs 2.65 in
        # fp32); greedy evaluation is the other way round (SDPA 6.05 vs 5.23 items/s in bf16), so
        # only the harvest switches
        model.set_attn_implementation(attention)
    missing = sorted(set(config.target_modules) - linear_leaf_names(model))
    if missing:
        available = ", ".join(sorted(linear_leaf_names(model)))
        raise HarvestError(f"target modules not in the model: {', '.join(missing)} (its linear layers: {available})")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_example(tokenizer, e.prompt, e.answer, config.max_length) for e in examples]
    lengths = [len(ids) for ids, _ in encoded]
    batches_per_epoch = math.ceil(len(encoded) / config.batch_size)

    torch.manual_seed(config.seed)
    for param in model.parameters():
        param.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config(config, base_id))  # LoRA weights in fp32 (PEFT's default)
    if fused_lora:
        lean_lora_layers(peft_model)  # same math, a fused update per layer (registry.lm.add_low_rank)
    named = sorted((n, p) for n, p in peft_model.named_parameters() if p.requires_grad)
    params = [p for _, p in named]
    for param in params:  # fp32 master weights whatever the base's storage dtype
        if param.dtype != torch.float32:
            param.data = param.data.float()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    loss_of = _loss_fn(peft_model)
    ckpt_steps = set(checkpoint_steps(config))

    fingerprint = _fingerprint(config, base_id, examples, precision)
    work = Path(work_dir) if work_dir is not None else None
    start, losses, emitted, earlier_seconds = 0, [], [], 0.0
    if work is not None and resume:
        loaded = _load_state(work)
        if loaded is not None:
            meta, tensors = loaded
            if meta.get("fingerprint") != fingerprint:
                raise HarvestError(f"work dir {work} holds the state of a different harvest (clear it or use another)")
            with torch.no_grad():
                for name, param in named:
                    param.copy_(tensors[f"param/{name}"].to(param.device))
                    if f"exp_avg/{name}" in tensors:
                        optimizer.state[param] = {
                            "step": tensors[f"step/{name}"].clone(),
                            "exp_avg": tensors[f"exp_avg/{name}"].to(param.device).clone(),
                            "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(param.device).clone(),
                        }
            torch.set_rng_state(tensors["rng/torch"])
            if "rng/cuda" in tensors and torch.cuda.is_available():
                torch.cuda.set_rng_state(tensors["rng/cuda"])
            start, losses = int(meta["step"]), list(meta["losses"])
            emitted = [tuple(x) for x in meta["checkpoints"]]
            earlier_seconds = float(meta.get("train_seconds", 0.0))

    def persist(step: int) -> None:
        if work is None:
            return
        _save_state(work, named, optimizer, {
            "fingerprint": fingerprint, "step": step, "losses": losses, "checkpoints": emitted,
            "train_seconds": earlier_seconds + time.perf_counter() - t0,
            "config": config.to_dict(), "base_model_id": base_id, "precision": precision,
            "data_order": {"seed": config.seed, "batch_size": config.batch_size,
                           "batches_per_epoch": batches_per_epoch, "bucket_batches": _BUCKET_BATCHES},
        })

    peft_model.train()
    cached_epoch: tuple[int, list[list[int]]] = (-1, [])
    tokens = 0
    t0 = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        epoch, index = divmod(step - 1, batches_per_epoch)
        if cached_epoch[0] != epoch:
            cached_epoch = (epoch, epoch_batches(lengths, config.batch_size, config.seed, epoch))
        batch = [encoded[i] for i in cached_epoch[1][index]]
        input_ids, attention_mask, labels = (t.to(device) for t in collate(batch, pad_id))
        tokens += int(attention_mask.sum())

        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        with precisions.autocast(precision, device):
            loss = loss_of(input_ids, attention_mask, labels)
        if not torch.isfinite(loss.detach()):
            raise HarvestError(f"the loss is {float(loss)} at step {step}: training diverged "
                               f"(lower the learning rate, now {config.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        losses.append(value)

        if step in ckpt_steps:
            if on_checkpoint is not None:
                on_checkpoint(step, value, _lora_state(peft_model))
            emitted.append((step, value))
        if step in ckpt_steps or step % config.save_every == 0:
            persist(step)
        if on_step is not None:
            on_step(step, value)
    seconds = time.perf_counter() - t0

    peft_model.eval()
    result = HarvestResult(
        state_dict=_lora_state(peft_model),
        peft_config=peft_config_dict(config, base_id),
        base_model_id=base_id,
        config=config,
        losses=losses,
        checkpoints=list(emitted),
        steps=config.steps,
        seconds=seconds,
        tokens=tokens,
        resumed_from=start,
        earlier_seconds=earlier_seconds,
        precision=precision,
    )
    if work is not None and not keep_work_dir:
        clear_work_dir(work)
    return result
