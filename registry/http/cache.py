"""What ``registry serve`` keeps in memory between requests, and how it knows when to drop it.

The server answers most reads without SQL. Three facts make that safe:

- **versions and digests are immutable** (a row's digests, config, tags, prompts and parents never
  change once it is added), so what depends only on them is kept by digest or SQL id for the life
  of the process (config bytes, prompt lists, verified weights);
- **what moves** (aliases, ``latest``, ``removed``, metrics, children) is kept per REF under a
  *change stamp*: a value the database changes whenever any connection commits.
  ``ChangeStamp.read()`` costs one tiny query per request (SQLite ``PRAGMA data_version``: ~2 us;
  PostgreSQL ``pg_current_snapshot()``: one loopback round trip), and when it differs from the
  stamp the cache was filled under, every moving answer is dropped and rebuilt on demand. So an
  alias moved or a version removed by another process, another ``Registry`` handle, or this
  server's own PUT is seen by the very next request;
- a rebuilt answer is stored only if the stamp read *before* its SQL is still the current one, so
  a slow rebuild that raced a commit can never be cached under the newer stamp.

Rebuilding a REF's answer uses SQLAlchemy Core on a pooled connection (resolve + tags + parents +
aliases + children: ~0.2 ms on SQLite) instead of ORM sessions (~1.3 ms), and reuses
``registry.store``'s row-to-``AdapterInfo`` code so both produce the same records.

The FAISS index follows SQL the same way (``IndexFollower``): nothing happens while the stamp is
unchanged; after a change only rows with an id above the highest one seen are read and added, and
a live-row count tells whether anything was removed (only then are the id sets compared).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select

from registry.errors import NotFound
from registry.records import adapter_infos
from registry.refs import Ref
from registry.schema import Adapter, Alias, Lineage

MAX_ENTRIES = 8192  # moving answers kept per stamp (bounded: REFs come from clients)
MAX_IMMUTABLE = 65536  # per-digest / per-id entries kept for the life of the process
_ADAPTERS = Adapter.__table__


class ChangeStamp:
    """A value that differs after every commit to the database, by any process or connection.

    Reads go through one dedicated DBAPI connection, detached from the pool and never used to
    write (SQLite's ``data_version`` ignores the reading connection's own commits). Dialects
    without a cheap equivalent get a fresh object per read: nothing moving is ever reused.
    """

    def __init__(self, engine):
        self._lock = threading.Lock()
        self._connection = None
        self._query = None
        dialect = engine.dialect.name
        if dialect == "sqlite":
            self._query = "PRAGMA data_version"
        elif dialect == "postgresql":
            # The snapshot (xmin:xmax:in-progress xids) changes whenever a writing transaction
            # ends anywhere in the cluster; read-only transactions get no xid and change nothing.
            self._query = "SELECT pg_current_snapshot()::text"
        self._engine = engine
        self.cheap = self._query is not None

    def _connect(self):
        """A DBAPI connection of the engine's, detached from its pool (reads only, autocommit on
        PostgreSQL so it never sits idle in a transaction holding a snapshot)."""
        connection = self._engine.raw_connection()
        if self._engine.dialect.name == "postgresql":
            dbapi = connection.dbapi_connection
            dbapi.rollback()  # a pre-ping may have opened a transaction
            dbapi.autocommit = True
        connection.detach()
        return connection

    def read(self):
        if self._query is None:
            return object()
        with self._lock:
            if self._connection is None:  # first use, or reopened after close()
                self._connection = self._connect()
            try:
                cursor = self._connection.cursor()
                try:
                    cursor.execute(self._query)
                    return cursor.fetchone()[0]
                finally:
                    cursor.close()
            except Exception:  # noqa: BLE001 - a dropped connection: treat as changed, reconnect next time
                self._close()
                return object()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self._connection = None


class StampedCache:
    """Entries valid for one change stamp: ``check()`` once per request, then ``get``/``put``."""

    def __init__(self, stamp: ChangeStamp, max_entries: int = MAX_ENTRIES):
        self.stamp = stamp
        self.max_entries = max_entries
        self._current = None
        self._entries: dict = {}
        self._lock = threading.Lock()

    def check(self):
        """Read the stamp; drop everything if the database changed since. Returns the stamp."""
        stamp = self.stamp.read()
        if stamp != self._current:
            with self._lock:
                if stamp != self._current:
                    self._entries = {}
                    self._current = stamp
        return stamp

    def get(self, key):
        return self._entries.get(key)

    def put(self, key, value, stamp) -> None:
        """Keep ``value`` (computed from SQL read after ``stamp``) if nothing changed since."""
        with self._lock:
            if stamp != self._current:
                return
            if len(self._entries) >= self.max_entries:
                self._entries = {}
            self._entries[key] = value

    def clear(self) -> None:
        with self._lock:
            self._entries = {}
            self._current = None


class BoundedDict(dict):
    """A dict that empties itself when full (for content-addressed entries, which never go stale)."""

    def __init__(self, limit: int = MAX_IMMUTABLE):
        super().__init__()
        self.limit = limit
        self._lock = threading.Lock()

    def put(self, key, value) -> None:
        with self._lock:
            if len(self) >= self.limit:
                self.clear()
            self[key] = value


@dataclass(frozen=True)
class Miss:
    """A REF that resolved to nothing under some stamp (kept, so repeated 404s cost no SQL)."""

    message: str


# --------------------------------------------------------------------------------------------
# Resolving a REF with SQLAlchemy Core (the same rules as ``Registry._resolve_row``)
# --------------------------------------------------------------------------------------------


def resolve_row(connection, parsed: Ref):
    """The live ``adapters`` row ``parsed`` points at now, as a Core row; ``NotFound`` otherwise.

    Mirrors ``Registry._resolve_row``: a digest (prefix) matches the adapter digest or the weights
    digest and must not name two adapters; ``name@alias`` goes through ``aliases``; ``name@N`` is
    that version; ``name`` is the newest live version.
    """
    table = _ADAPTERS
    live = table.c.removed_at.is_(None)
    if parsed.digest:
        rows = connection.execute(
            select(table).where(live, table.c.digest.startswith(parsed.digest)
                                | table.c.weights_sha256.startswith(parsed.digest))
            .order_by(table.c.id)).all()
        if len({r.digest for r in rows}) > 1:
            raise NotFound(f"digest prefix {parsed.digest} is ambiguous: give more digits")
        row = rows[0] if rows else None
    elif parsed.alias:
        row = connection.execute(select(table).join(Alias.__table__, Alias.adapter_id == table.c.id)
                                 .where(Alias.name == parsed.name, Alias.alias == parsed.alias, live)).first()
    elif parsed.version is not None:
        row = connection.execute(select(table).where(table.c.name == parsed.name,
                                                     table.c.version == parsed.version, live)).first()
    else:
        row = connection.execute(select(table).where(table.c.name == parsed.name, live)
                                 .order_by(table.c.version.desc()).limit(1)).first()
    if row is None:
        raise NotFound(f"no adapter matches {parsed}")
    return row


def load_info(connection, parsed: Ref):
    """``AdapterInfo`` for what ``parsed`` resolves to now (Core queries on ``connection``)."""
    return adapter_infos(connection, [resolve_row(connection, parsed)])[0]  # the mapping the Registry uses too


def load_children(connection, adapter_id: int) -> list[dict]:
    """Live adapters that name ``adapter_id`` as a parent: [{"ref", "weight"}], sorted by ref."""
    rows = connection.execute(
        select(Adapter.name, Adapter.version, Lineage.weight)
        .join(Lineage, Lineage.child_id == Adapter.id)
        .where(Lineage.parent_id == adapter_id, Adapter.removed_at.is_(None))
        .order_by(Adapter.name, Adapter.version)).all()
    return [{"ref": f"{name}@{version}", "weight": weight} for name, version, weight in rows]


def dumps(data) -> bytes:
    """JSON exactly as FastAPI's ``JSONResponse`` renders it."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# The FAISS index, caught up by what changed
