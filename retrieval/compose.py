"""Compose k LoRA adapters into one, as pure tensor-in, tensor-out functions.

Each input adapter is a PEFT state dict (keys like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) with its rank and alpha; its
update of a module is ``ΔW_i = s_i B_i A_i`` with ``s_i = alpha / r`` (or ``alpha / sqrt(r)`` with
rsLoRA). Every strategy returns ONE adapter that PEFT loads as is. Unless a strategy says otherwise
the per-adapter scalings and weights are folded into the tensors and the output has
``lora_alpha == r`` and no rsLoRA, so PEFT's own scaling is exactly 1.

LoraRetriever strategies (DESIGN.md section 6):

- ``selection``: the top-1 adapter (largest weight), unchanged.
- ``mixture``: ``Σ_i w_i s_i B_i A_i`` exactly, as one adapter of rank ``Σ r_i`` (A's stacked, B's
  side by side, ``w_i s_i`` folded into ``B_i``). Ranks may differ.
- ``fusion``: parameter averaging, ``(Σ_i w_i s_i B_i)(Σ_i w_i A_i)``; each scaling is folded into its
  B before averaging, so with equal scalings this is ``s (Σ w_i B_i)(Σ w_i A_i)``. Has cross terms
  (not a ΔW average). Equal ranks required.

PEFT ``add_weighted_adapter`` strategies, with PEFT's semantics:

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the merge is applied to
  the A's and to the B's separately, with ``sign(w s) sqrt(|w s|)`` on A and ``sqrt(|w s|)`` on B.
  Equal ranks required.
- ``cat``: like ``mixture`` but PEFT folds ``w_i s_i`` into ``A_i``; same ΔW.
- ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): merge
  the full ``ΔW_i`` (task arithmetic, ties, ...), then truncated SVD to ``svd_rank`` (default: the
  largest input rank); ``B = U S``, ``A = Vh``.
- As in PEFT, a single input adapter always goes through ``linear``.

One difference from PEFT: when the first input uses rsLoRA, PEFT keeps ``use_rslora`` on the merged
config with ``lora_alpha = r``, which scales the merged ΔW by ``sqrt(r)``; here the output never uses
rsLoRA, so its ΔW is exactly the merge.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from registry.errors import RegistryError

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"

RETRIEVER_STRATEGIES = ("selection", "mixture", "fusion")
FACTOR_MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DELTA_MERGES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
STRATEGIES = RETRIEVER_STRATEGIES + FACTOR_MERGES + ("cat",) + DELTA_MERGES
EQUAL_RANK_STRATEGIES = ("fusion",) + FACTOR_MERGES
DENSITY_STRATEGIES = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                      "dare_ties_svd", "magnitude_prune_svd")
RANDOM_STRATEGIES = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")


class CompositionError(RegistryError, ValueError):
    """Adapters that cannot be composed, or a bad composition argument (one-line message)."""


@dataclass
class LoraAdapter:
    """A LoRA adapter as tensors: PEFT state dict, rank, alpha, rsLoRA flag and optional base model id."""

    state_dict: dict[str, torch.Tensor]
    rank: int
    alpha: float
    use_rslora: bool = False
    base_model: str | None = None
    name: str | None = None
    extra_config: dict = field(default_factory=dict, repr=False)

    @property
    def scaling(self) -> float:
        """PEFT's scaling of ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def modules(self) -> list[str]:
        """The state-dict prefixes of the LoRA-wrapped modules, in state-dict order."""
        return lora_modules(self.state_dict)

    @property
    def target_modules(self) -> list[str]:
        """Leaf names of the wrapped modules (``q_proj``, ``v_proj``...), as PEFT's ``target_modules``."""
        return sorted({module.rsplit(".", 1)[-1] for module in self.modules})

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of one module: A is (r, in), B is (out, r)."""
        return self.state_dict[module + LORA_A_SUFFIX], self.state_dict[module + LORA_B_SUFFIX]

    def delta_weight(self, module: str) -> torch.Tensor:
        """``ΔW = s B A`` of one module, (out, in), in float32."""
        lora_a, lora_b = self.factors(module)
        return self.scaling * (lora_b.float() @ lora_a.float())


def lora_modules(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Module prefixes of a PEFT LoRA state dict; refuse keys that are not plain LoRA A/B weights."""
    from registry.peft_io import parse_lora_key

    modules = []
    for key in state_dict:
        parsed = parse_lora_key(key)
        if parsed is None or parsed.adapter is not None:
            raise CompositionError(f"unsupported key {key!r}: only plain LoRA lora_A/lora_B weights can be composed")
        if parsed.part == "A":
            modules.append(parsed.module)
    for module in modules:
        if module + LORA_B_SUFFIX not in state_dict:
            raise CompositionError(f"module {module!r} has lora_A but no lora_B")
    if len(modules) * 2 != len(state_dict):
        raise CompositionError("state dict has lora_B weights without matching lora_A weights")
    return modules


