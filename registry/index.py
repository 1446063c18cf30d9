"""The FAISS index of adapter embeddings, keyed by SQL adapter ids.

SQL is the source of truth: the index can always be rebuilt from the ``adapters.embedding`` column.
Vectors are L2-normalised, so inner product = cosine. Below ``HNSW_THRESHOLD`` vectors the index is
exact (``IndexFlatIP``); above it, an HNSW graph keeps a 100k search around a millisecond. HNSW
cannot delete, so removed ids are kept as tombstones and filtered out at search time until the
next rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from registry import faults
from registry.atomic import atomic_write

HNSW_THRESHOLD = 20_000
HNSW_NEIGHBOURS = 32
HNSW_EF_SEARCH = 128


def _new_index(dim: int, expected: int):
    import faiss

    if expected >= HNSW_THRESHOLD:
        inner = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        inner = faiss.IndexFlatIP(dim)
    return faiss.IndexIDMap2(inner)


class AdapterIndex:
    """A persisted ``IndexIDMap2`` plus a small JSON sidecar (dim, encoder, tombstones)."""

    def __init__(self, directory: Path, dim: int, encoder: str):
        self.directory = directory
        self.dim = dim
        self.encoder = encoder
        self.tombstones: set[int] = set()
        self.index = None
        self._stored: set[int] | None = None  # ids in the id map, built on first ``has`` and kept in step

    @property
    def index_path(self) -> Path:
        return self.directory / "adapters.faiss"

    @property
    def meta_path(self) -> Path:
        return self.directory / "adapters.json"

    # -- persistence ---------------------------------------------------------------------------
    def load(self) -> bool:
        """Load from disk; False when missing, unreadable or built for another encoder."""
        import faiss

        if not (self.index_path.exists() and self.meta_path.exists()):
            return False
        try:
            meta = json.loads(self.meta_path.read_text())
            if meta.get("dim") != self.dim or meta.get("encoder") != self.encoder:
                return False
            self.index = faiss.read_index(str(self.index_path))
        except (OSError, RuntimeError, ValueError):
            self.index = None
            return False
        self.tombstones = set(meta.get("tombstones", []))
        self._stored = None
        return True

    def save(self) -> None:
        import faiss

        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.index_path, faiss.serialize_index(self.index).tobytes())
        faults.point("index.between_files")
        meta = {"dim": self.dim, "encoder": self.encoder, "count": self.index.ntotal,
                "kind": self.kind, "tombstones": sorted(self.tombstones)}
        atomic_write(self.meta_path, json.dumps(meta).encode())

    # -- contents ------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        import faiss

        inner = faiss.downcast_index(self.index.index)
        return "hnsw" if isinstance(inner, faiss.IndexHNSWFlat) else "flat"

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with ``vectors`` (n, dim) under SQL ``ids`` (n,)."""
        self.index = _new_index(self.dim, len(ids))
        self.tombstones = set()
        self._stored = None
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                    np.asarray(ids, dtype=np.int64))

    def ids(self) -> set[int]:
        """The live ids in the index (tombstones excluded)."""
        import faiss

        stored = faiss.vector_to_array(self.index.id_map) if self.index.ntotal else np.empty(0, np.int64)
        return set(int(i) for i in stored) - self.tombstones

    # -- cheap checks for catching up with SQL (``registry.serve_cache.IndexFollower``) ----------
    def has(self, adapter_id: int) -> bool:
        """Whether ``adapter_id`` is live in the index (O(1) after the first call)."""
        if self._stored is None:
            import faiss

            stored = faiss.vector_to_array(self.index.id_map) if self.index is not None and self.index.ntotal else []
            self._stored = set(int(i) for i in stored)
        return adapter_id in self._stored and adapter_id not in self.tombstones

    def live_count(self) -> int:
        """How many live vectors the index holds (tombstones are always stored ids)."""
        return (self.index.ntotal if self.index is not None else 0) - len(self.tombstones)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.index is None or (self.index.ntotal == 0 and vectors.shape[1] != self.dim):
            self.dim = int(vectors.shape[1])  # an empty index takes the width of its first vectors
            self.rebuild(np.empty(0, np.int64), np.empty((0, self.dim), np.float32))
        elif vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of width {vectors.shape[1]} for an index of width {self.dim}")
        if self.kind == "flat" and self.index.ntotal + len(ids) >= HNSW_THRESHOLD:
            # Growing past the exact-search size: move to HNSW (same ids, same vectors).
            old_ids, old_vectors = self.contents()
            self.rebuild(np.concatenate([old_ids, ids]), np.concatenate([old_vectors, vectors]))
            return
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                np.asarray(ids, dtype=np.int64))
        if self._stored is not None:
            self._stored.update(int(i) for i in ids)

    def contents(self) -> tuple[np.ndarray, np.ndarray]:
        """All live (ids, vectors) currently stored."""
        import faiss

        all_ids = faiss.vector_to_array(self.index.id_map) if self.index.ntotal else np.empty(0, np.int64)
        keep = np.array([i not in self.tombstones for i in all_ids], dtype=bool)
        vectors = np.stack([self.index.reconstruct(int(i)) for i in all_ids[keep]]) if keep.any() \
            else np.empty((0, self.dim), np.float32)
        return all_ids[keep], vectors

    def remove(self, ids) -> None:
        import faiss

        ids = np.asarray(list(ids), dtype=np.int64)
        if not len(ids):
            return
        if self.kind == "flat":
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
            if self._stored is not None:
                self._stored.difference_update(int(i) for i in ids)
        else:
            self.tombstones.update(int(i) for i in ids)

    # -- search --------------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int, allowed_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for each query row (q, dim); ``allowed_ids`` restricts the pool."""
        import faiss

        if self.index is None or self.index.ntotal == 0 or k <= 0:
            return np.empty((len(query), 0), np.float32), np.empty((len(query), 0), np.int64)
        selector = None
        if allowed_ids is not None:
            allowed = np.asarray(sorted(set(allowed_ids) - self.tombstones), dtype=np.int64)
            if not len(allowed):
                return np.empty((len(query), 0), np.float32), np.empty((len(query), 0), np.int64)
            selector = faiss.IDSelectorBatch(allowed)
            k = min(k, len(allowed))
        elif self.tombstones:
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(sorted(self.tombstones), np.int64)))
        k = min(k, self.index.ntotal)
        params = None
        if selector is not None:
            params = (faiss.SearchParametersHNSW(sel=selector, efSearch=max(HNSW_EF_SEARCH, k))
                      if self.kind == "hnsw" else faiss.SearchParameters(sel=selector))
        scores, ids = self.index.search(np.ascontiguousarray(query, dtype=np.float32), k, params=params)
        return scores, ids
