"""The read-only records the registry hands out (safe to use after the session closed), and the one
mapping from SQL rows to them (shared by ``Registry`` and the HTTP server's cached reads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.schema import Adapter, AdapterTag, Alias, Artifact, Lineage

ADAPTER_KINDS = ("harvested", "imported", "generated", "composed")
# The tag of a multitask LoRA (kind harvested, trained on several tasks' union): a baseline, so the
# generators' training sets and the bench's task list skip it.
MULTITASK_TAG = "multitask"

EMBEDDING_DIM = 384


class _Versioned:
    """What adapter and artifact records share: the ``name@version`` ref and a JSON-ready dict."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ref"] = self.ref
        data["created_at"] = self.created_at.isoformat()
        return data


@dataclass
class AdapterInfo(_Versioned):
    """A read-only view of one adapter version, safe to use after the session closed."""

    id: int
    name: str
    version: int
    kind: str
    base_model: str
    base_fingerprint: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list
    layout_fingerprint: str
    task: str | None
    task_description: str | None
    weights_sha256: str
    config_sha256: str
    digest: str
    size_bytes: int
    created_at: datetime
    removed: bool
    metrics: dict
    recipe: dict
    encoder: str | None
    tags: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    parents: list[dict] = field(default_factory=list)


@dataclass
class SearchHit:
    adapter: AdapterInfo
    score: float

@dataclass
class ArtifactInfo(_Versioned):
    id: int
    name: str
    version: int
    artifact_type: str
    base_model: str | None
    sha256: str
    size_bytes: int
    created_at: datetime
    meta: dict


def adapter_info(row: Adapter, tags: list[str], parents: list[dict], aliases: list[str]) -> AdapterInfo:
    return AdapterInfo(
        id=row.id, name=row.name, version=row.version, kind=row.kind, base_model=row.base_model,
        base_fingerprint=row.base_fingerprint, rank=row.rank, alpha=row.alpha,
        use_rslora=row.use_rslora, target_modules=list(row.target_modules),
        layout_fingerprint=row.layout_fingerprint, task=row.task,
        task_description=row.task_description, weights_sha256=row.weights_sha256,
        config_sha256=row.config_sha256, digest=row.digest, size_bytes=row.size_bytes,
        created_at=row.created_at, removed=row.removed_at is not None, metrics=dict(row.metrics or {}),
        recipe=dict(row.recipe or {}), encoder=row.encoder,
        tags=sorted(tags), aliases=sorted(aliases), parents=parents,
    )

def adapter_infos(session: Session, rows: Sequence[Adapter]) -> list[AdapterInfo]:
    """AdapterInfo for many rows, with their tags, lineage and aliases read in three light queries."""
    ids = [row.id for row in rows]
    tags: dict[int, list[str]] = {i: [] for i in ids}
    parents: dict[int, list[dict]] = {i: [] for i in ids}
    aliases: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        for adapter_id, tag in session.execute(select(AdapterTag.adapter_id, AdapterTag.tag)
                                               .where(AdapterTag.adapter_id.in_(ids))):
            tags[adapter_id].append(tag)
        for child_id, ref, weight in session.execute(
                select(Lineage.child_id, Lineage.parent_ref, Lineage.weight)
                .where(Lineage.child_id.in_(ids)).order_by(Lineage.child_id, Lineage.position)):
            parents[child_id].append({"ref": ref, "weight": weight})
        for adapter_id, alias in session.execute(select(Alias.adapter_id, Alias.alias)
                                                 .where(Alias.adapter_id.in_(ids))):
            aliases[adapter_id].append(alias)
    return [adapter_info(row, tags[row.id], parents[row.id], aliases[row.id]) for row in rows]

def artifact_info(row: Artifact) -> ArtifactInfo:
    return ArtifactInfo(id=row.id, name=row.name, version=row.version, artifact_type=row.artifact_type,
                        base_model=row.base_model, sha256=row.sha256, size_bytes=row.size_bytes,
                        created_at=row.created_at, meta=dict(row.meta or {}))

def vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()

def bytes_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32)
