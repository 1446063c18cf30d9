"""The SFT objective for the DnD decoder: train it through the frozen base model (Text-to-LoRA).

Reconstruction (``generator.training``) regresses the decoder onto harvested weights, and harvested
LoRAs of similar tasks are not close in weight space (``B A = (B R)(R^-1 A)``), so it learns the
mean adapter. Here the decoder is trained on what an adapter is *for*: the generated LoRA is
plugged into the frozen base model and the loss is the next-token cross-entropy on the answers of
the task's train items; gradients reach only the decoder. The condition is a group of the task's
prompts (prompts only, never answers), exactly as at generation time.

The generated adapter is parametrised as a residual on a strong generic adapter (``ResidualHead``)::

    W(c) = anchor + gate * scale * D(c)        # (T, h, w) token grid of LoRA weights

``anchor`` is either one fixed token grid or, with a *retrieved* anchor, the fusion (mean token
grid, i.e. LoRA parameter averaging) of the k training adapters whose tasks' prompts are nearest to
the condition's (``nearest_pool`` on sentence-embedding centroids; a training task never retrieves
itself, so training sees what a held-out task will). Why it was tried: on the 87-task zoo the
fusion of the nearest harvested adapters was the strongest adapter for an unseen family member
(bench v2: fusion 0.223, multitask 0.083), and one fixed anchor lets the decoder ignore its
condition. Measured on the 44-task, four-family zoo (README) it did not pay: 0.045 on the variants
split against multitask 0.135 and mixture 0.070, its controls as good (collapsed); there retrieval
was weak and the multitask LoRA strong, so the multitask anchor stays the default
(``train-generator --anchor multitask``). The fixed anchor is the multitask LoRA of the training
tasks when there is one, so training starts from the strongest adapter a single LoRA can be (``gate`` then starts at 0.1, a
residual of a tenth of the anchor's size); otherwise a fixed random A with B = 0, PEFT's own LoRA
initialisation (``gate`` starts at 1). A generated A and B that both start near zero would make
each other's gradient vanish, which is why there is always a non-zero A to start from. ``scale``
is the per-module RMS of the anchor (``default_scale`` for a module that is zero, such as B), so
the decoder works in units of each module's own size; ``D`` is the hyper-convolutional decoder. The padding of the token
grid is masked to zero. A step draws several tasks; each gets its own generated LoRA and one
forward pass over a few of its train items.

The LoRA is applied functionally: forward hooks on the base model's target linears add
``scaling * (x A^T) B^T`` with A and B sliced out of the token grid, so no PEFT wrapper is
rebuilt per step and the graph runs from the loss back into the decoder.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from generator.dnd import DnDDecoder
from generator.tokenizer import LoraLayout, token_mask, tokens_to_matrix
from registry.lm import add_low_rank

DEFAULT_CONTRAST_MARGIN = 0.1  # nats per answer token (the hinge of the condition-sensitivity term)
DEFAULT_ROUTER_TEMPERATURE = 0.1  # retrieval router: cosine similarities / 0.1, so the nearest few tasks dominate

PEFT_PREFIX = "base_model.model."


@dataclass
class SFTTask:
    """One training task for the SFT objective: its prompts' embeddings and its encoded train items."""

    name: str
    condition: Tensor                                 # (P, L, C) prompt-token embeddings (prompts only)
    examples: list[tuple[list[int], int]] = field(default_factory=list)  # (token ids, prompt length)
    targets: Tensor | None = None                     # (K, T, h, w) harvested token grids (objective "both")
    anchor: Tensor | None = None                      # (T, h, w) its retrieved anchor (None: the head's fixed one)
    key_index: int | None = None                      # its row in a retrieval router's keys (left out in training)


# --------------------------------------------------------------------------------------------
# Weights: token grid -> LoRA factors (differentiable)
# --------------------------------------------------------------------------------------------


