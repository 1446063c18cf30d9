"""Drag-and-Drop (DnD) hyper-convolutional decoder: prompt embeddings (B, N, L, C) -> LoRA tokens (B, T, h, w).

Each hyper-convolutional layer (seed 000, eqs. 2.3.2) maps (B, N, L, C) -> (B, N', L', C'):

    c_W = ConvH1(ConvW1(c))            # width conv acts on C, then height conv acts on L
    c_H = ConvW2(ConvH2(c))            # the same two, other order
    c'  = ConvL((c_W + c_H + b) / 3)   # layer-wise conv acts on N; b is a learned bias

How the convs are implemented here: each is a ``Conv1d`` whose *channels* are the dimension it
acts on (so it mixes that dimension densely and can resize it: C -> C', L -> L', N -> N') and whose
kernel slides along one of the two other dimensions; the third dimension is folded into the batch.

    ConvW: channels C, slides along L, batch B*N
    ConvH: channels L, slides along C, batch B*N
    ConvL: channels N, slides along C, batch B*L

DnD's reference code uses a k x k Conv2d over both other dimensions; one sliding dimension keeps
the cost k instead of k^2, which matters on a CPU. Inputs are LayerNorm-ed over C, a GELU sits
between the two convs of each path and after every layer but the last, and a layer whose output
shape equals its input shape is residual.

The shape cascade is computed, never hand-written: L and C are interpolated geometrically from
(L, C) to (h, w) over ``n_layers``; N grows geometrically to ``hidden_tokens`` over the first
``n_layers - 1`` layers and the last layer expands it to T. The cap keeps the final N -> T conv
(cost T*h*w*hidden_tokens*k) affordable; ``hidden_tokens=None`` interpolates N -> T geometrically
like L and C. An explicit ``shapes`` list (DnD's ``model_config``) overrides the computation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Shape = tuple[int, int, int]


@dataclass
class DnDConfig:
    n_prompts: int                 # N: prompts per condition (e.g. 16)
    prompt_tokens: int             # L: tokens kept per prompt (e.g. 64)
    embed_dim: int                 # C: encoder hidden size (384 for MiniLM)
    tokens: int                    # T: LoRA tokens
    token_height: int              # h: max LoRA rank
    token_width: int               # w: chunk width
    n_layers: int = 4
    kernel: int = 5
    hidden_tokens: int | None = 64  # the largest N before the last layer (None: plain geometric)
    shapes: list[Shape] | None = None  # explicit cascade [(N, L, C), ..., (T, h, w)]
    layout_fingerprint: str | None = None  # the LoraLayout this decoder was built for

    def __post_init__(self):
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError("kernel must be a positive odd number")
        if self.n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        if self.shapes is not None:
            self.shapes = [tuple(int(d) for d in s) for s in self.shapes]

    @property
    def input_shape(self) -> Shape:
        return (self.n_prompts, self.prompt_tokens, self.embed_dim)

    @property
    def output_shape(self) -> Shape:
        return (self.tokens, self.token_height, self.token_width)

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["shapes"] is not None:
            data["shapes"] = [list(s) for s in data["shapes"]]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "DnDConfig":
        return cls(**dict(data))

    @classmethod
    def from_layout(cls, layout, n_prompts: int = 16, prompt_tokens: int = 64, embed_dim: int = 384,
                    **kwargs) -> "DnDConfig":
        """A config whose output grid is ``layout.shape`` (any object with shape and fingerprint)."""
        tokens, height, width = layout.shape
        return cls(n_prompts=n_prompts, prompt_tokens=prompt_tokens, embed_dim=embed_dim,
                   tokens=tokens, token_height=height, token_width=width,
                   layout_fingerprint=layout.fingerprint, **kwargs)


def geometric_steps(start: int, end: int, steps: int) -> list[int]:
    """steps + 1 integers from start to end, evenly spaced in log space."""
    if steps == 0:
        return [end]
    return [max(1, round(start * (end / start) ** (i / steps))) for i in range(steps + 1)]


def feature_shapes(config: DnDConfig) -> list[Shape]:
    """The (N, L, C) shape before and after every layer: n_layers + 1 entries."""
    if config.shapes is not None:
        shapes = [tuple(s) for s in config.shapes]
        if shapes[0] != config.input_shape or shapes[-1] != config.output_shape:
            raise ValueError(f"shapes must run from {config.input_shape} to {config.output_shape}")
        return shapes
    n = config.n_layers
    lengths = geometric_steps(config.prompt_tokens, config.token_height, n)
    widths = geometric_steps(config.embed_dim, config.token_width, n)
    if config.hidden_tokens is None:
        counts = geometric_steps(config.n_prompts, config.tokens, n)
    else:
        hidden = min(config.tokens, max(config.n_prompts, config.hidden_tokens))
        counts = geometric_steps(config.n_prompts, hidden, n - 1) + [config.tokens]
        counts[0] = config.n_prompts
    return list(zip(counts, lengths, widths))


# -----------------------------------------------------------------------------
# the three convolutions


class WidthConv(nn.Module):
    """ConvW: mixes C -> C' (channels), kernel slides along L."""

    def __init__(self, c_in: int, c_out: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        B, N, L, C = x.shape
        y = x.reshape(B * N, L, C).transpose(1, 2)  # (B*N, C, L)
        y = self.conv(y)                            # (B*N, C', L)
        return y.transpose(1, 2).reshape(B, N, L, -1)  # (B, N, L, C')


class HeightConv(nn.Module):
    """ConvH: mixes L -> L' (channels), kernel slides along C."""

    def __init__(self, l_in: int, l_out: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(l_in, l_out, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        B, N, L, C = x.shape
        y = self.conv(x.reshape(B * N, L, C))  # (B*N, L', C)
        return y.reshape(B, N, -1, C)          # (B, N, L', C)


class LayerConv(nn.Module):
    """ConvL: mixes N -> N' (channels), kernel slides along C."""

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(n_in, n_out, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        B, N, L, C = x.shape
        y = x.transpose(1, 2).reshape(B * L, N, C)  # (B*L, N, C)
        y = self.conv(y)                            # (B*L, N', C)
        return y.reshape(B, L, -1, C).transpose(1, 2)  # (B, N', L, C)


# -----------------------------------------------------------------------------
# layer and model


class HyperConvLayer(nn.Module):
    """(B, N, L, C) -> (B, N', L', C'): two ConvW/ConvH paths, averaged with a bias, then ConvL."""

    def __init__(self, shape_in: Shape, shape_out: Shape, kernel: int):
        super().__init__()
        n_in, l_in, c_in = shape_in
        n_out, l_out, c_out = shape_out
        self.norm = nn.LayerNorm(c_in)
        self.width1 = WidthConv(c_in, c_out, kernel)
        self.height1 = HeightConv(l_in, l_out, kernel)
        self.height2 = HeightConv(l_in, l_out, kernel)
        self.width2 = WidthConv(c_in, c_out, kernel)
        self.bias = nn.Parameter(torch.zeros(l_out, c_out))
        self.layer = LayerConv(n_in, n_out, kernel)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)                                   # (B, N, L, C)
        c_w = self.height1(F.gelu(self.width1(x)))         # (B, N, L', C')
        c_h = self.width2(F.gelu(self.height2(x)))         # (B, N, L', C')
        return self.layer((c_w + c_h + self.bias) / 3)     # (B, N', L', C')


class DnDDecoder(nn.Module):
    """The hyper-convolutional decoder: condition (B, N, L, C) -> normalised LoRA tokens (B, T, h, w)."""

    def __init__(self, config: DnDConfig):
        super().__init__()
        self.config = config
        self.shapes = feature_shapes(config)
        self.layers = nn.ModuleList(HyperConvLayer(shape_in, shape_out, config.kernel)
                                    for shape_in, shape_out in zip(self.shapes[:-1], self.shapes[1:]))
        with torch.no_grad():  # start near the mean adapter: small final outputs
            last = self.layers[-1].layer.conv
            last.weight.mul_(0.1)
            last.bias.zero_()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, condition: Tensor) -> Tensor:
        unbatched = condition.ndim == 3
        x = condition.unsqueeze(0) if unbatched else condition  # (B, N, L, C)
        if tuple(x.shape[1:]) != self.config.input_shape:
            raise ValueError(f"condition {tuple(x.shape[1:])} != expected {self.config.input_shape}")
        for i, layer in enumerate(self.layers):
            y = layer(x)                                   # (B, N', L', C')
            if i < len(self.layers) - 1:
                y = F.gelu(y)
            x = x + y if y.shape == x.shape else y
        return x.squeeze(0) if unbatched else x            # (B, T, h, w)
