"""The CVAE's data, training loop and decoding (the model is ``generator.cvae``, as DnD's is
``generator.dnd`` and its training ``generator.training``).

``CVAEDataset``: (normalised flat weights (D,), task vector (H,)) pairs; ``train_cvae``: AdamW on
``cvae_loss`` through the shared, resumable ``generator.training.run_steps``; ``generate`` /
``generate_cvae_state_dict``: decode z = 0 (or a sample) for a task vector into a PEFT state dict.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from registry.precision import resolve as resolve_precision

from .cvae import DEFAULT_KL_WEIGHT, LoraCVAE, cvae_loss, flat_to_state_dict, flatten_tokens
from .tokenizer import LoraLayout, TokenNormalizer
from .training import LayoutMismatch, TrainState, resolve_device, resume_optimizer, run_steps


# -----------------------------------------------------------------------------
# data


class CVAEDataset:
    """Pairs of (normalised flat weights (D,), task vector (H,)); one pair per adapter checkpoint.

    ``task_of`` (optional) names each pair's task; checkpoints of one task share its vector.
    """

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]], task_of: Sequence[str] | None = None):
        if not pairs:
            raise ValueError("a CVAE dataset needs at least one (weights, task vector) pair")
        flat = [w.detach().float().cpu().reshape(-1) for w, _ in pairs]  # K x (D,)
        if len({w.shape[0] for w in flat}) != 1:
            raise ValueError("all weight vectors must have the same length D")
        self.weights = torch.stack(flat)                                            # (K, D)
        self.conditions = torch.stack([c.detach().float().cpu().reshape(-1) for _, c in pairs])  # (K, H)
        if task_of is not None and len(task_of) != len(pairs):
            raise ValueError("task_of needs one entry per pair")
        self.task_of = list(task_of) if task_of is not None else None

    @classmethod
    def from_grids(cls, grids: Mapping[str, Sequence[Tensor] | Tensor], vectors: Mapping[str, Tensor],
                   normalizer: TokenNormalizer, mask: Tensor) -> "CVAEDataset":
        """task -> raw token grids (K_task, T, h, w), task -> task vector (H,)."""
        missing = sorted(set(grids) ^ set(vectors))
        if missing:
            raise ValueError(f"tasks need both adapters and a task vector: {missing}")
        entries = [(task, grid) for task in sorted(grids) for grid in grids[task]]
        if not entries:
            return cls([])  # raises the one-line "needs at least one pair"
        first = flatten_tokens(normalizer.normalize(entries[0][1].float()), mask)  # (D,)
        weights = torch.empty((len(entries), first.shape[0]))  # (K, D), filled row by row: held once
        for row, (_, grid) in enumerate(entries):
            weights[row] = flatten_tokens(normalizer.normalize(grid.float()), mask)
        # built from its first pair (the checks), then given the filled rows
        dataset = cls([(weights[0], vectors[entries[0][0]])], [entries[0][0]])
        dataset.weights = weights
        dataset.conditions = torch.stack([vectors[t].detach().float().cpu().reshape(-1) for t, _ in entries])
        dataset.task_of = [t for t, _ in entries]
        return dataset

    @property
    def input_dim(self) -> int:
        return self.weights.shape[1]

    @property
    def cond_dim(self) -> int:
        return self.conditions.shape[1]

    def __len__(self) -> int:
        return len(self.weights)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A random batch (with replacement): weights (B, D), task vectors (B, H)."""
        indices = torch.randint(len(self), (batch_size,), generator=generator)
        return self.weights[indices], self.conditions[indices]


# -----------------------------------------------------------------------------
# training


