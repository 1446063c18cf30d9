"""Search, and keeping the FAISS index in step with SQL: the ``Registry`` methods that embed a query,
search the index, filter the hits in SQL, and catch the index up with adds and removals made by
any process (a mixin of ``registry.store.Registry``). SQL is the source of truth; the index can be
rebuilt from it at any time (``reindex``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np
from sqlalchemy import select

from registry import faults
from registry.embeddings import embed_texts, mean_embedding
from registry.errors import RegistryError
from registry.index import AdapterIndex
from registry.locks import file_lock
from registry.records import EMBEDDING_DIM, SearchHit, adapter_infos, bytes_vector
from registry.schema import Adapter


class IndexMethods:
    """``search``, ``refresh_index``, ``bulk``, ``reindex`` and the index bookkeeping behind them.

    Uses the ``Registry``'s ``session()``, ``home``, ``encoder``, ``encoder_id``, ``_index`` and
    ``_defer_index_save``.
    """

    def search(self, query: str | Sequence[str] | np.ndarray, k: int = 5, *, base_model: str | None = None,
               kind: str | None = None, exclude_tasks: Iterable[str] = (), layout: str | None = None,
               tasks: Iterable[str] | None = None) -> list[SearchHit]:
        """Adapters nearest to a text, a set of prompts (their mean embedding) or a vector."""
        if k <= 0:
            raise RegistryError("k must be at least 1")
        if isinstance(query, np.ndarray):
            vector = query.astype(np.float32)
        else:
            texts = [query] if isinstance(query, str) else list(query)
            if not texts or any(not t.strip() for t in texts):
                raise RegistryError("the search query is empty")
            vector = mean_embedding(embed_texts(texts, self.encoder))
        index = self._get_index()
        if index.index is None or index.index.ntotal == 0:
            return []
        if vector.shape[-1] != index.dim:
            raise RegistryError(f"the query vector has width {vector.shape[-1]}, the index {index.dim} "
                                f"(encoder {self.encoder_id})")
        conditions = self._filter_conditions(base_model, kind, set(exclude_tasks), layout, tasks)
        # Over-fetch from FAISS and filter the hits in SQL, widening until k rows pass (or the
        # whole index was seen): cheap for the usual filters, exact in the end for narrow ones.
        fetch_k = k if not conditions else 4 * k
        while True:
            scores, ids = index.search(vector.reshape(1, -1), fetch_k)
            hits_by_id = {int(i): float(s) for s, i in zip(scores[0], ids[0]) if i >= 0}
            if not hits_by_id:
                return []
            with self.session() as session:
                rows = session.scalars(select(Adapter).where(Adapter.id.in_(hits_by_id),
                                                             Adapter.removed_at.is_(None), *conditions)).all()
                infos = {info.id: info for info in adapter_infos(session, rows)}
            if len(infos) >= k or fetch_k >= index.index.ntotal:
                break
            fetch_k *= 4
        # best score first; among equal scores (checkpoints sharing their prompts) the newest first
        ranked = sorted(((i, s) for i, s in hits_by_id.items() if i in infos), key=lambda kv: (-kv[1], -kv[0]))
        return [SearchHit(infos[i], s) for i, s in ranked[:k]]

    def _filter_conditions(self, base_model, kind, exclude_tasks, layout, tasks) -> list:
        conditions = []
        if base_model:
            from registry import base_models

            conditions.append(Adapter.base_model == base_models.base_model_id(base_model))
        if kind:
            conditions.append(Adapter.kind == kind)
        if layout:
            conditions.append(Adapter.layout_fingerprint == layout)
        if exclude_tasks:
            conditions.append(Adapter.task.is_(None) | Adapter.task.not_in(exclude_tasks))
        if tasks is not None:
            conditions.append(Adapter.task.in_(list(tasks)))
        return conditions

    def _live_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        with self.session() as session:
            rows = session.execute(select(Adapter.id, Adapter.embedding).where(
                Adapter.removed_at.is_(None), Adapter.embedding.is_not(None),
                Adapter.encoder == self.encoder_id).order_by(Adapter.id)).all()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = (np.stack([bytes_vector(r[1]) for r in rows]) if rows
                   else np.empty((0, self._embedding_dim()), np.float32))
        return ids, vectors

    def _embedding_dim(self) -> int:
        """The width of this encoder's vectors: read from one stored embedding (no encoder load);
        the default encoder's width while none is stored (an empty index adopts the width of its
        first vectors, ``AdapterIndex.add``)."""
        with self.session() as session:
            stored = session.scalar(select(Adapter.embedding).where(
                Adapter.embedding.is_not(None), Adapter.encoder == self.encoder_id).limit(1))
        return len(stored) // 4 if stored else EMBEDDING_DIM

    def _index_lock(self):
        """Held while the index files are read or written: a save is a merge with SQL, so two
        writers saving at once can no longer drop each other's ids (last writer wins)."""
        return file_lock(self.home / "index" / ".lock")

    def _get_index(self) -> AdapterIndex:
        """The loaded index, caught up with SQL (adds and removals made by other processes)."""
        if self._index is not None:
            return self._index
        index = AdapterIndex(self.home / "index", self._embedding_dim(), self.encoder_id)
        with self._index_lock():
            loaded = index.load()
        if not loaded:
            ids, vectors = self._live_embeddings()
            index.rebuild(ids, vectors)
            self._index = index
            self._save_index()
            return index
        self._index = index
        self._catch_up(index)
        return index

    def _sync(self, index: AdapterIndex) -> tuple[int, int]:
        """Make ``index`` hold exactly SQL's live ids for this encoder; (added, removed)."""
        with self.session() as session:
            live = set(session.scalars(select(Adapter.id).where(
                Adapter.removed_at.is_(None), Adapter.embedding.is_not(None), Adapter.encoder == self.encoder_id)))
        present = index.ids()
        missing, extra = sorted(live - present), sorted(present - live)
        if missing:
            with self.session() as session:
                rows = session.execute(select(Adapter.id, Adapter.embedding).where(Adapter.id.in_(missing))).all()
            index.add(np.array([r[0] for r in rows], np.int64), np.stack([bytes_vector(r[1]) for r in rows]))
        if extra:
            index.remove(extra)
        return len(missing), len(extra)

    def _catch_up(self, index: AdapterIndex) -> tuple[int, int]:
        added, removed = self._sync(index)
        if added or removed:
            self._save_index()
        return added, removed

    def refresh_index(self) -> tuple[int, int]:
        """Catch the in-memory index up with adds/removals other processes made; (added, removed)."""
        if self._index is None:
            self._get_index()
            return 0, 0
        return self._catch_up(self._index)

    def _index_add(self, ids: list[int], vectors: np.ndarray) -> None:
        try:
            index = self._get_index()
            if not set(ids) <= index.ids():
                index.add(np.asarray(ids, np.int64), vectors)
            self._save_index()
        except Exception:  # noqa: BLE001 - SQL already committed; the next open catches the index up
            self._index = None

    def _save_index(self) -> None:
        """Write the index, merged with SQL under the index lock: whatever other processes
        committed and saved meanwhile is kept, so the file on disk never loses an id."""
        if self._defer_index_save or self._index is None:
            return
        with self._index_lock():
            self._sync(self._index)
            faults.point("index.before_save")
            self._index.save()

    @contextlib.contextmanager
    def bulk(self):
        """Defer writing the index file until the block ends (for many adds in one process)."""
        self._defer_index_save = True
        try:
            yield self
        finally:
            self._defer_index_save = False
            self._save_index()

    def reindex(self) -> int:
        """Rebuild the FAISS index from SQL; returns the number of vectors."""
        with self._index_lock():
            ids, vectors = self._live_embeddings()
            index = AdapterIndex(self.home / "index", vectors.shape[1], self.encoder_id)
            index.rebuild(ids, vectors)
            index.save()
        self._index = index
        return len(ids)


def search_per_adapter(registry, query, k: int, all_versions: bool = False, **filters) -> list[SearchHit]:
    """What ``registry search`` and the web search list: one hit per adapter name (its best-scoring
    version, the newest among equals), the search widened until ``k`` names are found or the index
    has no more; every matching version with ``all_versions``."""
    if all_versions:
        return registry.search(query, k=k, **filters)
    fetch = k
    while True:
        hits = registry.search(query, k=fetch, **filters)
        distinct = list({h.adapter.name: h for h in reversed(hits)}.values())[::-1]  # first hit per name, in order
        if len(distinct) >= k or len(hits) < fetch:
            return distinct[:k]
        fetch *= 4
