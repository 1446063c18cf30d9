"""One precision policy for harvest, evaluation, generator training and generation.

``--precision auto|fp32|bf16``:

- ``fp32``: everything in float32 (the reference; bit-for-bit what the project did before).
- ``bf16``: matmuls in bfloat16 under ``torch.autocast``. Trainable parameters (LoRA A/B, generator
  weights) stay float32 ("master weights"), so AdamW updates are exact; a *frozen* base model is
  stored in bfloat16 (``frozen_dtype``), which saves autocast's per-call weight casts and half the
  memory traffic, and needs no master copy because it never changes.
- ``auto`` (the default): ``bf16`` where the hardware makes it faster, else ``fp32``. On CPU that
  means the processor has AMX tiles (asked of torch, not assumed from the CPU name); on CUDA,
  ``torch.cuda.is_bf16_supported()``. AVX-512 BF16 alone is not enough: on such a CPU (no AMX) a
  LoRA harvest step took 2.58 CPU s in bf16 against 1.73-1.78 in fp32, 1.5x slower, and evaluation
  was level (``benchmarks/bench_harvest.py --modes fp32,bf16 --rounds 2``), while with AMX bf16 is
  1.6-2.8x faster. Asking for ``bf16`` explicitly still works everywhere (slowly where emulated).

The resolved choice (``fp32`` or ``bf16``, never ``auto``) is what adapters and generator artifacts
record in their metadata.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from registry.errors import RegistryError

PRECISIONS = ("auto", "fp32", "bf16")
ENV_VAR = "REGISTRY_PRECISION"  # overrides the ``auto`` default (e.g. to force fp32 in a test run)


class PrecisionError(RegistryError):
    """An unknown precision name."""


def device_type(device: Any) -> str:
    """``cpu`` or ``cuda`` (or another torch device type) from a device string or object."""
    return str(device or "cpu").split(":", 1)[0]


def native_bf16(device: Any = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 faster than float32, as torch reports it: CUDA's bf16
    support, or AMX tiles on CPU (AVX-512 BF16 without AMX measured slower than fp32; module doc)."""
    import torch

    kind = device_type(device)
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        cpu = getattr(torch, "cpu", None)
        amx = getattr(cpu, "_is_amx_tile_supported", None)
        return bool(amx and amx())
    return False


def resolve(precision: str | None, device: Any = "cpu") -> str:
    """``fp32`` or ``bf16`` for a requested precision (``None`` means ``$REGISTRY_PRECISION`` or auto)."""
    requested = (precision or os.environ.get(ENV_VAR) or "auto").lower()
    if requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r} (choose one of: {', '.join(PRECISIONS)})")
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


def frozen_dtype(precision: str):
    """The dtype to store frozen weights in (a base model that no gradient updates)."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def identity(precision: str) -> dict:
    """What a resolved precision adds to the identity hash of a run (harvest id, resume and generator
    fingerprints): nothing for fp32, so the ids of runs made before this policy existed stay valid."""
    return {} if precision == "fp32" else {"precision": precision}


@contextlib.contextmanager
def autocast(precision: str, device: Any = "cpu") -> Iterator[None]:
    """``torch.autocast`` to bfloat16 for ``bf16``; a no-op context for ``fp32``."""
    import torch

    if precision == "bf16":
        with torch.autocast(device_type(device), dtype=torch.bfloat16):
            yield
    else:
        yield
