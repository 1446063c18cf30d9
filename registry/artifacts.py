"""Versioned safetensors artifacts with JSON metadata (trained generators): the ``Registry``
methods that store, resolve, list and load them (a mixin of ``registry.store.Registry``)."""

from __future__ import annotations

import json

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as SQLIntegrityError

from registry.db import name_lock
from registry.errors import NotFound, RegistryError
from registry.records import ArtifactInfo, artifact_info
from registry.refs import parse_ref, validate_name
from registry.schema import Artifact, utc_now


class ArtifactMethods:
    """``add_artifact``, ``resolve_artifact``, ``latest_artifact``, ``list_artifacts``, ``load_artifact``.

    Uses the ``Registry``'s ``session()``, ``blobs`` and ``_read_blob``.
    """

    def add_artifact(self, name: str, artifact_type: str, tensors: dict, meta: dict,
                     base_model: str | None = None) -> ArtifactInfo:
        """Store a versioned safetensors artifact with JSON metadata (e.g. a trained generator)."""
        from safetensors.torch import save

        validate_name(name)
        data = save({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())},
                    metadata={"format": "pt"})
        _check_finite(tensors, name)
        with self.blobs.guard():
            digest = self.blobs.put(data)
            return self._insert_artifact(name, artifact_type, digest, len(data), meta, base_model)

    def _insert_artifact(self, name, artifact_type, digest, size, meta, base_model) -> ArtifactInfo:
        for _attempt in range(5):
            try:
                with self.write_session() as session:
                    name_lock(session, f"artifact:{name}")
                    latest = session.scalar(select(func.max(Artifact.version)).where(Artifact.name == name))
                    row = Artifact(name=name, version=(latest or 0) + 1, artifact_type=artifact_type,
                                   base_model=base_model, sha256=digest, size_bytes=size,
                                   meta=json.loads(json.dumps(meta)), created_at=utc_now())
                    session.add(row)
                    session.flush()
                    return artifact_info(row)
            except SQLIntegrityError:
                continue
        raise RegistryError(f"could not allocate a version for artifact {name}")

    def resolve_artifact(self, ref: str, artifact_type: str | None = None) -> ArtifactInfo:
        parsed = parse_ref(ref)
        with self.session() as session:
            query = select(Artifact).where(Artifact.removed_at.is_(None))
            if artifact_type:
                query = query.where(Artifact.artifact_type.startswith(artifact_type))
            if parsed.digest:
                query = query.where(Artifact.sha256.startswith(parsed.digest))
            else:
                query = query.where(Artifact.name == parsed.name)
                if parsed.version is not None:
                    query = query.where(Artifact.version == parsed.version)
                elif parsed.alias:
                    raise NotFound(f"artifacts have no aliases: use {parsed.name} or {parsed.name}@<version>")
            row = session.scalar(query.order_by(Artifact.version.desc()).limit(1))
            if row is None:
                raise NotFound(f"no {artifact_type or 'artifact'} matches {parsed}")
            return artifact_info(row)

    def latest_artifact(self, artifact_type: str) -> ArtifactInfo | None:
        with self.session() as session:
            row = session.scalar(select(Artifact).where(Artifact.removed_at.is_(None),
                                                        Artifact.artifact_type.startswith(artifact_type))
                                 .order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(1))
            return artifact_info(row) if row else None

    def list_artifacts(self, artifact_type: str | None = None) -> list[ArtifactInfo]:
        with self.session() as session:
            query = select(Artifact).where(Artifact.removed_at.is_(None)).order_by(Artifact.name, Artifact.version)
            if artifact_type:
                query = query.where(Artifact.artifact_type.startswith(artifact_type))
            return [artifact_info(r) for r in session.scalars(query)]

    def load_artifact(self, ref: str, artifact_type: str | None = None) -> tuple[dict, ArtifactInfo]:
        from safetensors.torch import load

        info = self.resolve_artifact(ref, artifact_type)
        return load(self._read_blob(info.sha256)), info


def _check_finite(tensors: dict, name: str) -> None:
    """Refuse to store a diverged generator: every floating tensor must be finite."""
    import torch

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RegistryError(f"artifact {name}: tensor {key!r} contains NaN or Inf values (training diverged?)")