# --- loading and saving PEFT directories -----------------------------------------------------------


def load_adapter_dir(directory: str | os.PathLike, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from registry import peft_io
    from registry.errors import InvalidAdapter

    directory = Path(directory)
    try:
        config, state_dict = peft_io.read_adapter_dir(directory)
    except InvalidAdapter as err:
        raise CompositionError(str(err)) from None
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CompositionError(f"{directory}: adapters with rank_pattern/alpha_pattern are not supported")
    if config.get("use_dora"):
        raise CompositionError(f"{directory}: DoRA adapters are not supported")
    return LoraAdapter(
        state_dict=state_dict,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora", False)),
        base_model=config.get("base_model_name_or_path"),
        name=name or directory.name,
        extra_config={"task_type": config.get("task_type")},
    )


def peft_config_dict(adapter: LoraAdapter, task_type: str | None = "CAUSAL_LM") -> dict:
    """The ``adapter_config.json`` content PEFT needs to load ``adapter``.

    ``LoraConfig(...).to_dict()`` depends only on its arguments and the installed peft, so it is
    cached in the model cache by both (importing peft costs ~4 s of transformers imports in a fresh
    process); a damaged or foreign record is ignored and rewritten.
    """
    import hashlib
    import importlib.metadata

    from registry.base_models import models_cache_dir
    from registry.atomic import atomic_write

    arguments = dict(r=adapter.rank, lora_alpha=adapter.alpha, use_rslora=adapter.use_rslora,
                     target_modules=sorted(adapter.target_modules), task_type=adapter.extra_config.get("task_type") or task_type,
                     base_model_name_or_path=adapter.base_model)
    key_text = json.dumps({"peft": importlib.metadata.version("peft"), "format": 1, "arguments": arguments},
                          sort_keys=True, default=str)
    path = models_cache_dir() / "peft-config" / f"{hashlib.sha256(key_text.encode()).hexdigest()}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("key") == key_text and isinstance(record.get("config"), dict):
            return record["config"]
    except (OSError, ValueError):
        pass
    config = _peft_config_dict(adapter, task_type)
    try:
        atomic_write(path, json.dumps({"key": key_text, "config": config}, sort_keys=True).encode())
    except (OSError, TypeError):
        pass
    return config


def _peft_config_dict(adapter: LoraAdapter, task_type: str | None) -> dict:
    from peft import LoraConfig

    config = LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        target_modules=adapter.target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type=adapter.extra_config.get("task_type") or task_type,
        base_model_name_or_path=adapter.base_model,
        inference_mode=True,
    )
    config = config.to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in LoraConfig; JSON needs a list
    return config


def save_adapter_dir(adapter: LoraAdapter, directory: str | os.PathLike,
                     task_type: str | None = "CAUSAL_LM") -> Path:
    """Write ``adapter`` as a PEFT directory that ``PeftModel.from_pretrained`` loads."""
    from registry.peft_io import write_adapter_dir

    return write_adapter_dir(directory, adapter.state_dict, peft_config_dict(adapter, task_type))


# --- weights --------------------------------------------------------------------------------------


def retrieval_weights(scores: Sequence[float] | torch.Tensor, mode: Literal["uniform", "softmax"] = "uniform",
                      temperature: float = 1.0) -> torch.Tensor:
    """Mixture weights from retrieval scores: uniform ``1/k``, or ``softmax(scores / temperature)``."""
    scores = torch.as_tensor(scores, dtype=torch.float32).flatten()
    if scores.numel() == 0:
        raise CompositionError("no retrieval scores: need at least one adapter")
    if mode == "uniform":
        return torch.full_like(scores, 1.0 / scores.numel())
    if mode == "softmax":
        if temperature <= 0:
            raise CompositionError(f"temperature must be > 0, got {temperature}")
        return torch.softmax(scores / temperature, dim=0)
    raise CompositionError(f"unknown weight mode {mode!r}: use 'uniform' or 'softmax'")


