"""Training and generation for the DnD decoder, on in-memory data (no database, no CLI).

A training sample pairs one checkpoint of a task with N prompts drawn from the same task. The loss
is MSE in normalised token space (``TokenNormalizer`` fitted over the training checkpoints), over
real weights only (padding excluded), optionally weighted per token by the inverse of its spread
across checkpoints (DnD). Training is resumable: ``TrainState`` (step, optimizer state, sampling
RNG, loss history) is saved as safetensors + JSON, never pickle. Calling ``train_generator`` again
with the returned state and a larger ``steps`` continues exactly where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor

from registry.atomic import atomic_save_tensors, atomic_write
from registry.precision import resolve as resolve_precision

from .condition import encode_prompt_tokens
from .dnd import DnDConfig, DnDDecoder
from .tokenizer import LoraLayout, TokenNormalizer, tokens_to_state_dict

TRAINING_STATE_FORMAT = "dnd-training-state/1"
GENERATOR_FORMAT = "dnd-generator/1"


class LayoutMismatch(ValueError):
    """A generator was asked to produce or consume an adapter of a different layout."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -----------------------------------------------------------------------------
# data


def spread_weights(targets: Tensor, task_of: Tensor, mask: Tensor) -> Tensor:
    """DnD's per-token weights (T,): 1 / (spread + eps), mean 1 over tokens.

    spread_t = std over a task's checkpoints of token t (normalised space), averaged over its real
    entries and over the tasks that have at least two checkpoints; eps = 10% of the mean spread.
    All ones when no task has two checkpoints.
    """
    spreads = []
    for task in task_of.unique():
        grids = targets[task_of == task]  # (K_task, T, h, w)
        if grids.shape[0] < 2:
            continue
        std = grids.std(dim=0) * mask                                    # (T, h, w)
        spreads.append(std.sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp_min(1))  # (T,)
    if not spreads:
        return torch.ones(targets.shape[1])
    spread = torch.stack(spreads).mean(dim=0)  # (T,)
    eps = 0.1 * spread.mean().clamp_min(1e-12)
    weights = 1.0 / (spread + eps)
    return weights / weights.mean()


