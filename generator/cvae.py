"""ICM-LoRA's conditional VAE (seed 003): task vector (H,) <-> flattened normalised LoRA weights (D,).

    x (B, D) --pad--> (B, D', 1) --strided conv stack--> (B, P, C) --1x1--> (B, P, F_c) --flatten-->
    [features (B, P*F_c) ; cond (B, E)] --Linear--> mu, logvar (B, Z)  # the condition joins before the heads
    z = mu + exp(logvar / 2) * eps                                      # reparameterisation
    decoder([z ; cond]) = conv path + basis path                        # the condition joins before decoding
      conv path:  --Linear--> (B, P, F_c) --1x1--> (B, P, C) --transposed conv stack--> (B, D', 1) --crop--> (B, D)
      basis path: --MLP--> coefficients (B, K) @ basis (K, D) --> (B, D)

x is one adapter's real weights only: its ``TokenNormalizer``-normalised token grid flattened
through ``token_mask(layout)`` (``flatten_tokens``), so padding is never modelled; D =
``layout.num_parameters`` (2,442,240 for SmolLM2-135M, r=8, seven projections), padded with zeros
to D' = P * prod(strides). Every conv has kernel = stride (non-overlapping patches), so each layer
divides (encoder) or multiplies (decoder) the length by exactly its stride; they run channels-last
as one matmul per layer (``PatchConv``), because at D in the millions a CPU step is bound by
memory traffic at full resolution, not by arithmetic. SiLU between layers.

Why two decoder paths. The paper's decoder is the transposed-conv stack alone. Its last layers are
shared by every position, so each patch of prod(strides) output weights is one fixed function of
the F_c numbers at its position: it can draw structure repeated along the adapter, not weights
that differ freely from task to task. Measured on the zoo (15 tasks x 10 checkpoints of
SmolLM2-135M, element-centred): 99.9 % of the normalised variance lies *between* tasks (the
checkpoints of one task are nearly identical; AdamW moves every LoRA weight by about the learning
rate per step, so each task's weights are a dense, noise-like displacement of its own), the top 16
principal directions hold 99.93 %, and the conv-only CVAE decoded the mean adapter for every task
(cosine 1.000 between its outputs). So the decoder adds a learned basis of K directions (K, D),
initialised from the training set's top-K principal directions (``principal_basis``, scaled so the
coefficients have unit variance) and trained with the rest, whose K coefficients are an MLP of
[z ; cond]. With K >= the number of training tasks it can place every task's adapter; the cost is
K * D parameters, i.e. the generator stores about K adapters' worth of weights (``basis_dim = 0``
gives the paper's conv-only decoder).

The condition: the task vector (``generator.task_vector``) is standardised with statistics fitted
over the training tasks (``fit_condition``: minus the mean task vector, divided by one scalar RMS,
because task vectors of one base model are nearly parallel and only their differences tell tasks
apart), then projected to E = ``cond_embed`` dims shared by encoder and decoder.

Loss (``cvae_loss``) = MSE over the D real weights + ``kl_weight`` * KL(q(z|x,c) || N(0, I)), the KL
summed over the Z latent dims and averaged over the batch. ``kl_weight`` defaults to 1e-3: the
paper uses a small weight so reconstruction dominates; relative to a *mean* MSE over D elements,
1e-3 is already a far stronger prior pull than the exact ELBO's (2/D), which keeps the posterior
near N(0, I) so that decoding z = 0 (what generation does) stays in distribution.

At the SmolLM2 size (D = 2,442,240, H = 576) the conv defaults give strides 8,8,8,8, P = 597,
F = F_c * P = 2,388 and 2.31 M parameters (9.2 MB in fp32); the basis adds K * D (K = 15: 36.6 M,
73 MB as the registry artifact stores it, in float16). The element-centred normaliser adds 9.8 MB,
a token-centred one 2.5 MB. One training step at batch 4 took ~0.55 s with 2 CPU threads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .tokenizer import LoraLayout, TokenNormalizer, state_dict_to_tokens, token_mask, tokens_to_state_dict

CVAE_FORMAT = "icm-lora-cvae/1"
DEFAULT_KL_WEIGHT = 1e-3


# -----------------------------------------------------------------------------
# config


@dataclass
class CVAEConfig:
    input_dim: int                          # D: real LoRA parameters (layout.num_parameters)
    cond_dim: int                           # H: task-vector size (the base model's hidden size)
    latent_dim: int = 256                   # Z
    strides: list[int] | None = None        # per conv layer; None: from ``positions`` (see auto_strides)
    channels: list[int] | None = None       # per conv layer; None: 8, 16, 32, 32, ... (capped at 32)
    positions: int = 512                    # target length P after the conv stack (when strides is None)
    flat_channels: int = 4                  # F_c: channels flattened into the latent heads (F = F_c * P)
    cond_embed: int = 128                   # E: projected condition size
    basis_dim: int = 0                      # K: learned basis directions (0: the paper's conv-only decoder)
    coefficient_hidden: int = 256           # width of the MLP [z ; cond] -> K coefficients
    layout_fingerprint: str | None = None   # the LoraLayout this CVAE was built for

    def __post_init__(self):
        if self.input_dim < 1 or self.cond_dim < 1 or self.latent_dim < 1:
            raise ValueError("input_dim, cond_dim and latent_dim must be >= 1")
        if self.flat_channels < 1 or self.cond_embed < 1 or self.positions < 1:
            raise ValueError("flat_channels, cond_embed and positions must be >= 1")
        if self.basis_dim < 0 or self.coefficient_hidden < 1:
            raise ValueError("basis_dim must be >= 0 and coefficient_hidden >= 1")
        if self.strides is None:
            self.strides = auto_strides(self.input_dim, self.positions)
        self.strides = [int(s) for s in self.strides]
        if not self.strides or min(self.strides) < 1:
            raise ValueError("strides must be a non-empty list of positive integers")
        if self.channels is None:
            self.channels = [min(32, 8 * 2 ** i) for i in range(len(self.strides))]
        self.channels = [int(c) for c in self.channels]
        if len(self.channels) != len(self.strides) or min(self.channels) < 1:
            raise ValueError("channels needs one positive entry per stride")

    @property
    def downsample(self) -> int:
        """prod(strides): how many weights one latent position covers."""
        return math.prod(self.strides)

    @property
    def padded_dim(self) -> int:
        """D': D rounded up to a multiple of prod(strides)."""
        return self.num_positions * self.downsample

    @property
    def num_positions(self) -> int:
        """P: the sequence length after the conv stack."""
        return -(-self.input_dim // self.downsample)

    @property
    def flat_features(self) -> int:
        """F = F_c * P: the flattened size entering the latent heads."""
        return self.flat_channels * self.num_positions

    def to_dict(self) -> dict:
        return {"format": CVAE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "CVAEConfig":
        data = dict(data)
        fmt = data.pop("format", CVAE_FORMAT)
        if fmt != CVAE_FORMAT:
            raise ValueError(f"unsupported CVAE config format {fmt!r}")
        return cls(**data)

    @classmethod
    def from_layout(cls, layout: LoraLayout, cond_dim: int, **kwargs) -> "CVAEConfig":
        """A config whose input is every real weight of ``layout`` (D = layout.num_parameters)."""
        return cls(input_dim=layout.num_parameters, cond_dim=cond_dim,
                   layout_fingerprint=layout.fingerprint, **kwargs)


def auto_strides(input_dim: int, positions: int, max_stride: int = 8) -> list[int]:
    """Strides of 8 while they keep at least ``positions`` positions, then one power of two
    for the rest; at least one stride (2) even for tiny inputs."""
    ratio = input_dim / positions
    strides: list[int] = []
    while math.prod(strides) * max_stride <= ratio:
        strides.append(max_stride)
    rest = ratio / math.prod(strides)
    if rest >= 2:
        strides.append(2 ** int(math.log2(rest)))
    return strides or [2]


# -----------------------------------------------------------------------------
# flat vectors <-> token grids <-> state dicts (pure tensor functions)


def flatten_tokens(grid: Tensor, mask: Tensor) -> Tensor:
    """(..., T, h, w) token grid -> (..., D): the real weights (mask True), row-major order."""
    return grid[..., mask.to(grid.device).bool()]


def unflatten_tokens(flat: Tensor, mask: Tensor) -> Tensor:
    """(..., D) -> (..., T, h, w): the inverse of ``flatten_tokens``, zeros on padding."""
    mask = mask.to(flat.device).bool()
    grid = flat.new_zeros(*flat.shape[:-1], *mask.shape)  # (..., T, h, w)
    grid[..., mask] = flat
    return grid


def state_dict_to_flat(state_dict: Mapping[str, Tensor], layout: LoraLayout,
                       normalizer: TokenNormalizer) -> Tensor:
    """A PEFT LoRA state dict -> its normalised real weights (D,) (the CVAE's x)."""
    grid = normalizer.normalize(state_dict_to_tokens(state_dict, layout))  # (T, h, w)
    return flatten_tokens(grid, token_mask(layout))                        # (D,)


def flat_to_state_dict(flat: Tensor, layout: LoraLayout, normalizer: TokenNormalizer,
                       dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Normalised real weights (D,) -> a PEFT LoRA state dict in ``layout``."""
    grid = unflatten_tokens(flat.detach().float().cpu(), token_mask(layout))  # (T, h, w)
    return tokens_to_state_dict(normalizer.denormalize(grid), layout, dtype=dtype)


def principal_basis(weights: Tensor, k: int) -> Tensor:
    """(N, D) normalised training weights -> (k, D): their top-k principal directions, each scaled by
    its RMS coefficient sqrt(lambda / N), so a training adapter's coefficients have unit variance.

    Uncentred (the normaliser already subtracted the mean adapter). Through the (N, N) Gram matrix
    (built in float32, eigendecomposed in float64), so the cost is N^2 * D and the memory (N, D):
    fine for the hundreds of adapters a registry holds. Directions beyond the data's rank (k > N, or variance under 1e-6 of the
    largest: float32 noise) are zero.
    """
    weights = weights.detach().float()
    N, D = weights.shape
    gram = (weights @ weights.T).double()                  # (N, N)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)    # ascending
    order = eigenvalues.flip(0)[:k].clamp_min(0.0)         # (k',) largest first
    vectors = eigenvectors.flip(1)[:, :k]                  # (N, k')
    keep = order > order.max().clamp_min(1e-30) * 1e-6     # drop directions at float32 noise level
    basis = (vectors[:, keep].T.float() @ weights) / math.sqrt(N)  # (k'', D) = X^T v / sqrt(N)
    out = weights.new_zeros(k, D)
    out[:basis.shape[0]] = basis
    return out


# -----------------------------------------------------------------------------
# encoder, decoder, model


class PatchConv(nn.Module):
    """A strided Conv1d with kernel = stride, channels-last: (B, L, C) -> (B, L / s, C').

    Non-overlapping patches make the conv one linear map per patch; in channels-last layout the
    patches are a free reshape, so at D in the millions this costs one matmul and no im2col or
    permute copies (measured 1.5-2x faster than ``nn.Conv1d`` on a CPU). The weight acts on a patch
    flattened as (s, C), i.e. ``Conv1d`` weight (C', C, s) permuted to (C', s, C).
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        self.linear = nn.Linear(stride * c_in, c_out)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        return self.linear(x.reshape(B, L // self.stride, self.stride * C))  # (B, L/s, C')


class PatchConvTranspose(nn.Module):
    """A ConvTranspose1d with kernel = stride, channels-last: (B, L, C) -> (B, L * s, C')."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride, self.c_out = stride, c_out
        self.linear = nn.Linear(c_in, stride * c_out)

    def forward(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return self.linear(x).reshape(B, L * self.stride, self.c_out)  # (B, L*s, C')


class ConvEncoder(nn.Module):
    """(B, D', 1) -> (B, P, F_c): a PatchConv + SiLU per stride, then a 1x1 conv to F_c."""

    def __init__(self, config: CVAEConfig):
        super().__init__()
        c_in, layers = 1, []
        for stride, c_out in zip(config.strides, config.channels):
            layers.append(PatchConv(c_in, c_out, stride))
            c_in = c_out
        self.convs = nn.ModuleList(layers)
        self.to_flat = nn.Linear(c_in, config.flat_channels)  # 1x1 conv

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.silu(conv(x))   # (B, D' / prod(strides[:i+1]), C_i)
        return self.to_flat(x)    # (B, P, F_c)


class ConvDecoder(nn.Module):
    """(B, P, F_c) -> (B, D', 1): a 1x1 conv back to C, then a PatchConvTranspose per stride
    (reversed), SiLU after every layer but the last."""

    def __init__(self, config: CVAEConfig):
        super().__init__()
        channels = list(config.channels)
        self.from_flat = nn.Linear(config.flat_channels, channels[-1])  # 1x1 conv
        outs = channels[-2::-1] + [1]  # C_{n-2}, ..., C_0, 1
        layers, c_in = [], channels[-1]
        for stride, c_out in zip(reversed(config.strides), outs):
            layers.append(PatchConvTranspose(c_in, c_out, stride))
            c_in = c_out
        self.deconvs = nn.ModuleList(layers)

    def forward(self, h: Tensor) -> Tensor:
        x = F.silu(self.from_flat(h))           # (B, P, C_{n-1})
        for i, deconv in enumerate(self.deconvs):
            x = deconv(x)                       # (B, length * stride, C)
            if i < len(self.deconvs) - 1:
                x = F.silu(x)
        return x                                # (B, D', 1)


class LoraCVAE(nn.Module):
    """Conditional VAE over flattened normalised LoRA weights, conditioned on a task vector."""

    def __init__(self, config: CVAEConfig):
        super().__init__()
        self.config = config
        Z, E, Fe = config.latent_dim, config.cond_embed, config.flat_features
        # condition standardisation, fitted over the training task vectors (fit_condition)
        self.register_buffer("cond_mean", torch.zeros(config.cond_dim))
        self.register_buffer("cond_scale", torch.ones(()))
        self.cond_proj = nn.Linear(config.cond_dim, E)
        self.encoder = ConvEncoder(config)
        self.heads = nn.Linear(Fe + E, 2 * Z)       # -> [mu ; logvar]
        self.latent_to_features = nn.Linear(Z + E, Fe)
        self.decoder = ConvDecoder(config)
        K = config.basis_dim
        if K:
            self.to_coefficients = nn.Sequential(nn.Linear(Z + E, config.coefficient_hidden), nn.SiLU(),
                                                 nn.Linear(config.coefficient_hidden, K))
            self.basis = nn.Parameter(torch.zeros(K, config.input_dim))  # (K, D), set by fit_basis
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Unit-scale signals through the stacks (PyTorch's default Linear init shrinks them ~3x per
        layer, which stalls a 4-deep stack at D in the millions), small outputs and logvar at start."""
        for module in list(self.encoder.modules()) + list(self.decoder.modules()):
            if isinstance(module, nn.Linear):  # each is followed by SiLU (except two, fixed below)
                nn.init.normal_(module.weight, std=math.sqrt(2.0 / module.in_features))
                nn.init.zeros_(module.bias)
        for module in (self.cond_proj, self.heads, self.latent_to_features, self.encoder.to_flat):
            nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.in_features))
            nn.init.zeros_(module.bias)
        Z = self.config.latent_dim
        self.heads.weight[Z:].mul_(0.01)            # logvar ~ 0: q(z|x,c) starts near the prior
        self.decoder.deconvs[-1].linear.weight.mul_(0.1)  # output ~ 0: the normaliser's mean adapter
        if self.config.basis_dim:
            nn.init.zeros_(self.to_coefficients[-1].weight)  # coefficients 0: the basis path starts silent
            nn.init.zeros_(self.to_coefficients[-1].bias)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def fit_condition(self, task_vectors: Tensor, eps: float = 1e-6) -> None:
        """Set the standardisation from K training task vectors (K, H): mean (H,), one scalar RMS.

        With a single task (or identical vectors) the RMS of the raw vectors is used instead.
        """
        vectors = task_vectors.detach().float().reshape(-1, self.config.cond_dim).to(self.cond_mean.device)
        mean = vectors.mean(dim=0)                             # (H,)
        spread = (vectors - mean).pow(2).mean().sqrt()         # scalar
        if vectors.shape[0] < 2 or spread <= eps * mean.pow(2).mean().sqrt().clamp_min(eps):
            spread = vectors.pow(2).mean().sqrt()
        self.cond_mean.copy_(mean)
        self.cond_scale.copy_(spread.clamp_min(eps))

    @torch.no_grad()
    def fit_basis(self, weights: Tensor) -> None:
        """Set the basis to the top-K principal directions of the (N, D) training weights."""
        if self.config.basis_dim:
            self.basis.copy_(principal_basis(weights, self.config.basis_dim).to(self.basis))

    def embed_condition(self, cond: Tensor) -> Tensor:
        """(B, H) task vectors -> (B, E)."""
        if cond.shape[-1] != self.config.cond_dim:
            raise ValueError(f"task vector of size {cond.shape[-1]}, expected {self.config.cond_dim}")
        standard = (cond.float() - self.cond_mean) / self.cond_scale  # (B, H)
        return self.cond_proj(standard)                               # (B, E)

    def encode(self, x: Tensor, cond_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D), (B, E) -> mu, logvar (B, Z)."""
        B, D = x.shape
        if D != self.config.input_dim:
            raise ValueError(f"weights of size {D}, expected {self.config.input_dim}")
        x = F.pad(x.float(), (0, self.config.padded_dim - D)).unsqueeze(2)  # (B, D', 1)
        features = self.encoder(x).flatten(1)                                # (B, P * F_c)
        stats = self.heads(torch.cat([features, cond_embedding], dim=1))    # (B, 2Z)
        mu, logvar = stats.chunk(2, dim=1)                                   # (B, Z) each
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, cond_embedding: Tensor) -> Tensor:
        """(B, Z), (B, E) -> normalised weights (B, D): the conv path plus the basis path."""
        B = z.shape[0]
        latent = torch.cat([z, cond_embedding], dim=1)                        # (B, Z + E)
        h = self.latent_to_features(latent)                                   # (B, P * F_c)
        h = h.reshape(B, self.config.num_positions, self.config.flat_channels)  # (B, P, F_c)
        out = self.decoder(h)[:, :self.config.input_dim, 0]                  # (B, D)
        if self.config.basis_dim:
            coefficients = self.to_coefficients(latent).float()             # (B, K)
            with torch.autocast(out.device.type, enabled=False):  # the adapter's weights themselves: fp32
                out = out.float() + coefficients @ self.basis                 # (B, K) @ (K, D)
        return out

    def forward(self, x: Tensor, cond: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, D), (B, H) -> reconstruction (B, D), mu, logvar (B, Z).

        ``noise`` (B, Z) is the reparameterisation's eps (drawn here when None; pass it for
        reproducible training); ``noise = 0`` decodes the posterior mean.
        """
        c = self.embed_condition(cond)                     # (B, E)
        mu, logvar = self.encode(x, c)                     # (B, Z)
        if noise is None:
            noise = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * noise.to(mu)    # (B, Z)
        return self.decode(z, c), mu, logvar


def cvae_loss(reconstruction: Tensor, target: Tensor, mu: Tensor, logvar: Tensor,
              kl_weight: float = DEFAULT_KL_WEIGHT) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mse, kl): mse = mean over B*D weights; kl = per-sample sum over Z, mean over B."""
    mse = F.mse_loss(reconstruction, target)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()
    return mse + kl_weight * kl, mse, kl