def lora_factors(weights: Tensor, layout: LoraLayout) -> dict[str, tuple[Tensor, Tensor]]:
    """Token grid (T, h, w) of weights -> {module prefix: (A (r, in), B (out, r))}, keeping the graph."""
    factors = {}
    for m in layout.modules:
        a = tokens_to_matrix(weights[m.a_start:m.a_start + m.a_tokens], m.rank, m.in_features)   # (r, in)
        bt = tokens_to_matrix(weights[m.b_start:m.b_start + m.b_tokens], m.rank, m.out_features)  # (r, out)
        factors[m.prefix] = (a, bt.T)
    return factors


def module_rms(weights: Tensor, layout: LoraLayout, floor: float = 1e-4) -> Tensor:
    """(T, 1, 1): the RMS of the matrix (A or B^T) each token belongs to (``floor`` where it is ~zero)."""
    scale = torch.full((weights.shape[0], 1, 1), floor, dtype=weights.dtype)
    mask = token_mask(layout)
    for m in layout.modules:
        for start, count in ((m.a_start, m.a_tokens), (m.b_start, m.b_tokens)):
            values = weights[start:start + count][mask[start:start + count]]
            rms = values.pow(2).mean().sqrt().item() if values.numel() else 0.0
            scale[start:start + count] = rms if rms > floor else floor
    return scale


def random_a_anchor(layout: LoraLayout, seed: int = 0) -> Tensor:
    """(T, h, w): A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's Kaiming-uniform bound), B = 0, padding 0."""
    from generator.tokenizer import matrix_to_tokens

    generator = torch.Generator().manual_seed(seed)
    grid = torch.zeros(layout.shape)
    for m in layout.modules:
        bound = 1 / math.sqrt(m.in_features)
        a = (torch.rand(m.rank, m.in_features, generator=generator) * 2 - 1) * bound  # (r, in)
        grid[m.a_start:m.a_start + m.a_tokens] = matrix_to_tokens(a, layout.chunk_width, layout.token_height)
    return grid


def pool_centroids(vectors: Sequence[Tensor]) -> Tensor:
    """Each pool task's prompt sentence embeddings (P_i, C) -> their unit-length means (N, C)."""
    means = torch.stack([v.float().mean(dim=0) for v in vectors])  # (N, C)
    return torch.nn.functional.normalize(means, dim=-1)


def nearest_pool(query: Tensor, centroids: Tensor, k: int, exclude: int | None = None) -> list[int]:
    """Indices of the ``k`` pool tasks most cosine-similar to the prompts ``query`` (P, C), best
    first; ``exclude`` (a pool index) is never returned (a training task does not retrieve itself)."""
    centre = torch.nn.functional.normalize(query.float().mean(dim=0), dim=-1)  # (C,)
    scores = centroids.float() @ centre                                       # (N,)
    if exclude is not None:
        scores[exclude] = -float("inf")
    count = min(k, len(scores) - (exclude is not None))
    return [int(i) for i in scores.topk(count).indices]


def fused_anchor(grids: Sequence[Tensor]) -> Tensor:
    """The retrieved adapters' token grids (each (T, h, w)) -> their mean (T, h, w): LoRA parameter
    averaging (``retrieval``'s fusion), the anchor a retrieved-anchor generator adds its residual to."""
    return torch.stack([g.float() for g in grids]).mean(dim=0)


def contrast_hinge(own_loss: Tensor, other_loss: Tensor, margin: float) -> Tensor:
    """``relu(margin + own - other)``: zero once a task's items score at least ``margin`` nats better
    under the LoRA generated from its own prompts than under another task's. A decoder that ignores
    its condition (every task gets the same adapter: own == other) pays ``margin`` per pair, so this
    term is what the bench's controls check, put into training."""
    return torch.relu(margin + own_loss - other_loss)