# --- validation -----------------------------------------------------------------------------------


def check_composable(adapters: Sequence[LoraAdapter], strategy: str) -> list[str]:
    """Raise ``CompositionError`` unless the adapters can be composed; return the shared module list."""
    if strategy not in STRATEGIES:
        raise CompositionError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if len(adapters) == 0:
        raise CompositionError("cannot compose zero adapters (k == 0)")
    labels = [adapter.name or f"#{index}" for index, adapter in enumerate(adapters)]
    bases = {adapter.base_model for adapter in adapters if adapter.base_model}
    if len(bases) > 1:
        raise CompositionError(f"adapters were trained on different base models: {sorted(bases)}")
    modules = adapters[0].modules
    if strategy == "selection":
        return modules
    for label, adapter in zip(labels[1:], adapters[1:]):
        if set(adapter.modules) != set(modules):
            raise CompositionError(
                f"adapters {labels[0]} and {label} target different modules "
                f"({adapters[0].target_modules} vs {adapter.target_modules}) or layers")
    for module in modules:
        shapes = {(adapter.factors(module)[0].shape[1], adapter.factors(module)[1].shape[0]) for adapter in adapters}
        if len(shapes) > 1:
            raise CompositionError(f"module {module} has different in/out shapes across adapters: {sorted(shapes)}")
        for label, adapter in zip(labels, adapters):
            lora_a, lora_b = adapter.factors(module)
            if lora_a.shape[0] != adapter.rank or lora_b.shape[1] != adapter.rank:
                raise CompositionError(f"adapter {label}: module {module} has rank {lora_a.shape[0]}, "
                                       f"config says r={adapter.rank}")
    ranks = [adapter.rank for adapter in adapters]
    if strategy in EQUAL_RANK_STRATEGIES and len(adapters) > 1 and len(set(ranks)) > 1:
        raise CompositionError(f"strategy {strategy!r} needs equal ranks, got ranks {ranks}; "
                               "use 'mixture', 'cat' or 'svd' for different ranks")
    return modules


def _as_weights(weights: Sequence[float] | torch.Tensor | None, k: int) -> list[float]:
    """Weights as a list of floats; None means uniform ``1/k``."""
    if weights is None:
        return [1.0 / k] * k
    weights = [float(weight) for weight in torch.as_tensor(weights).flatten()]
    if len(weights) != k:
        raise CompositionError(f"got {len(weights)} weights for {k} adapters")
    return weights


def _merged_adapter(template: LoraAdapter, state_dict: dict[str, torch.Tensor], rank: int, base: str | None,
                    name: str | None) -> LoraAdapter:
    """An output adapter with scaling 1 (``lora_alpha == r``, no rsLoRA)."""
    return LoraAdapter(state_dict=state_dict, rank=rank, alpha=float(rank), use_rslora=False, base_model=base,
                       name=name, extra_config=dict(template.extra_config))


# --- per-module merges (pure tensor functions) ---------------------------------------------------


def mixture_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficients: Sequence[float]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ c_i B_i A_i`` as one rank-``Σ r_i`` pair: A's stacked, ``c_i B_i`` side by side."""
    # stack A's along the rank dimension: (Σr, in)
    lora_a = torch.cat([a for a, _ in factors], dim=0)
    # fold each coefficient into its B, then concatenate along rank: (out, Σr)
    lora_b = torch.cat([c * b for (_, b), c in zip(factors, coefficients)], dim=1)
    return lora_a, lora_b


def cat_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficients: Sequence[float]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``cat``: same ΔW as ``mixture`` but each coefficient folded into its A."""
    lora_a = torch.cat([c * a for (a, _), c in zip(factors, coefficients)], dim=0)
    lora_b = torch.cat([b for _, b in factors], dim=1)
    return lora_a, lora_b


def fusion_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float],
                   scalings: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameter averaging: ``A = Σ w_i A_i``, ``B = Σ w_i s_i B_i`` (scalings folded into B)."""
    lora_a = sum(w * a for (a, _), w in zip(factors, weights))
    lora_b = sum(w * s * b for (_, b), w, s in zip(factors, weights, scalings))
    return lora_a, lora_b


