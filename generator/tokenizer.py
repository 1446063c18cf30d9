"""The LoRA tokenizer: a PEFT state dict <-> a fixed grid of weight "tokens" (T, h, w).

DnD (seed 000/001) turns an adapter into tokens the decoder can predict. For every LoRA module,
A (r x in) and B transposed (r x out) are cut along their long dimension into chunks of width w
(the last chunk zero-padded); each chunk is one token of shape (r, w), zero-padded to h = the
largest rank. All tokens of all modules, in a deterministic order, are stacked into (T, h, w).

The layout is derived only from the state dict's own shapes (no per-model table), is
JSON-serialisable, and carries a fingerprint so a generator can refuse a mismatched adapter.
Normalisation statistics are fitted over the *training* adapters (``TokenNormalizer``), because a
generated adapter's own statistics are unknown at generation time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from registry.peft_io import parse_lora_key

LAYOUT_FORMAT = "dnd-lora-tokens/1"
DEFAULT_MAX_CHUNK_WIDTH = 256
FALLBACK_CHUNK_WIDTH = 64


# -----------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class ModuleLayout:
    """Where one LoRA module's A and B^T live in the token grid."""

    prefix: str          # e.g. base_model.model.model.layers.0.self_attn.q_proj
    module_name: str     # the PEFT target_modules entry, e.g. q_proj
    a_key: str           # state-dict key of A (r x in)
    b_key: str           # state-dict key of B (out x r)
    rank: int
    in_features: int
    out_features: int
    a_start: int         # index of A's first token
    a_tokens: int        # ceil(in / w)
    b_start: int         # index of B^T's first token
    b_tokens: int        # ceil(out / w)


@dataclass(frozen=True)
class LoraLayout:
    """The token grid of one adapter shape: (num_tokens, token_height, chunk_width)."""

    chunk_width: int
    token_height: int
    modules: tuple[ModuleLayout, ...]
    format: str = LAYOUT_FORMAT
    fingerprint: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "modules", tuple(self.modules))
        expected = _fingerprint(self._canonical_dict())
        if self.fingerprint and self.fingerprint != expected:
            raise ValueError("layout fingerprint does not match its contents")
        object.__setattr__(self, "fingerprint", expected)

    @property
    def num_tokens(self) -> int:
        return sum(m.a_tokens + m.b_tokens for m in self.modules)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The token grid shape (T, h, w)."""
        return (self.num_tokens, self.token_height, self.chunk_width)

    @property
    def target_modules(self) -> list[str]:
        """Sorted unique PEFT module names (for ``adapter_config.json``)."""
        return sorted({m.module_name for m in self.modules})

    @property
    def ranks(self) -> dict[str, int]:
        """Module prefix -> LoRA rank."""
        return {m.prefix: m.rank for m in self.modules}

    @property
    def num_parameters(self) -> int:
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules)

    def _canonical_dict(self) -> dict:
        return {
            "format": self.format,
            "chunk_width": self.chunk_width,
            "token_height": self.token_height,
            "modules": [asdict(m) for m in self.modules],
        }

    def to_dict(self) -> dict:
        return {**self._canonical_dict(), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LoraLayout":
        if data.get("format", LAYOUT_FORMAT) != LAYOUT_FORMAT:
            raise ValueError(f"unsupported layout format {data.get('format')!r}")
        modules = tuple(ModuleLayout(**m) for m in data["modules"])
        return cls(chunk_width=int(data["chunk_width"]), token_height=int(data["token_height"]),
                   modules=modules, fingerprint=data.get("fingerprint", ""))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LoraLayout":
        return cls.from_dict(json.loads(text))


def _fingerprint(canonical: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def natural_sort_key(key: str) -> tuple:
    """Sort key that orders digit runs numerically: layers.2 < layers.10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", key) if part)


def lora_module_pairs(state_dict: Mapping[str, Tensor]) -> list[tuple[str, str, str]]:
    """(prefix, a_key, b_key) for each LoRA module, naturally sorted by prefix.

    Raises on keys that are not LoRA A/B weights (DoRA magnitudes, modules_to_save, ...).
    """
    pairs, used = [], set()
    for key in state_dict:
        parsed = parse_lora_key(key)
        if parsed is None or parsed.part != "A":
            continue
        b_key = parsed.key("B")
        if b_key not in state_dict:
            raise ValueError(f"{key} has no matching {b_key}")
        pairs.append((parsed.module, key, b_key))
        used.update((key, b_key))
    unsupported = sorted(set(state_dict) - used)
    if unsupported:
        raise ValueError(f"not LoRA A/B weights, cannot tokenize: {unsupported[:5]}")
    if not pairs:
        raise ValueError("state dict has no LoRA weights")
    return sorted(pairs, key=lambda pair: natural_sort_key(pair[0]))