class GeneratorDataset:
    """Tasks -> (checkpoint token grids, prompt-token embeddings); samples (condition, target) pairs.

    checkpoints: task -> list of raw token grids (T, h, w) or a (K, T, h, w) tensor.
    prompts: task -> list of prompt strings (needs ``encoder``) or a (P, L, C) embedding tensor.
    normalizer: fitted over all checkpoints here when not given.
    mask: (T, h, w) bool of real weights (``token_mask(layout)``); defaults to the normalizer's.
    """

    def __init__(self, checkpoints: Mapping[str, Sequence[Tensor] | Tensor],
                 prompts: Mapping[str, Sequence[str] | Tensor], *, n_prompts: int = 16,
                 normalizer: TokenNormalizer | None = None, mask: Tensor | None = None,
                 encoder=None, prompt_tokens: int = 64, spread_weighting: bool = False):
        missing = sorted(set(checkpoints) ^ set(prompts))
        if missing:
            raise ValueError(f"tasks need both checkpoints and prompts: {missing}")
        if not checkpoints:
            raise ValueError("no tasks")
        self.tasks = sorted(checkpoints)
        self.n_prompts = n_prompts
        grids = [checkpoints[t] if isinstance(checkpoints[t], Tensor) else torch.stack(list(checkpoints[t]))
                 for t in self.tasks]  # each (K_task, T, h, w)
        task_of = [index for index, g in enumerate(grids) for _ in range(g.shape[0])]
        token_shape = tuple(grids[0].shape[1:])
        if mask is None and normalizer is not None:
            mask = normalizer.mask
        self.mask = torch.ones(token_shape, dtype=torch.bool) if mask is None else mask.bool().cpu()
        self.normalizer = normalizer or TokenNormalizer.fit(grids, self.mask)
        # normalised task by task into one preallocated (K, T, h, w): the set is held once, not twice
        self.targets = torch.empty((len(task_of), *token_shape))
        start = 0
        for g in grids:
            self.targets[start:start + g.shape[0]] = self.normalizer.normalize(g.detach().float().cpu())
            start += g.shape[0]
        self.task_of = torch.tensor(task_of)           # (K,)
        self.prompt_embeddings = [self._embed(prompts[task], encoder, prompt_tokens) for task in self.tasks]
        if len({tuple(p.shape[1:]) for p in self.prompt_embeddings}) != 1:
            raise ValueError("all tasks' prompt embeddings must share (L, C)")
        token_weights = (spread_weights(self.targets, self.task_of, self.mask) if spread_weighting
                         else torch.ones(token_shape[0]))
        self.loss_weights = token_weights[:, None, None] * self.mask  # (T, h, w)

    @staticmethod
    def _embed(prompts: Sequence[str] | Tensor, encoder, prompt_tokens: int) -> Tensor:
        if isinstance(prompts, Tensor):
            if prompts.ndim != 3:
                raise ValueError(f"prompt embeddings must be (P, L, C), got {tuple(prompts.shape)}")
            return prompts.detach().float().cpu()
        if encoder is None:
            raise ValueError("prompt strings need an encoder")
        return encode_prompt_tokens(encoder, list(prompts), max_tokens=prompt_tokens).cpu()  # (P, L, C)

    @property
    def token_shape(self) -> tuple[int, int, int]:
        return tuple(self.targets.shape[1:])

    @property
    def condition_shape(self) -> tuple[int, int, int]:
        _, length, channels = self.prompt_embeddings[0].shape
        return (self.n_prompts, length, channels)

    def __len__(self) -> int:
        return self.targets.shape[0]

    def draw_prompts(self, task_index: int, generator: torch.Generator) -> Tensor:
        """N prompts of one task (without replacement when it has at least N): (N, L, C)."""
        pool = self.prompt_embeddings[task_index]  # (P, L, C)
        count = pool.shape[0]
        if count >= self.n_prompts:
            picks = torch.randperm(count, generator=generator)[: self.n_prompts]
        else:
            picks = torch.randint(count, (self.n_prompts,), generator=generator)
        return pool[picks]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A random batch: condition (B, N, L, C) and normalised target tokens (B, T, h, w)."""
        indices = torch.randint(len(self), (batch_size,), generator=generator)
        condition = torch.stack([self.draw_prompts(int(self.task_of[i]), generator) for i in indices])
        return condition, self.targets[indices]


def weighted_mse(prediction: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """sum(w * (prediction - target)^2) / (B * sum(w)); weights (T, h, w) broadcast over the batch."""
    squared = (prediction - target).pow(2) * weights  # (B, T, h, w)
    return squared.sum() / (weights.sum() * prediction.shape[0]).clamp_min(1e-12)


# -----------------------------------------------------------------------------
# training loop


@dataclass
class TrainState:
    """Everything needed to resume training besides the model weights."""

    step: int = 0
    seed: int = 0
    optimizer: dict | None = None   # torch optimizer state_dict
    rng: Tensor | None = None       # sampling torch.Generator state (uint8)
    losses: list[float] = field(default_factory=list)


def resume_optimizer(parameters, state: TrainState, lr: float, weight_decay: float = 0.0):
    """AdamW over ``parameters`` and the sampling generator, both restored from ``state`` when it holds
    them (the caller's lr and weight decay win on resume). Returns ``(optimizer, rng)``."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    rng = torch.Generator().manual_seed(state.seed)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr, weight_decay
    if state.rng is not None:
        rng.set_state(state.rng)
    return optimizer, rng


def train_generator(model: DnDDecoder, dataset: GeneratorDataset, steps: int, lr: float = 1e-3,
                    batch_size: int = 4, device: str | torch.device | None = None,
                    on_step: Callable[[int, int, float], bool | None] | None = None,
                    state: TrainState | None = None, seed: int = 0, weight_decay: float = 0.0,
                    grad_clip: float | None = 1.0, precision: str | None = None) -> tuple[DnDDecoder, TrainState]:
    """Train until ``state.step == steps`` (AdamW, weighted MSE in normalised token space).

    ``on_step(step, steps, loss)`` runs after every step; returning False stops early. Pass the
    returned state back (with a larger ``steps``) to continue exactly where training stopped; the
    state's own seed and RNG then win over ``seed``. Runs on CUDA when ``device`` is None and
    CUDA is available; data stays on the CPU and moves one batch at a time. ``precision``
    (``registry.precision``; None: auto) decides the forward's autocast; the decoder's parameters and
    AdamW state stay float32 and the loss is taken in float32.
    """
    if tuple(model.config.output_shape) != dataset.token_shape:
        raise LayoutMismatch(f"model outputs {model.config.output_shape}, data is {dataset.token_shape}")
    if tuple(model.config.input_shape) != dataset.condition_shape:
        raise ValueError(f"model expects {model.config.input_shape}, data gives {dataset.condition_shape}")
    device = resolve_device(device)
    model.to(device).train()
    state = state or TrainState(seed=seed)
    optimizer, rng = resume_optimizer(model.parameters(), state, lr, weight_decay)
    weights = dataset.loss_weights.to(device)  # (T, h, w)

    def batch_loss():
        condition, target = dataset.sample(batch_size, rng)  # (B, N, L, C), (B, T, h, w)
        prediction = model(condition.to(device))            # (B, T, h, w)
        return weighted_mse(prediction.float(), target.to(device), weights)

    run_steps(model, optimizer, state, steps, rng, batch_loss, grad_clip, on_step,
              precision=resolve_precision(precision, device), device=device)
    return model, state


def run_steps(model, optimizer, state, steps: int, rng, batch_loss, grad_clip: float, on_step,
              precision: str = "fp32", device: Any = "cpu") -> None:
    """The optimisation loop shared by the generators: step until ``steps`` (or ``on_step`` says
    False), recording losses; the optimizer and RNG state are saved into ``state`` even on Ctrl-C.
    ``batch_loss`` (the forward) runs under ``precision``'s autocast, the backward and step outside."""
    import torch

    from registry.precision import autocast

    try:
        while state.step < steps:
            with autocast(precision, device):
                loss = batch_loss()
            if not torch.isfinite(loss.detach()):  # stop before a NaN reaches the weights and gets stored
                from generator.errors import GeneratorError

                raise GeneratorError(f"the generator's loss is {float(loss)} at step {state.step + 1}: "
                                     "training diverged (lower the learning rate)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            state.step += 1
            state.losses.append(float(loss.item()))
            if on_step is not None and on_step(state.step, steps, state.losses[-1]) is False:
                break
    finally:  # also on KeyboardInterrupt: the state matches the last finished step
        state.optimizer = optimizer.state_dict()
        state.rng = rng.get_state()


# -----------------------------------------------------------------------------
# saving and loading without pickle


def save_training_state(directory: str | Path, state: TrainState, model: DnDDecoder | None = None) -> Path:
    """Write ``training_state.json`` + ``training_state.safetensors`` (+ ``model.safetensors``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, scalars, groups = {}, {}, []
    if state.optimizer is not None:
        for param_id, entries in state.optimizer["state"].items():
            for name, value in entries.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{param_id}.{name}"] = value
                else:
                    scalars.setdefault(str(param_id), {})[name] = value
        groups = state.optimizer["param_groups"]
    if state.rng is not None:
        tensors["rng"] = state.rng
    atomic_save_tensors(directory / "training_state.safetensors", tensors)
    if model is not None:
        atomic_save_tensors(directory / "model.safetensors", model.state_dict())
    meta = {"format": TRAINING_STATE_FORMAT, "step": state.step, "seed": state.seed,
            "has_optimizer": state.optimizer is not None, "param_groups": groups,
            "optimizer_scalars": scalars, "losses": state.losses,
            "model_config": None if model is None else model.config.to_dict()}
    atomic_write(directory / "training_state.json", json.dumps(meta))
    return directory


def load_training_state(directory: str | Path, model: DnDDecoder | None = None) -> TrainState:
    """Read what ``save_training_state`` wrote; loads the weights into ``model`` when given."""
    directory = Path(directory)
    meta = json.loads((directory / "training_state.json").read_text(encoding="utf-8"))
    if meta.get("format") != TRAINING_STATE_FORMAT:
        raise ValueError(f"unsupported training state format {meta.get('format')!r}")
    tensors = load_file(str(directory / "training_state.safetensors"))
    optimizer = None
    if meta["has_optimizer"]:
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, param_id, name = key.split(".", 2)
                per_param.setdefault(int(param_id), {})[name] = value
        for param_id, entries in meta["optimizer_scalars"].items():
            per_param.setdefault(int(param_id), {}).update(entries)
        optimizer = {"state": per_param, "param_groups": meta["param_groups"]}
    if model is not None:
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return TrainState(step=meta["step"], seed=meta["seed"], optimizer=optimizer,
                      rng=tensors.get("rng"), losses=list(meta["losses"]))


def save_generator(directory: str | Path, model: DnDDecoder, layout: LoraLayout,
                   normalizer: TokenNormalizer) -> Path:
    """A self-contained generator folder: config, weights, layout and normalizer."""
    check_layout(model, layout)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(directory / "generator.safetensors", model.state_dict())
    atomic_save_tensors(directory / "normalizer.safetensors", normalizer.state_dict())
    atomic_write(directory / "layout.json", layout.to_json())
    atomic_write(directory / "generator.json", json.dumps(
        {"format": GENERATOR_FORMAT, "config": model.config.to_dict()}))
    return directory


def load_generator(directory: str | Path, device: str | torch.device | None = None
                   ) -> tuple[DnDDecoder, LoraLayout, TokenNormalizer]:
    """Read what ``save_generator`` wrote; refuses a layout that does not match the model."""
    directory = Path(directory)
    meta = json.loads((directory / "generator.json").read_text(encoding="utf-8"))
    if meta.get("format") != GENERATOR_FORMAT:
        raise ValueError(f"unsupported generator format {meta.get('format')!r}")
    model = DnDDecoder(DnDConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(directory / "generator.safetensors")))
    layout = LoraLayout.from_json((directory / "layout.json").read_text(encoding="utf-8"))
    normalizer = TokenNormalizer.from_state_dict(load_file(str(directory / "normalizer.safetensors")))
    check_layout(model, layout)
    return model.to(resolve_device(device)).eval(), layout, normalizer


# -----------------------------------------------------------------------------
# generation


def check_layout(model: DnDDecoder, layout: LoraLayout) -> None:
    """Raise ``LayoutMismatch`` unless the model was built for this layout."""
    fingerprint = model.config.layout_fingerprint
    if fingerprint is not None and fingerprint != layout.fingerprint:
        raise LayoutMismatch(f"generator built for layout {fingerprint[:12]}, got {layout.fingerprint[:12]}")
    if tuple(model.config.output_shape) != tuple(layout.shape):
        raise LayoutMismatch(f"generator outputs {model.config.output_shape}, layout is {layout.shape}")


def group_prompts(condition: Tensor, n_prompts: int) -> Tensor:
    """(P, L, C) -> (G, N, L, C): P == N is one group; fewer repeat cyclically; more make
    ceil(P / N) groups (the last one filled cyclically from the start)."""
    count = condition.shape[0]
    groups = max(1, -(-count // n_prompts))
    order = torch.arange(groups * n_prompts) % count
    return condition[order].reshape(groups, n_prompts, *condition.shape[1:])  # (G, N, L, C)


@torch.no_grad()
def generate_tokens(model: DnDDecoder, condition: Tensor) -> Tensor:
    """Prompt embeddings (P, L, C) -> normalised tokens (T, h, w).

    P prompts are grouped into batches of the model's N (see ``group_prompts``); the groups'
    outputs are averaged.
    """
    model.eval()
    groups = group_prompts(condition, model.config.n_prompts).to(model.device)  # (G, N, L, C)
    return model(groups).mean(dim=0)  # (T, h, w)


def generate_state_dict(model: DnDDecoder, condition: Tensor, normalizer: TokenNormalizer,
                        layout: LoraLayout, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Prompt embeddings (P, L, C) -> a PEFT LoRA state dict in ``layout``."""
    check_layout(model, layout)
    tokens = generate_tokens(model, condition)             # (T, h, w) normalised
    weights = normalizer.denormalize(tokens.float().cpu())  # (T, h, w)
    return tokens_to_state_dict(weights, layout, dtype=dtype)