# --------------------------------------------------------------------------------------------


class IndexFollower:
    """Keeps the server's in-memory FAISS index in step with SQL, at the cost of what changed.

    ``catch_up()`` is called before each search or composition (under the server's model lock):

    - stamp unchanged since the last catch-up: nothing at all;
    - otherwise rows with an id above the highest one seen are added (one indexed range query),
      then the live-row count in SQL is compared with the index's; only when they differ
      (a removal, or a row that committed out of id order) does it fall back to
      ``Registry.refresh_index()``, which compares the id sets.

    The index file on disk is not rewritten here: SQL is the source of truth, and every process
    that opens the registry catches its own copy up.
    """

    def __init__(self, registry, stamp: ChangeStamp):
        self.registry = registry
        self.stamp = stamp
        self._seen = None
        self._max_id: int | None = None
        self.full_scans = 0  # how often the id sets had to be compared (tests, diagnostics)

    def catch_up(self) -> None:
        stamp = self.stamp.read()
        if self.stamp.cheap and stamp == self._seen:
            return
        registry = self.registry
        index = registry._get_index()  # loads (and fully catches up) on first use
        if self._max_id is None:
            ids = index.ids()
            self._max_id = max(ids) if ids else 0
        live = (Adapter.removed_at.is_(None), Adapter.embedding.is_not(None), Adapter.encoder == registry.encoder_id)
        with registry.engine.connect() as connection:
            new = connection.execute(select(Adapter.id, Adapter.embedding).where(Adapter.id > self._max_id, *live)
                                     .order_by(Adapter.id)).all()
            count = connection.scalar(select(func.count()).select_from(Adapter).where(*live))
        if new:
            rows = [(i, e) for i, e in new if not index.has(i)]  # the server's own adds are in already
            if rows:
                index.add(np.array([i for i, _ in rows], np.int64),
                          np.stack([np.frombuffer(e, dtype=np.float32) for _, e in rows]))
            self._max_id = max(i for i, _ in new)
        if count != index.live_count():
            registry.refresh_index()
            self.full_scans += 1
            ids = index.ids()
            self._max_id = max(ids) if ids else 0
        self._seen = stamp