def recon_error(generated: Tensor, target: Tensor, scale: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error of a generated grid (T, h, w) to a harvested one, per module in units of
    the head's ``scale`` (T, 1, 1), padding (``mask``) excluded: the reconstruction regulariser."""
    squared = ((generated - target) / scale) ** 2 * mask
    return squared.sum() / mask.sum().clamp(min=1)


class ResidualHead(nn.Module):
    """W(c) = anchor + gate * scale * D(c), padding masked to zero (see the module docstring)."""

    def __init__(self, layout: LoraLayout, anchor: Tensor | None = None, gate: float | None = None,
                 default_scale: float = 0.01, seed: int = 0):
        super().__init__()
        fresh = anchor is None
        anchor = random_a_anchor(layout, seed) if fresh else anchor.detach().float().cpu()
        if tuple(anchor.shape) != layout.shape:
            raise ValueError(f"anchor {tuple(anchor.shape)} does not match layout {layout.shape}")
        scale = module_rms(anchor, layout, floor=default_scale)
        gate = (1.0 if fresh else 0.1) if gate is None else gate
        self.register_buffer("anchor", anchor)                           # (T, h, w)
        self.register_buffer("scale", scale)                             # (T, 1, 1)
        self.register_buffer("mask", token_mask(layout).float())         # (T, h, w)
        self.gate = nn.Parameter(torch.tensor(float(gate)))

    def forward(self, decoded: Tensor, anchor: Tensor | None = None) -> Tensor:
        """(..., T, h, w) decoder output -> (..., T, h, w) LoRA weights; ``anchor`` (T, h, w) replaces
        the fixed one (a retrieved anchor)."""
        anchor = self.anchor if anchor is None else anchor.to(self.anchor.device, self.anchor.dtype)
        return (anchor + self.gate * self.scale * decoded.float()) * self.mask


# --------------------------------------------------------------------------------------------
# The base model with a LoRA applied through hooks
# --------------------------------------------------------------------------------------------


class FunctionalLora:
    """Forward hooks that add ``scaling * (x A^T) B^T`` to the base model's target linears.

    Set ``weights`` to the output of :func:`lora_factors` before a forward pass (an empty dict
    runs the plain base). ``close()`` removes the hooks.
    """

    def __init__(self, model: nn.Module, layout: LoraLayout, scaling: float):
        self.scaling = scaling
        self.weights: dict[str, tuple[Tensor, Tensor]] = {}
        modules = dict(model.named_modules())
        self._handles = []
        for m in layout.modules:
            path = m.prefix[len(PEFT_PREFIX):] if m.prefix.startswith(PEFT_PREFIX) else m.prefix
            if path not in modules:
                raise ValueError(f"the base model has no module {path!r} (layout module {m.prefix})")
            self._handles.append(modules[path].register_forward_hook(self._hook(m.prefix)))

    def _hook(self, prefix: str):
        def add_lora(module, inputs, output):
            factors = self.weights.get(prefix)
            if factors is None:
                return output
            a, b = factors  # (r, in), (out, r)
            return add_low_rank(output, inputs[0], a, b, self.scaling)  # (B, T, out)
        return add_lora

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def stacked_lora(parts: Sequence[tuple[Mapping[str, Tensor], float]], layout: LoraLayout, scaling: float
                 ) -> dict[str, Tensor]:
    """LoRAs of one layout, each ``(state dict, its scaling)``, as one LoRA of rank ``Σ r_i`` whose
    scaling is ``scaling``: ``ΔW = Σ s_i B_i A_i`` (A's stacked along the rank, each ``s_i / scaling``
    folded into its B). How a generated adapter carries the adapter it was trained on top of."""
    stacked = {}
    for m in layout.modules:
        stacked[m.a_key] = torch.cat([sd[m.a_key].float() for sd, _ in parts], dim=0).contiguous()   # (Σr, in)
        stacked[m.b_key] = torch.cat([sd[m.b_key].float() * (s / scaling) for sd, s in parts],
                                     dim=1).contiguous()                                           # (out, Σr)
    return stacked


@contextmanager
def fixed_lora(model: nn.Module, layout: LoraLayout, grid: Tensor | None, scaling: float | None, device=None):
    """Within the block, ``model`` runs with the LoRA ``grid`` (T, h, w) added by its own hooks (None:
    nothing); a generated LoRA's hooks then add on top of it."""
    if grid is None:
        yield
        return
    hooks = FunctionalLora(model, layout, scaling)
    hooks.weights = lora_factors(grid.to(device) if device is not None else grid, layout)
    try:
        yield
    finally:
        hooks.close()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def draw_condition(task: SFTTask, n_prompts: int, rng: torch.Generator) -> Tensor:
    """N of the task's prompt embeddings (without replacement when it has at least N): (N, L, C)."""
    count = task.condition.shape[0]
    picks = (torch.randperm(count, generator=rng)[:n_prompts] if count >= n_prompts
             else torch.randint(count, (n_prompts,), generator=rng))
    return task.condition[picks]


def draw_examples(task: SFTTask, count: int, rng: torch.Generator) -> list[tuple[list[int], int]]:
    picks = torch.randperm(len(task.examples), generator=rng)[:count]
    return [task.examples[int(i)] for i in picks]


class SFTGenerator(nn.Module):
    """The decoder and its residual head: prompt embeddings (B, N, L, C) -> LoRA weights (B, T, h, w)."""

    def __init__(self, decoder: DnDDecoder, head: ResidualHead):
        super().__init__()
        self.decoder = decoder
        self.head = head

    @property
    def config(self):
        return self.decoder.config

    def forward(self, condition: Tensor, anchor: Tensor | None = None, exclude: int | None = None) -> Tensor:
        """``exclude`` is for the retrieval router's leave-one-out (``RankGatedGenerator``); a residual
        head's leave-one-out is its task's precomputed ``anchor``."""
        return self.head(self.decoder(condition), anchor)

    def weights(self, groups: Tensor, anchor: Tensor | None = None) -> Tensor:
        """Prompt groups (G, N, L, C) -> one LoRA grid (T, h, w): the decoder's outputs averaged
        before the (affine) head, which equals averaging the weights."""
        return self.head(self.decoder(groups).mean(dim=0), anchor)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------
# The rank-gated head: a shared LoRA whose rank components the prompts switch on and off
# --------------------------------------------------------------------------------------------


def rank_gate_index(layout: LoraLayout) -> Tensor:
    """(T, h) long: the gate each token row is scaled by. Row ``j`` of module ``m``'s A tokens takes
    gate ``m * r + j``; B's tokens and the padding rows take the last index (the constant 1)."""
    rank = layout.modules[0].rank
    index = torch.full((layout.num_tokens, layout.token_height), len(layout.modules) * rank, dtype=torch.long)
    for i, m in enumerate(layout.modules):
        index[m.a_start:m.a_start + m.a_tokens, :m.rank] = i * rank + torch.arange(m.rank)
    return index


def mean_prompt_embedding(condition: Tensor) -> Tensor:
    """(B, N, L, C) prompt-token embeddings (zero rows are padding) -> (B, C) unit-length mean."""
    valid = (condition.abs().sum(dim=-1) > 0).float()                                    # (B, N, L)
    per_prompt = (condition * valid[..., None]).sum(dim=2) / valid.sum(dim=2, keepdim=True).clamp(min=1)  # (B, N, C)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)                 # (B, C)


def embedding_standardiser(conditions: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The training tasks' prompt-token embeddings (each (P_i, L, C)) -> (centre (C,), spread ()):
    the mean of their mean prompt embeddings and the RMS distance of those means to it. Sentence
    embeddings of different tasks share a large common direction (cosine ~0.9), so the router reads
    ``(e - centre) / spread``, where tasks differ by about one unit."""
    means = router_keys(conditions)                                                 # (N, C)
    centre = means.mean(dim=0)                                                      # (C,)
    spread = (means - centre).pow(2).sum(dim=-1).mean().sqrt().clamp(min=1e-6)       # ()
    return centre, spread


def router_keys(conditions: Sequence[Tensor]) -> Tensor:
    """The training tasks' prompt-token embeddings (each (P_i, L, C)) -> (K, C): each task's unit-length
    mean prompt embedding, the keys the retrieval router compares an unseen task's prompts with."""
    return torch.cat([mean_prompt_embedding(c.float()[None]) for c in conditions])


class RankGatedGenerator(nn.Module):
    """W(c) = B diag(g(c)) A per module: one trained LoRA shared by every task, whose rank
    components are scaled by gates ``g = 1 + MLP(mean prompt embedding)``.

    Why this output space: the residual head's decoder writes a whole weight grid (millions of
    numbers) from a few dozen training tasks and learns one mean answer for all of them (bench v2:
    own prompts = another task's = random strings). Here the prompts choose only ``modules x rank``
    gains (1,680 on SmolLM2 at rank 8), read from the standardised mean prompt embedding
    (``embedding_standardiser``), over a LoRA that is itself trained on every task, starting
    from the multitask LoRA (``anchor``); the last layer of the MLP starts at zero, so the untrained
    generator *is* the anchor, and a gate that ignores the prompts is exactly a further-trained
    multitask LoRA (what the bench's controls tell apart). Gating A's row ``j`` scales the rank-1
    component ``b_j a_j^T``, so tasks can share some components and switch others: routing over a
    skill inventory (Polytropon), with the router reading the prompts instead of a task id.

    The retrieval router (``keys``: the training tasks' mean prompt embeddings, ``train-generator
    --head routed``) replaces the MLP by one learned gain vector per training task, mixed by the
    softmax of the prompts' cosine similarity to each task (standardised embeddings, temperature
    0.1): ``g = 1 + softmax(sim / t) V``. In training a task never reads its own row (``exclude``),
    so each row learns what helps the tasks *near* it, which is all an unseen task gets; and an
    unseen task's gains are always a mix of trained rows, never an MLP's extrapolation.

    Measured (bench v2, 44-task four-family zoo, variants split, 200 steps, README): the MLP router did not
    transfer. Router on the raw mean embedding: 0.130 against the multitask LoRA's 0.135, another
    task's prompts 0.125, random strings 0.120 (collapsed; the held-out tasks' gates differed by
    0.002-0.035 on average). Standardised router: 0.080, controls identical. So it is not the
    default; the tiny-llama test shows the mechanism is condition-sensitive when tasks are few
    and well separated. The retrieval router on the whole 125-task zoo (300 steps, 4 tasks a step,
    README) collapsed too: 0.007 (variants) and 0.017 (families), both controls identical; with
    ~10 draws per task its gain vectors moved by 0.014 on average.
    """

    def __init__(self, layout: LoraLayout, config, anchor: Tensor | None = None, hidden: int = 64, seed: int = 0,
                 standardiser: tuple[Tensor, Tensor] | None = None, keys: Tensor | None = None,
                 temperature: float = DEFAULT_ROUTER_TEMPERATURE):
        super().__init__()
        if len({m.rank for m in layout.modules}) != 1:
            raise ValueError("the rank-gated head needs one rank for every module")
        anchor = random_a_anchor(layout, seed) if anchor is None else anchor.detach().float().cpu()
        if tuple(anchor.shape) != layout.shape:
            raise ValueError(f"anchor {tuple(anchor.shape)} does not match layout {layout.shape}")
        self.config = config                                              # n_prompts, prompt_tokens, embed_dim
        self.lora = nn.Parameter(anchor.clone())                          # (T, h, w) the shared A and B^T
        self.register_buffer("mask", token_mask(layout).float())          # (T, h, w)
        self.register_buffer("gate_index", rank_gate_index(layout))       # (T, h)
        centre, spread = standardiser or (torch.zeros(config.embed_dim), torch.tensor(1.0))
        self.register_buffer("centre", centre.detach().float().clone())   # (C,) see embedding_standardiser
        self.register_buffer("spread", spread.detach().float().clone())   # ()
        n_gates = len(layout.modules) * layout.modules[0].rank
        if keys is None:  # the MLP router
            self.register_buffer("keys", None)
            self.router_in = nn.Linear(config.embed_dim, hidden)
            self.router_out = nn.Linear(hidden, n_gates)
            with torch.no_grad():  # gates start at exactly 1: the untrained generator is its anchor
                self.router_out.weight.zero_()
                self.router_out.bias.zero_()
        else:  # the retrieval router: one learned gain vector per training task, mixed by prompt similarity
            if keys.ndim != 2 or keys.shape[0] < 2 or keys.shape[1] != config.embed_dim:
                raise ValueError(f"the retrieval router needs (tasks >= 2, {config.embed_dim}) keys, got {tuple(keys.shape)}")
            self.register_buffer("keys", keys.detach().float().clone())                # (K, C) tasks' mean embeddings
            self.register_buffer("temperature", torch.tensor(float(temperature)))      # ()
            self.values = nn.Parameter(torch.zeros(keys.shape[0], n_gates))            # (K, M r) start at gain 1

    def gates(self, condition: Tensor, exclude: Tensor | int | None = None) -> Tensor:
        """(B, N, L, C) prompt-token embeddings -> (B, modules * rank) gains. ``exclude`` (an index per
        row, or one for all): the training task whose own value the retrieval router must not read
        (leave-one-out, as for a held-out task); the MLP router has no per-task rows and ignores it."""
        standard = (mean_prompt_embedding(condition.float()) - self.centre) / self.spread          # (B, C)
        if self.keys is None:
            hidden = torch.nn.functional.gelu(self.router_in(standard))                             # (B, H)
            return 1 + self.router_out(hidden)                                                      # (B, M r)
        return 1 + self.retrieval_weights(standard, exclude) @ self.values                          # (B, M r)

    def retrieval_weights(self, standard: Tensor, exclude: Tensor | int | None = None) -> Tensor:
        """(B, C) standardised query embeddings -> (B, K) softmax weights over the training tasks, by
        cosine similarity of standardised embeddings at the router's temperature."""
        keys = torch.nn.functional.normalize((self.keys - self.centre) / self.spread, dim=-1)       # (K, C)
        sims = torch.nn.functional.normalize(standard, dim=-1) @ keys.T                            # (B, K)
        if exclude is not None:
            rows = torch.as_tensor(exclude, device=sims.device).expand(sims.shape[0])               # (B,)
            sims = sims.masked_fill(torch.nn.functional.one_hot(rows, sims.shape[1]).bool(), -float("inf"))
        return torch.softmax(sims / self.temperature, dim=-1)                                      # (B, K)

    def apply_gates(self, gates: Tensor) -> Tensor:
        """(B, M r) gains -> (B, T, h, w) LoRA grids (the shared LoRA, A's rows scaled)."""
        extended = torch.cat([gates, gates.new_ones(gates.shape[0], 1)], dim=-1)  # (B, M r + 1)
        per_row = extended[:, self.gate_index]                                    # (B, T, h)
        return self.lora * per_row[..., None] * self.mask                         # (B, T, h, w)

    @staticmethod
    def _refuse_anchor(anchor: Tensor | None) -> None:
        if anchor is not None:
            raise ValueError("the rank-gated head has no retrieved anchor")

    def forward(self, condition: Tensor, anchor: Tensor | None = None, exclude: int | None = None) -> Tensor:
        self._refuse_anchor(anchor)
        return self.apply_gates(self.gates(condition, exclude))

    def weights(self, groups: Tensor, anchor: Tensor | None = None) -> Tensor:
        """Prompt groups (G, N, L, C) -> one LoRA grid (T, h, w): the groups' gates averaged (the grid
        is linear in the gates, so this equals averaging the weights)."""
        self._refuse_anchor(anchor)
        return self.apply_gates(self.gates(groups).mean(dim=0, keepdim=True))[0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def train_sft(generator: SFTGenerator, model: nn.Module, tasks: Sequence[SFTTask], layout: LoraLayout, *,
              steps: int, scaling: float, pad_id: int, lr: float = 1e-3, tasks_per_step: int = 2,
              items_per_task: int = 4, grad_clip: float | None = 1.0, state=None, seed: int = 0,
              device: str | torch.device = "cpu", precision: str = "fp32", recon_weight: float = 0.0,
              contrast_weight: float = 0.0, contrast_margin: float = DEFAULT_CONTRAST_MARGIN,
              on_step: Callable[[int, int, float], bool | None] | None = None):
    """Train ``generator`` (decoder + head gate) until ``state.step == steps`` so that the LoRA generated
    from a task's prompts lowers the frozen ``model``'s answer loss on that task's items.

    Each step draws ``tasks_per_step`` tasks; each gets its own generated LoRA and a batch of
    ``items_per_task`` of its items. With ``recon_weight`` > 0 (objective "both"), a task with
    harvested ``targets`` also adds ``recon_weight`` x ``recon_error`` to one of them. With
    ``contrast_weight`` > 0 each drawn task's items are also scored under the next drawn task's
    generated LoRA and ``contrast_weight x contrast_hinge`` is added: the condition must matter
    (see :func:`contrast_hinge`). ``state`` (``generator.training.TrainState``) resumes exactly;
    ``on_step(step, steps, loss)`` returning False stops. Returns ``(generator, state)``."""
    from generator.training import TrainState, resume_optimizer, run_steps
    from registry.lm import answer_loss, collate

    usable = [t for t in tasks if t.examples and t.condition.shape[0]]
    if not usable:
        raise ValueError("the SFT objective needs at least one task with prompts and train items")
    device = torch.device(device)
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    generator.to(device).train()
    state = state or TrainState(seed=seed)
    optimizer, rng = resume_optimizer(generator.parameters(), state, lr)
    loss_of = answer_loss(model)
    lora = FunctionalLora(model, layout, scaling)

    def batch_loss():
        chosen = torch.randperm(len(usable), generator=rng)[:tasks_per_step]
        total = 0.0
        drawn = []  # (batch, generated weights, own loss) per chosen task
        for index in chosen:
            task = usable[int(index)]
            condition = draw_condition(task, generator.config.n_prompts, rng).to(device)  # (N, L, C)
            batch = [t.to(device) for t in collate(draw_examples(task, items_per_task, rng), pad_id)]
            generated = generator(condition[None], task.anchor, task.key_index)[0]       # (T, h, w)
            lora.weights = lora_factors(generated, layout)
            own = loss_of(*batch)
            total = total + own / len(chosen)
            drawn.append((batch, generated, own))
            if recon_weight and task.targets is not None and len(task.targets):
                pick = int(torch.randint(len(task.targets), (1,), generator=rng))
                target = task.targets[pick].to(device)                                   # (T, h, w)
                error = recon_error(generated, target, generator.head.scale, generator.head.mask)
                total = total + recon_weight * error / len(chosen)
        if contrast_weight and len(drawn) > 1:
            for i, (batch, _, own) in enumerate(drawn):
                lora.weights = lora_factors(drawn[(i + 1) % len(drawn)][1], layout)  # the next task's LoRA
                total = total + contrast_weight * contrast_hinge(own, loss_of(*batch), contrast_margin) / len(drawn)
        return total

    try:
        run_steps(generator, optimizer, state, steps, rng, batch_loss, grad_clip, on_step, precision=precision,
                  device=device)
    finally:
        lora.close()
        lora.weights = {}
    if state.losses and not math.isfinite(state.losses[-1]):
        raise FloatingPointError(f"the SFT loss diverged ({state.losses[-1]}) at step {state.step}")
    generator.eval()
    return generator, state


@torch.no_grad()
def generate_weights(generator: SFTGenerator, condition: Tensor, anchor: Tensor | None = None) -> Tensor:
    """Prompt embeddings (P, L, C) -> LoRA weight grid (T, h, w): groups of N prompts; the decoder's
    outputs are averaged before the (affine) head, which equals averaging the weights. ``anchor``:
    a retrieved anchor (T, h, w), else the head's fixed one."""
    from generator.training import group_prompts

    generator.eval()
    device = next(generator.parameters()).device
    groups = group_prompts(condition, generator.config.n_prompts).to(device)  # (G, N, L, C)
    return generator.weights(groups, anchor).float().cpu()  # (T, h, w)


@torch.no_grad()
def answer_loss_with(model: nn.Module, layout: LoraLayout, weights: Tensor, examples, scaling: float,
                     pad_id: int) -> float:
    """The frozen model's answer loss on ``examples`` with the LoRA ``weights`` (T, h, w) applied."""
    from registry.lm import answer_loss, collate

    lora = FunctionalLora(model, layout, scaling)
    try:
        lora.weights = lora_factors(weights, layout)
        return float(answer_loss(model)(*collate(list(examples), pad_id)))
    finally:
        lora.close()
