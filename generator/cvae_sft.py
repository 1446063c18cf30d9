"""The ICM-LoRA CVAE given the SFT objective (issue 14, item 6): fine-tuned through the frozen base.

``registry train-generator --arch cvae --objective sft`` lands here. Two stages:

1. the CVAE is trained by reconstruction (``generator.cvae_service.train_cvae_from_registry``,
   ``recon_steps``, stored as ``<name>-recon``): it gives the normaliser, the condition's
   standardisation and the basis of the training adapters' principal directions;
2. its decoder at the prior mean (what generation decodes: z = 0) is trained as an SFT generator
   (``generator.sft.train_sft``): the decoded LoRA is plugged into the frozen base model and the loss
   is the next-token cross-entropy on the task's answers. The condition is the mean of N of the
   task's prompts' base-model states, a draw per step, exactly the task vector that
   ``generate`` computes from a user's prompts.

What trains in stage 2: the condition projection, the latent-to-features layer, the conv decoder
and the basis coefficients' MLP. The basis itself (K x D, 290 M numbers at K = 119 on SmolLM2) is
kept as a frozen, non-persistent buffer: SFT retrains how a condition chooses and shapes weights, not
the directions, and the training state saved every ``save_every`` steps stays small. The encoder
and the latent heads are unused at z = 0 and are kept as they were.

Measured (bench v2 on the whole 125-task zoo, 100 + 300 steps, README): on the ``variants`` split
0.037 against the multitask LoRA's 0.020 (+0.017 [+0.003, +0.033] paired) and the reconstruction-only
CVAE's 0.010, its own prompts beating another task's (+0.030) and random strings (+0.023) by paired
intervals: the one generator here that is not collapsed; on ``families`` 0.007, collapsed. Two more
training seeds (``bench --generator-seed 1``, ``2``) gave 0.013 and 0.013 on ``variants`` and 0.013 on
``families`` (seed 1), all collapsed: the seed-0 result did not replicate, so it is an option, not
the default.

With ``anchor`` (a REF, ``train-generator --anchor multitask``) the decoded adapter starts from that
adapter instead of the mean training adapter: ``anchor + gate * std * D(c)``, ``D(c)`` the normalised
decoder output, ``std`` the training adapters' per-token spread, ``gate`` a learned scalar from 0.1.
That is a ``TokenNormalizer`` with mean = anchor and std = gate * std, stored as the artifact's
normaliser. Measured (README): 0.023 on ``variants`` and 0.027 on ``families``, collapsed on both,
the gate at 0.099 and 0.094 after 300 steps: from the multitask LoRA, SFT found no prompt-specific
deviation worth growing, so it returns the multitask LoRA. The whole-adapter decode stays the default.

The result is an ordinary ``generator-cvae`` artifact (same tensors, so ``generate``,
``regenerate`` and the bench use it unchanged) whose metadata adds ``objective: sft``,
``fine_tuned_from`` (the stage-1 artifact), the SFT settings and the SFT training tasks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from generator.cvae import LoraCVAE, unflatten_tokens
from generator.tokenizer import TokenNormalizer, token_mask

CVAE_SFT_VERSION = "cvae-sft/1"  # part of the resume fingerprint
DEFAULT_RECON_STEPS = 200
DEFAULT_CONDITION_PROMPTS = 32  # prompts per task whose base-model states the conditions are drawn from
DEFAULT_ANCHOR_GATE = 0.1  # with an anchor: the decoded deviation starts at a tenth of the training adapters' spread


@dataclass(frozen=True)
class PriorDecoderConfig:
    """What ``train_sft`` and the saved training state read of a generator's config."""

    n_prompts: int  # prompts whose states are averaged into one condition

    def to_dict(self) -> dict:
        return asdict(self)