def train_cvae(model: LoraCVAE, dataset: CVAEDataset | Sequence[tuple[Tensor, Tensor]], steps: int,
               lr: float = 1e-3, batch_size: int = 4, device: str | torch.device | None = None,
               on_step: Callable[[int, int, float], bool | None] | None = None,
               state: TrainState | None = None, seed: int = 0, kl_weight: float = DEFAULT_KL_WEIGHT,
               weight_decay: float = 0.0, grad_clip: float | None = 1.0,
               precision: str | None = None) -> tuple[LoraCVAE, TrainState]:
    """Train until ``state.step == steps`` (AdamW on MSE + kl_weight * KL); resumable.

    A fresh start (``state`` None or at step 0) first fits the condition standardisation on the
    dataset's task vectors and the basis (when ``basis_dim`` > 0) on its weights; a resumed run
    keeps the model's. The batch indices and the
    reparameterisation noise come from one CPU generator whose state is saved in ``TrainState``, so
    ``save_training_state`` / ``load_training_state`` (``generator.training``, safetensors + JSON)
    resume exactly. ``on_step(step, steps, loss)`` runs after every step; returning False stops.
    Runs on CUDA when ``device`` is None and CUDA is available; data moves one batch at a time.
    ``precision`` (``registry.precision``; None: auto): the forward's autocast; parameters, AdamW
    state and the loss stay float32.
    """
    if not isinstance(dataset, CVAEDataset):
        dataset = CVAEDataset(dataset)
    if dataset.input_dim != model.config.input_dim:
        raise LayoutMismatch(f"CVAE takes {model.config.input_dim} weights, data has {dataset.input_dim}")
    if dataset.cond_dim != model.config.cond_dim:
        raise ValueError(f"CVAE takes task vectors of size {model.config.cond_dim}, data has {dataset.cond_dim}")
    device = resolve_device(device)
    state = state or TrainState(seed=seed)
    model.to(device)
    if state.step == 0:
        model.fit_condition(dataset.conditions)
        if model.config.basis_dim:
            model.fit_basis(dataset.weights.to(device))  # (N, D)
    model.train()
    optimizer, rng = resume_optimizer(model.parameters(), state, lr, weight_decay)

    def batch_loss():
        weights, cond = dataset.sample(batch_size, rng)                  # (B, D), (B, H)
        noise = torch.randn(batch_size, model.config.latent_dim, generator=rng)  # (B, Z)
        weights = weights.to(device)
        recon, mu, logvar = model(weights, cond.to(device), noise.to(device))
        return cvae_loss(recon.float(), weights, mu.float(), logvar.float(), kl_weight)[0]

    run_steps(model, optimizer, state, steps, rng, batch_loss, grad_clip, on_step,
              precision=resolve_precision(precision, device), device=device)
    return model, state


# -----------------------------------------------------------------------------
# generation


def check_cvae_layout(model: LoraCVAE, layout: LoraLayout) -> None:
    """Raise ``LayoutMismatch`` unless the CVAE was built for this layout."""
    fingerprint = model.config.layout_fingerprint
    if fingerprint is not None and fingerprint != layout.fingerprint:
        raise LayoutMismatch(f"CVAE built for layout {fingerprint[:12]}, got {layout.fingerprint[:12]}")
    if model.config.input_dim != layout.num_parameters:
        raise LayoutMismatch(f"CVAE takes {model.config.input_dim} weights, layout has {layout.num_parameters}")


@torch.no_grad()
def generate(model: LoraCVAE, cond: Tensor, sample: bool = False,
             generator: torch.Generator | None = None) -> Tensor:
    """Task vector(s) (H,) or (B, H) -> normalised flat weights (D,) or (B, D).

    ``sample=False`` decodes the prior mean z = 0 (deterministic); ``sample=True`` draws
    z ~ N(0, I) (from ``generator`` when given, on the CPU).
    """
    model.eval()
    unbatched = cond.ndim == 1
    cond = (cond.unsqueeze(0) if unbatched else cond).to(model.device)  # (B, H)
    c = model.embed_condition(cond)                                     # (B, E)
    shape = (cond.shape[0], model.config.latent_dim)
    z = torch.randn(shape, generator=generator) if sample else torch.zeros(shape)  # (B, Z)
    out = model.decode(z.to(model.device), c)                           # (B, D)
    return out[0] if unbatched else out


@torch.no_grad()
def reconstruct(model: LoraCVAE, weights: Tensor, cond: Tensor) -> Tensor:
    """Weights (B, D) and task vectors (B, H) -> decoded posterior mean (B, D)."""
    model.eval()
    weights, cond = weights.to(model.device), cond.to(model.device)
    c = model.embed_condition(cond)   # (B, E)
    mu, _ = model.encode(weights, c)  # (B, Z)
    return model.decode(mu, c)        # (B, D)


def generate_cvae_state_dict(model: LoraCVAE, cond: Tensor, normalizer: TokenNormalizer, layout: LoraLayout,
                             dtype: torch.dtype = torch.float32, sample: bool = False,
                             generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """A task vector (H,) -> a PEFT LoRA state dict in ``layout``."""
    check_cvae_layout(model, layout)
    flat = generate(model, cond.reshape(-1), sample=sample, generator=generator)  # (D,)
    return flat_to_state_dict(flat, layout, normalizer, dtype=dtype)