def suggest_chunk_width(state_dict: Mapping[str, Tensor],
                        max_width: int = DEFAULT_MAX_CHUNK_WIDTH) -> int:
    """The largest divisor of gcd(all in/out dims) that is <= max_width, so no chunk is padded.

    Falls back to 64 (or the largest dim, if smaller) when that divisor is below 16 (odd dims):
    padding is then cheaper than thousands of narrow tokens.
    """
    dims = []
    for _, a_key, b_key in lora_module_pairs(state_dict):
        dims += [state_dict[a_key].shape[1], state_dict[b_key].shape[0]]
    common = math.gcd(*dims)
    width = max(d for d in range(1, min(common, max_width) + 1) if common % d == 0)
    return width if width >= 16 else min(FALLBACK_CHUNK_WIDTH, max_width, max(dims))


def layout_from_state_dict(state_dict: Mapping[str, Tensor],
                           chunk_width: int | None = None) -> LoraLayout:
    """Derive the token layout from a PEFT LoRA state dict's own shapes.

    ``chunk_width=None`` picks ``suggest_chunk_width(state_dict)``.
    """
    width = chunk_width or suggest_chunk_width(state_dict)
    if width < 1:
        raise ValueError("chunk_width must be positive")
    modules, start = [], 0
    for prefix, a_key, b_key in lora_module_pairs(state_dict):
        a, b = state_dict[a_key], state_dict[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{prefix}: A {tuple(a.shape)} and B {tuple(b.shape)} are not r x in, out x r")
        rank, in_features, out_features = a.shape[0], a.shape[1], b.shape[0]
        a_tokens, b_tokens = math.ceil(in_features / width), math.ceil(out_features / width)
        modules.append(ModuleLayout(
            prefix=prefix, module_name=prefix.rsplit(".", 1)[-1], a_key=a_key, b_key=b_key,
            rank=rank, in_features=in_features, out_features=out_features,
            a_start=start, a_tokens=a_tokens, b_start=start + a_tokens, b_tokens=b_tokens))
        start += a_tokens + b_tokens
    return LoraLayout(chunk_width=width, token_height=max(m.rank for m in modules), modules=tuple(modules))


# -----------------------------------------------------------------------------
# weights <-> tokens (pure tensor functions)


def matrix_to_tokens(matrix: Tensor, width: int, height: int) -> Tensor:
    """(r, n) -> (ceil(n / w), h, w): chunks along n, zero-padded in both dims."""
    rank, length = matrix.shape
    n_chunks = math.ceil(length / width)
    padded = torch.nn.functional.pad(matrix, (0, n_chunks * width - length, 0, height - rank))  # (h, n_chunks*w)
    return padded.reshape(height, n_chunks, width).transpose(0, 1)  # (n_chunks, h, w)


def tokens_to_matrix(tokens: Tensor, rank: int, length: int) -> Tensor:
    """(n_chunks, h, w) -> (r, n): the inverse of ``matrix_to_tokens``."""
    n_chunks, _, width = tokens.shape
    rows = tokens[:, :rank, :].transpose(0, 1)  # (r, n_chunks, w)
    return rows.reshape(rank, n_chunks * width)[:, :length]  # (r, n)


def state_dict_to_tokens(state_dict: Mapping[str, Tensor], layout: LoraLayout) -> Tensor:
    """A PEFT LoRA state dict -> float32 token grid (T, h, w)."""
    width, height = layout.chunk_width, layout.token_height
    pieces = []
    for m in layout.modules:
        a, b = state_dict[m.a_key], state_dict[m.b_key]
        if tuple(a.shape) != (m.rank, m.in_features) or tuple(b.shape) != (m.out_features, m.rank):
            raise ValueError(f"{m.prefix}: shapes {tuple(a.shape)}, {tuple(b.shape)} do not match the layout")
        pieces.append(matrix_to_tokens(a.detach().float().cpu(), width, height))    # (a_tokens, h, w)
        pieces.append(matrix_to_tokens(b.detach().float().cpu().T, width, height))  # (b_tokens, h, w)
    return torch.cat(pieces, dim=0).contiguous()  # (T, h, w)


def tokens_to_state_dict(tokens: Tensor, layout: LoraLayout,
                         dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A token grid (T, h, w) -> PEFT LoRA state dict (keys as in the adapter the layout came from)."""
    if tuple(tokens.shape) != layout.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match layout {layout.shape}")
    tokens = tokens.detach().cpu()
    state = {}
    for m in layout.modules:
        a = tokens_to_matrix(tokens[m.a_start:m.a_start + m.a_tokens], m.rank, m.in_features)   # (r, in)
        bt = tokens_to_matrix(tokens[m.b_start:m.b_start + m.b_tokens], m.rank, m.out_features)  # (r, out)
        state[m.a_key] = a.to(dtype).contiguous()
        state[m.b_key] = bt.T.to(dtype).contiguous()  # (out, r)
    return state


def token_mask(layout: LoraLayout) -> Tensor:
    """Bool (T, h, w): True where a token holds a real weight, False on padding."""
    mask = torch.zeros(layout.shape, dtype=torch.bool)
    width = layout.chunk_width
    for m in layout.modules:
        for start, count, length in ((m.a_start, m.a_tokens, m.in_features),
                                     (m.b_start, m.b_tokens, m.out_features)):
            mask[start:start + count, :m.rank, :] = True
            tail = length - (count - 1) * width  # valid columns in the last chunk
            mask[start + count - 1, :, tail:] = False
    return mask


# -----------------------------------------------------------------------------
# normalisation fitted over training adapters


class TokenNormalizer:
    """Statistics fitted over training token grids: x_norm = (x - mean) / std_t.

    ``center="element"`` (default) subtracts the mean training adapter (mean of shape (T, h, w)),
    so a generator predicts deviations from it and an all-zero output decodes to that mean;
    ``center="token"`` subtracts one scalar per token (mean of shape (T,)). The std is always one
    scalar per token (T,), the spread around that mean. Padding (mask False) is ignored by the fit
    and mapped to 0 by ``normalize``/``denormalize``.
    """

    def __init__(self, mean: Tensor, std: Tensor, mask: Tensor | None = None):
        self.mean = mean.float()  # (T,) or (T, h, w)
        self.std = std.float()    # (T,)
        self.mask = None if mask is None else mask.bool()  # (T, h, w)

    @classmethod
    def fit(cls, grids: Sequence[Tensor] | Tensor, mask: Tensor | None = None,
            center: str = "element", eps: float = 1e-8) -> "TokenNormalizer":
        """Fit over K grids: a (K, T, h, w) tensor, or a sequence of (T, h, w) grids and/or
        (K_i, T, h, w) stacks (e.g. one per task), read chunk by chunk so the set is never copied
        whole: two passes (mean, then spread), each holding one chunk at a time."""
        if center not in ("element", "token"):
            raise ValueError("center must be 'element' or 'token'")
        chunks = [grids] if isinstance(grids, Tensor) else list(grids)
        chunks = [c if c.ndim == 4 else c[None] for c in chunks]  # each (K_i, T, h, w)
        if not chunks or any(c.ndim != 4 for c in chunks) or len({tuple(c.shape[1:]) for c in chunks}) != 1:
            shapes = [tuple(c.shape) for c in chunks]
            raise ValueError(f"expected (K, T, h, w) grids of one (T, h, w) shape, got {shapes}")
        total = sum(c.shape[0] for c in chunks)                   # K
        valid = (torch.ones(chunks[0].shape[1:], dtype=torch.bool) if mask is None
                 else mask.bool().cpu())                          # (T, h, w)
        weights = valid.float()                                   # (T, h, w)
        count = (total * weights.sum(dim=(1, 2))).clamp_min(1)    # (T,)
        element_sum = sum(c.detach().float().cpu().sum(dim=0) for c in chunks)  # (T, h, w)
        if center == "element":
            mean = element_sum / total * valid                    # (T, h, w)
            broadcast_mean = mean
        else:
            mean = (element_sum * weights).sum(dim=(1, 2)) / count  # (T,)
            broadcast_mean = mean[:, None, None]
        squares = sum(((c.detach().float().cpu() - broadcast_mean) * weights).pow(2).sum(dim=(0, 2, 3))
                      for c in chunks)                            # (T,)
        std = (squares / count).sqrt()                            # (T,)
        return cls(mean, std.clamp_min(eps), None if mask is None else valid)

    def _broadcast(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        mean = self.mean.to(x.device, x.dtype)
        mean = mean[:, None, None] if mean.ndim == 1 else mean  # (T, 1, 1) or (T, h, w)
        std = self.std.to(x.device, x.dtype)[:, None, None]    # (T, 1, 1)
        mask = None if self.mask is None else self.mask.to(x.device)
        return mean, std, mask

    def normalize(self, grids: Tensor) -> Tensor:
        """(..., T, h, w) weights -> normalised tokens."""
        mean, std, mask = self._broadcast(grids)
        out = (grids - mean) / std
        return out if mask is None else out * mask

    def denormalize(self, tokens: Tensor) -> Tensor:
        """(..., T, h, w) normalised tokens -> weights."""
        mean, std, mask = self._broadcast(tokens)
        out = tokens * std + mean
        return out if mask is None else out * mask

    def state_dict(self) -> dict[str, Tensor]:
        state = {"mean": self.mean.contiguous(), "std": self.std.contiguous()}
        if self.mask is not None:
            state["mask"] = self.mask.contiguous()
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> "TokenNormalizer":
        return cls(state["mean"], state["std"], state.get("mask"))


def stack_token_grids(state_dicts: Iterable[Mapping[str, Tensor]], layout: LoraLayout) -> Tensor:
    """Tokenize several adapters with one layout: (K, T, h, w)."""
    return torch.stack([state_dict_to_tokens(sd, layout) for sd in state_dicts])