def _merge_functions() -> tuple:
    """PEFT's merge functions, imported on first use: importing peft costs ~4 s of transformers
    imports in a fresh process, and only the ``linear``/``ties``/``dare``/``magnitude_prune`` strategies
    need it (selection, mixture and fusion do not)."""
    from peft.utils.merge_utils import dare_linear, dare_ties, magnitude_prune, task_arithmetic, ties

    return task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune


def factor_merge(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficients: Sequence[float],
                 method: str, density: float | None = None, majority_sign_method: str = "total"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's linear/ties/dare/magnitude_prune on A's and B's separately, with ``sqrt(|c|)`` on each side."""
    task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune = _merge_functions()
    # split each coefficient c = w s over both factors; the sign goes on A only
    weights_a = torch.tensor([math.copysign(math.sqrt(abs(c)), c) for c in coefficients])
    weights_b = torch.tensor([math.sqrt(abs(c)) for c in coefficients])
    merged = []
    for tensors, weights in (([a for a, _ in factors], weights_a), ([b for _, b in factors], weights_b)):
        if method == "linear":
            merged.append(task_arithmetic(tensors, weights))
        elif method == "ties":
            merged.append(ties(tensors, weights, density, majority_sign_method))
        elif method == "dare_linear":
            merged.append(dare_linear(tensors, weights, density))
        elif method == "dare_ties":
            merged.append(dare_ties(tensors, weights, density, majority_sign_method))
        elif method == "magnitude_prune":
            merged.append(magnitude_prune(tensors, weights, density))
        else:
            raise CompositionError(f"unknown factor merge {method!r}")
    return merged[0], merged[1]


def delta_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], method: str, density: float | None = None,
                majority_sign_method: str = "total") -> torch.Tensor:
    """Merge full ΔW's (out, in) as PEFT's ``*svd`` strategies do before the SVD."""
    task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune = _merge_functions()
    weights = torch.tensor(list(weights), dtype=deltas[0].dtype)
    if method == "svd":
        return task_arithmetic(list(deltas), weights)
    if method == "ties_svd":
        return ties(list(deltas), weights, density, majority_sign_method)
    if method == "dare_linear_svd":
        return dare_linear(list(deltas), weights, density)
    if method == "dare_ties_svd":
        return dare_ties(list(deltas), weights, density, majority_sign_method)
    if method == "magnitude_prune_svd":
        return magnitude_prune(list(deltas), weights, density)
    raise CompositionError(f"unknown delta merge {method!r}")


