"""``registry doctor``: SQL vs blobs (every digest re-hashed) vs FAISS, and what ``--repair`` fixes
(a blob restored from an intact fetched copy, unreferenced blobs and partial writes deleted, the
index rebuilt from SQL)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select

from registry import peft_io
from registry.atomic import TEMP_PREFIX
from registry.blobs import sha256_file
from registry.index import AdapterIndex
from registry.schema import Adapter, Artifact


@dataclass
class DoctorReport:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    checked_adapters: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def doctor(reg, repair: bool = False) -> DoctorReport:
    """``Registry.doctor``: check SQL vs blobs (every digest re-hashed) vs FAISS; with ``repair`` fix what can be fixed."""
    from registry.db import current_revision, head_revision

    report = DoctorReport()
    if current_revision(reg.engine) != head_revision(reg.url):
        report.problems.append("database schema is not at the latest migration: run `registry migrate`")
    with reg.session() as session:
        rows = session.execute(select(Adapter.id, Adapter.name, Adapter.version, Adapter.weights_sha256,
                                      Adapter.digest).where(Adapter.removed_at.is_(None))).all()
    report.checked_adapters = len(rows)
    for row in rows:
        state = reg.blobs.problem(row.weights_sha256)
        if state:
            problem = f"{row.name}@{row.version}: weights blob sha256:{row.weights_sha256[:12]} {state} in {reg.blobs.location}"
            cached = reg.home / "fetched" / row.digest / peft_io.WEIGHTS_FILE
            if repair and cached.exists() and sha256_file(cached) == row.weights_sha256:
                reg.blobs.restore(row.weights_sha256, cached.read_bytes())
                report.repaired.append(f"{problem}; restored from the fetch cache")
            else:
                report.problems.append(problem + ("; no intact copy to restore from" if repair else ""))
    # Blobs and partial writes are judged under the blob guard, with the references re-read inside
    # it: an add in flight (blob written, row not yet committed) is waited for, never deleted.
    with reg.blobs.guard(exclusive=True):
        with reg.session() as session:
            referenced = set(session.scalars(select(Adapter.weights_sha256).where(Adapter.removed_at.is_(None))))
            referenced |= set(session.scalars(select(Artifact.sha256).where(Artifact.removed_at.is_(None))))
        for digest in sorted(reg.blobs.all_digests() - referenced):
            if not repair:
                report.problems.append(f"unreferenced blob {digest[:12]} (left by an interrupted add or a removal)")
            elif reg.blobs.delete_unreferenced(digest):
                report.repaired.append(f"deleted unreferenced blob {digest[:12]}")
            else:
                report.repaired.append(f"kept unreferenced blob {digest[:12]}: younger than the grace period "
                                       "(an add on another machine may be about to reference it)")
        for temp in reg.blobs.partial_writes():
            if repair:
                temp.unlink(missing_ok=True)
                report.repaired.append(f"deleted partial write {temp.name}")
            else:
                report.problems.append(f"partial write {temp.name} left by an interrupted add")
    with reg._index_lock():
        for temp in sorted((reg.home / "index").glob(f"{TEMP_PREFIX}*")):
            if repair:
                temp.unlink(missing_ok=True)
                report.repaired.append(f"deleted partial index write {temp.name}")
            else:
                report.problems.append(f"partial index write {temp.name} left by an interrupted save")
        index = AdapterIndex(reg.home / "index", reg._embedding_dim(), reg.encoder_id)
        live_ids, _ = reg._live_embeddings()
        if not index.load():
            problem = "FAISS index missing or unreadable" if len(live_ids) else None
        else:
            present, live = index.ids(), set(int(i) for i in live_ids)
            problem = None
            if present != live:
                problem = (f"FAISS index out of sync with SQL: {len(live - present)} missing, "
                           f"{len(present - live)} stale")
    if problem:
        if repair:
            report.repaired.append(f"{problem}; rebuilt {reg.reindex()} vectors from SQL")
        else:
            report.problems.append(problem)
    return report
