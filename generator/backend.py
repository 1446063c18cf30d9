"""The interface every generator architecture implements, and the checks their generation shares.

``generator.service`` (the doors: ``train_generator_from_registry``, ``generate_adapter``,
``generate_state_dict_for``, ``load_generator_artifact``) dispatches to a ``GeneratorBackend`` by
architecture (training) or by artifact type (loading, generating): ``generator.dnd_service.DND``
and ``generator.cvae_service.CVAE``. A new objective or architecture is one more backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

from generator.errors import GeneratorError


class GeneratorBackend(Protocol):
    """One generator architecture: train one from the registry, build a stored one, generate with it."""

    arch: str                 # "dnd", "cvae": the ``--arch`` name
    artifact_type: str        # the registry artifact type it stores ("generator-dnd", ...)
    default_batch_size: int

    def train(self, reg, *, name: str, tasks: Sequence[str] | None, exclude_tasks: Sequence[str], steps: int,
              lr: float, batch_size: int, n_prompts: int, device, on_step: Callable | None, resume: bool,
              on_status: Callable | None, **options):
        """Train on the registry's harvested adapters (resumably) and store the artifact; its ``ArtifactInfo``."""

    def build(self, info, tensors: dict, device):
        """Check a stored artifact's tensors against its metadata and build its ``LoadedGenerator``."""

    def generate(self, reg, prompts: list[str], info, base_model: str | None, device, pooled: bool,
                 precision: str | None = None) -> tuple[dict, dict, dict, object]:
        """Prompts -> (PEFT state dict, adapter_config dict, timings, prompt vectors or None)."""


@dataclass(frozen=True)
class FunctionBackend:
    """A ``GeneratorBackend`` made of an architecture's three service functions (what DnD, its SFT
    objective and the CVAE are). ``accepts_n_prompts`` False drops the ``n_prompts`` argument of
    ``train`` (the CVAE conditions on a task vector, not on N prompts)."""

    arch: str
    artifact_type: str
    default_batch_size: int
    train_fn: Callable
    build_fn: Callable
    generate_fn: Callable
    accepts_n_prompts: bool = True

    def train(self, reg, **arguments):
        if not self.accepts_n_prompts:
            arguments.pop("n_prompts", None)
        return self.train_fn(reg, **arguments)

    def build(self, info, tensors, device):
        return self.build_fn(info, tensors, device)

    def generate(self, reg, prompts, info, base_model, device, pooled, precision=None):
        return self.generate_fn(reg, prompts, info, base_model, device, pooled, precision)


def clean_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    cleaned = [p.strip() for p in prompts if isinstance(p, str)]
    if not cleaned:
        raise GeneratorError("no prompts given: a generator needs at least one prompt")
    if len(cleaned) != len(list(prompts)) or any(not p for p in cleaned):
        raise GeneratorError("prompts must be non-empty strings")
    return cleaned

def check_base(loaded_meta: Mapping, generator_ref: str, base_model: str | None) -> None:
    if base_model is None:
        return
    from registry import base_models

    wanted = base_models.base_model_id(base_model)
    if wanted != loaded_meta.get("base_model"):
        raise GeneratorError(f"generator {generator_ref} was trained for base model {loaded_meta.get('base_model')}, "
                             f"not {wanted}")

def sync_device(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)

def resolve_precision(precision: str | None, device) -> str:
    """``registry.precision.resolve`` with its error as a ``GeneratorError`` (one line)."""
    from registry.precision import PrecisionError, resolve

    try:
        return resolve(precision, device)
    except PrecisionError as err:
        raise GeneratorError(str(err)) from None