def svd_factors(delta: torch.Tensor, rank: int, clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (out, in): ``B = U S`` (out, r), ``A = Vh`` (r, in)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    # keep the top singular directions; fold S into U
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    # optional quantile clamp, as PEFT / kohya's svd_merge_lora
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    # pad with zeros when delta has fewer singular directions than rank
    if u.shape[1] < rank:
        u = torch.nn.functional.pad(u, (0, rank - u.shape[1]))
        vh = torch.nn.functional.pad(vh, (0, 0, 0, rank - vh.shape[0]))
    return vh, u


def low_rank_svd_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``svd_factors(lora_b @ lora_a, rank)`` without forming ΔW: A (R, in), B (out, R) with R small.

    ΔW = B A has rank <= R, so QR both factors and take the SVD of the small (R, R) core:
    B = Qb Rb, Aᵀ = Qa Ra  =>  ΔW = Qb (Rb Raᵀ) Qaᵀ = (Qb U) S (Vh Qaᵀ).
    """
    q_b, r_b = torch.linalg.qr(lora_b)  # (out, R), (R, R)
    q_a, r_a = torch.linalg.qr(lora_a.T)  # (in, R), (R, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # (R, R) each
    left = (q_b @ u)[:, :rank] * s[:rank]  # (out, r): U S
    right = (vh @ q_a.T)[:rank, :]  # (r, in): Vh
    if left.shape[1] < rank:  # fewer singular directions than rank: pad with zeros
        left = torch.nn.functional.pad(left, (0, rank - left.shape[1]))
        right = torch.nn.functional.pad(right, (0, 0, 0, rank - right.shape[0]))
    return right, left


# --- the entry point ------------------------------------------------------------------------------


def compose_adapters(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | torch.Tensor | None = None,
    strategy: str = "mixture",
    *,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int | None = None,
    name: str | None = None,
) -> LoraAdapter:
    """Compose ``adapters`` with ``weights`` (default uniform ``1/k``) into one PEFT-loadable adapter.

    ``density`` is required by the ties/dare/magnitude_prune strategies; ``svd_rank`` (default: the largest
    input rank) and ``svd_clamp`` apply to the ``*svd`` strategies; ``seed`` makes the dare strategies
    reproducible without touching the global RNG. See the module docstring for each strategy's formula.
    """
    modules = check_composable(adapters, strategy)
    weights = _as_weights(weights, len(adapters))
    base = next((adapter.base_model for adapter in adapters if adapter.base_model), None)
    if strategy in DENSITY_STRATEGIES and len(adapters) > 1:
        if density is None or not 0.0 <= density <= 1.0:
            raise CompositionError(f"strategy {strategy!r} needs density in [0, 1], got {density}")
    if majority_sign_method not in ("total", "frequency"):
        raise CompositionError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_rank is not None and svd_rank < 1:
        raise CompositionError(f"svd_rank must be >= 1, got {svd_rank}")

    # selection: the top-1 adapter as it is
    if strategy == "selection":
        top = max(range(len(adapters)), key=lambda index: weights[index])
        chosen = adapters[top]
        return LoraAdapter(dict(chosen.state_dict), chosen.rank, chosen.alpha, chosen.use_rslora,
                           chosen.base_model, name or chosen.name, dict(chosen.extra_config))

    # PEFT merges one adapter with `linear` whatever was asked
    if len(adapters) == 1 and strategy not in RETRIEVER_STRATEGIES:
        strategy = "linear"

    dtype = adapters[0].state_dict[modules[0] + LORA_A_SUFFIX].dtype
    scalings = [adapter.scaling for adapter in adapters]
    coefficients = [w * s for w, s in zip(weights, scalings)]
    ranks = [adapter.rank for adapter in adapters]
    if strategy in ("mixture", "cat"):
        new_rank = sum(ranks)
    elif strategy in DELTA_MERGES:
        new_rank = svd_rank or max(ranks)
    else:
        new_rank = ranks[0]

    rng = torch.random.fork_rng() if seed is not None and strategy in RANDOM_STRATEGIES else contextlib.nullcontext()
    state_dict: dict[str, torch.Tensor] = {}
    with rng:
        if seed is not None and strategy in RANDOM_STRATEGIES:
            torch.manual_seed(seed)
        for module in modules:
            # float32 factors of this module, one pair per adapter
            factors = [tuple(t.float() for t in adapter.factors(module)) for adapter in adapters]
            if strategy == "mixture":
                lora_a, lora_b = mixture_factors(factors, coefficients)
            elif strategy == "cat":
                lora_a, lora_b = cat_factors(factors, coefficients)
            elif strategy == "fusion":
                lora_a, lora_b = fusion_factors(factors, weights, scalings)
            elif strategy in FACTOR_MERGES:
                lora_a, lora_b = factor_merge(factors, coefficients, strategy, density, majority_sign_method)
            elif strategy == "svd" and svd_clamp is None:
                # the weighted sum is B_cat A_cat exactly: truncate it without forming ΔW
                lora_a, lora_b = low_rank_svd_factors(*mixture_factors(factors, coefficients), new_rank)
            else:
                # full ΔW per adapter (scaling applied), merged, then truncated SVD
                deltas = [s * (b @ a) for (a, b), s in zip(factors, scalings)]
                merged = delta_merge(deltas, weights, strategy, density, majority_sign_method)
                lora_a, lora_b = svd_factors(merged, new_rank, svd_clamp)
            state_dict[module + LORA_A_SUFFIX] = lora_a.to(dtype).contiguous()
            state_dict[module + LORA_B_SUFFIX] = lora_b.to(dtype).contiguous()
    return _merged_adapter(adapters[0], state_dict, new_rank, base, name)


def composed_delta_weights(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """``{module: ΔW}`` of an adapter (handy to compare compositions)."""
    return {module: adapter.delta_weight(module) for module in adapter.modules}