class CVAEPriorDecoder(nn.Module):
    """The CVAE's decoder at z = 0 as an SFT generator: prompt states (B, N, H) -> LoRA grids (B, T, h, w).

    The condition is the mean of the N states (the task vector of those prompts); the decoded,
    normalised weights are unflattened onto the token grid and denormalised. With an ``anchor``
    (T, h, w) the denormalisation is re-centred on it: ``anchor + gate * std * decoded`` (``gate``
    learned, from ``gate``), which is again a ``TokenNormalizer`` (mean = anchor, std = gate * std),
    so the stored artifact keeps the CVAE's format (``effective_normalizer``)."""

    def __init__(self, cvae: LoraCVAE, normalizer: TokenNormalizer, layout, n_prompts: int,
                 anchor: Tensor | None = None, gate: float = DEFAULT_ANCHOR_GATE):
        super().__init__()
        self.cvae = cvae
        self.config = PriorDecoderConfig(n_prompts)
        self.register_buffer("mask", token_mask(layout), persistent=False)               # (T, h, w) bool
        if anchor is not None and tuple(anchor.shape) != tuple(layout.shape):
            raise ValueError(f"anchor {tuple(anchor.shape)} does not match layout {tuple(layout.shape)}")
        mean = normalizer.mean.float() if anchor is None else anchor.float() * self.mask    # (T,) or (T, h, w)
        self.register_buffer("norm_mean", mean, persistent=False)
        self.register_buffer("norm_std", normalizer.std.float(), persistent=False)      # (T,)
        self.gate = None if anchor is None else nn.Parameter(torch.tensor(float(gate)))
        if cvae.config.basis_dim:  # frozen directions: a buffer, not saved with the training state
            basis = cvae.basis.detach()
            del cvae.basis
            cvae.register_buffer("basis", basis, persistent=False)                       # (K, D)
        for module in (cvae.encoder, cvae.heads):
            module.requires_grad_(False)

    def forward(self, condition: Tensor, anchor: Tensor | None = None, exclude: int | None = None) -> Tensor:
        """``anchor`` and ``exclude`` belong to the DnD heads; a CVAE has neither."""
        if anchor is not None:
            raise ValueError("the CVAE decodes the whole adapter: it takes no anchor")
        task_vector = condition.float().mean(dim=1)                                   # (B, H)
        c = self.cvae.embed_condition(task_vector)                                    # (B, E)
        z = c.new_zeros(c.shape[0], self.cvae.config.latent_dim)                      # (B, Z) the prior mean
        flat = self.cvae.decode(z, c).float()                                         # (B, D) normalised
        return self.effective_normalizer().denormalize(unflatten_tokens(flat, self.mask))  # (B, T, h, w)

    def effective_normalizer(self) -> TokenNormalizer:
        """Normalised decoder output -> weights: the stage-1 normaliser, or with an anchor
        mean = anchor and std = gate * std (what the artifact stores as its normaliser)."""
        std = self.norm_std if self.gate is None else self.gate * self.norm_std           # (T,)
        return TokenNormalizer(self.norm_mean, std, self.mask)

    def persistent_state(self) -> dict[str, Tensor]:
        """The CVAE's weights as the artifact stores them (the frozen basis included)."""
        state = {k: v.detach().cpu() for k, v in self.cvae.state_dict().items()}
        if self.cvae.config.basis_dim:
            state["basis"] = self.cvae.basis.detach().cpu()
        return state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def train_cvae_sft(reg, *, name: str = "cvae-sft", tasks: Sequence[str] | None = None,
                   exclude_tasks: Sequence[str] = (), steps: int = 500, lr: float = 1e-3,
                   batch_size: int = 2, device: str | None = None,
                   on_step: Callable[[int, int, float], bool | None] | None = None, resume: bool = True,
                   on_status: Callable[[str], None] | None = None, task_items: Mapping | None = None,
                   recon_steps: int = DEFAULT_RECON_STEPS, items_per_task: int = 4, n_prompts: int = 16,
                   item_max_length: int = 160, seed: int = 0, save_every: int = 50, grad_clip: float = 1.0,
                   precision: str | None = None, base_model: str | None = None, anchor: str | None = None,
                   **cvae_options):
    """Train the CVAE by reconstruction (``recon_steps``), then through the base model (``steps``);
    store the result as ``name`` (``ArtifactInfo``). ``batch_size`` is tasks per step, each with
    ``items_per_task`` train items (at most ``item_max_length`` tokens); ``task_items`` task ->
    [(prompt, answer)]; ``anchor`` a REF (the multitask LoRA): the decoded adapter is then
    ``anchor + gate * std * decoded`` (``CVAEPriorDecoder``), else the whole adapter; the CVAE's own
    options (``max_length`` among them: the task vector's prompt tokens) go to stage 1
    (``train_cvae_from_registry``)."""
    from generator.artifacts import CVAE_ARTIFACT_TYPE, NORMALIZER_PREFIX
    from generator.backend import resolve_precision
    from generator.cvae_service import (CVAE_PREFIX, DEFAULT_CVAE_BATCH_SIZE, TASK_VECTOR_PREFIX, build_cvae,
                                        train_cvae_from_registry)
    from generator.errors import GeneratorError
    from generator.sft import SFTTask, train_sft
    from generator.sft_service import _items_digest, adapter_tokens, lora_scaling, training_items
    from generator.task_vector import prompt_states
    from generator.training import resolve_device
    from generator.workdir import WorkDir, sha256_json, train_and_store
    from registry import base_models
    from registry.lm import encode_example, use_training_attention
    from registry.precision import frozen_dtype, identity as precision_identity
    from registry.refs import validate_name

    status = on_status or (lambda message: None)
    validate_name(name)
    if steps < 1 or recon_steps < 1 or batch_size < 1 or items_per_task < 1 or n_prompts < 1 or lr <= 0:
        raise GeneratorError("steps, reconstruction steps, tasks per step, items per task and n_prompts must be "
                             ">= 1 and lr > 0")
    if not task_items:
        raise GeneratorError("the SFT objective needs the training tasks' items (prompt, answer pairs)")
    task_items = training_items(task_items, tasks, exclude_tasks, items_per_task)
    harvested = [t for t in task_items if reg.list_adapters(kind="harvested", task=t)]
    if not harvested:
        raise GeneratorError("none of the SFT training tasks has a harvested adapter for the reconstruction stage")

    status(f"stage 1: the CVAE by reconstruction on {len(harvested)} harvested tasks")
    source = train_cvae_from_registry(
        reg, name=f"{name}-recon", tasks=harvested, exclude_tasks=exclude_tasks, steps=recon_steps,
        batch_size=DEFAULT_CVAE_BATCH_SIZE, device=device, resume=resume, on_status=status, seed=seed,
        base_model=base_model, precision=precision, **cvae_options)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    tensors, source = reg.load_artifact(source.ref, CVAE_ARTIFACT_TYPE)
    loaded = build_cvae(source, tensors, "cpu")  # checks the artifact; its frozen copy is not kept
    cvae_config, normalizer, layout = loaded.model.config, loaded.normalizer, loaded.layout
    del loaded
    scaling = lora_scaling(source.meta["peft_config"])
    anchor_info, anchor_tokens, _ = adapter_tokens(reg, anchor, layout) if anchor is not None else (None, None, None)

    status("stage 2: loading the base model; prompt states and train items")
    model, tokenizer = base_models.load_base(source.meta["base_model"], device=str(device), cached=False,
                                             dtype=frozen_dtype(precision))
    rng = torch.Generator().manual_seed(seed)
    sft_tasks = []
    for task, items in task_items.items():
        picks = torch.randperm(len(items), generator=rng)[:DEFAULT_CONDITION_PROMPTS].tolist()
        states = prompt_states(model, tokenizer, [items[i][0] for i in picks],
                               max_length=source.meta["condition"].get("max_length"))      # (P, H)
        examples = [encode_example(tokenizer, p, a, item_max_length) for p, a in items]
        sft_tasks.append(SFTTask(task, states, examples))
    use_training_attention(model, device)

    settings = {"lr": lr, "tasks_per_step": batch_size, "items_per_task": items_per_task, "n_prompts": n_prompts,
                "condition_prompts": DEFAULT_CONDITION_PROMPTS, "seed": seed, "grad_clip": grad_clip,
                "max_length": item_max_length}
    fingerprint = sha256_json({"source": source.sha256, "items": _items_digest(task_items), "training": settings,
                               "name": name, **precision_identity(precision), "code": CVAE_SFT_VERSION,
                               **({"anchor": anchor_info.digest} if anchor_info else {})})

    def build_model():
        cvae = LoraCVAE(cvae_config)
        cvae.load_state_dict({k[len(CVAE_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(CVAE_PREFIX)})
        return CVAEPriorDecoder(cvae, normalizer, layout, n_prompts, anchor_tokens)

    def store(generator, state, wall_time: float, resumed_from: int):
        weights = generator.persistent_state()
        if "basis" in weights:  # stored in float16, as stage 1 stored it (it did not change)
            weights["basis"] = weights["basis"].to(torch.float16)
        out = {f"{CVAE_PREFIX}{k}": v for k, v in weights.items()}
        out |= {k: v for k, v in tensors.items() if k.startswith((NORMALIZER_PREFIX, TASK_VECTOR_PREFIX))}
        if anchor_info is not None:  # the anchored denormalisation is the artifact's normaliser
            effective = generator.effective_normalizer()
            for part, value in (("mean", effective.mean), ("std", effective.std)):
                key = f"{NORMALIZER_PREFIX}{part}"
                out[key] = value.detach().cpu().to(tensors[key].dtype).contiguous()
        meta = {**source.meta, "objective": "sft", "fine_tuned_from": source.ref,
                "sft": {**settings, "steps": steps, "resumed_from": resumed_from, "device": str(device),
                        "precision": precision, "fingerprint": fingerprint, "final_loss": state.losses[-1],
                        "wall_time_s": round(wall_time, 3)},
                "sft_tasks": list(task_items), "items_per_task": {t: len(v) for t, v in task_items.items()},
                "parametrisation": ("anchor + gate * std * " if anchor_info else "")
                                   + "the CVAE's decoder at z = 0, fine-tuned through the base (basis frozen)",
                "anchor": anchor_info.ref if anchor_info else None,
                **({"anchor_gate": round(float(generator.gate.detach()), 6)} if anchor_info else {}),
                "final_loss": state.losses[-1],
                "wall_time_s": round(float(source.meta.get("wall_time_s", 0.0)) + wall_time, 3)}
        return out, meta

    started = time.perf_counter()
    info = train_and_store(
        reg, WorkDir(reg.home / "work" / "generators" / fingerprint[:24]), artifact_type=CVAE_ARTIFACT_TYPE,
        steps=steps, resume=resume, status=status, build_model=build_model, seed=seed, device=device,
        save_every=save_every, on_step=on_step,
        record={"fingerprint": fingerprint, "name": name, "arch": "cvae", "base_model": source.meta["base_model"]},
        store=store, train_chunk=lambda generator, state, target, on_chunk_step: train_sft(
            generator, model, sft_tasks, layout, steps=target, scaling=scaling,
            pad_id=tokenizer.pad_token_id, lr=lr, tasks_per_step=batch_size, items_per_task=items_per_task,
            grad_clip=grad_clip, state=state, seed=seed, device=device, precision=precision, on_step=on_chunk_step))
    status(f"stage 2 done in {time.perf_counter() - started:.0f} s")
    return info
