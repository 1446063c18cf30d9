"""The SQL schema (SQLAlchemy 2 ORM). SQL is the source of truth; FAISS and blobs follow it.

Tables:
- ``adapters``: one row per immutable adapter version (PEFT LoRA), with its config, digests, task,
  metrics and recipe; ``removed_at`` marks a removed version (rows stay so lineage stays intact);
- ``adapter_tags``, ``aliases``: tags and movable aliases (``prod`` -> a version);
- ``lineage``: parent adapters of a generated or composed adapter, with their weights;
- ``prompts``: the sample prompts describing an adapter and their embeddings;
- ``artifacts``: other versioned files (trained generators), with JSON metadata.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_adapters_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # harvested|imported|generated|composed
    base_model: Mapped[str] = mapped_column(String(512), index=True)
    base_fingerprint: Mapped[str] = mapped_column(String(64))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(default=False)
    target_modules: Mapped[list] = mapped_column(JSON)
    layout_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    peft_config: Mapped[dict] = mapped_column(JSON)
    task: Mapped[str | None] = mapped_column(String(128), index=True)
    task_description: Mapped[str | None] = mapped_column(Text)
    weights_sha256: Mapped[str] = mapped_column(String(64), index=True)
    config_sha256: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64), index=True)  # sha256 of the two digests
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    recipe: Mapped[dict] = mapped_column(JSON, default=dict)
    encoder: Mapped[str | None] = mapped_column(String(512))
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)  # mean prompt embedding, float32

    tags: Mapped[list["AdapterTag"]] = relationship(cascade="all, delete-orphan")
    prompts: Mapped[list["Prompt"]] = relationship(cascade="all, delete-orphan",
                                                   order_by="Prompt.position", lazy="select")
    parents: Mapped[list["Lineage"]] = relationship(foreign_keys="Lineage.child_id",
                                                    cascade="all, delete-orphan")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class AdapterTag(Base):
    __tablename__ = "adapter_tags"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"),
                                            primary_key=True)
    tag: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)


class Alias(Base):
    __tablename__ = "aliases"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    alias: Mapped[str] = mapped_column(String(128), primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Lineage(Base):
    __tablename__ = "lineage"

    child_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"),
                                          primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"))
    parent_ref: Mapped[str] = mapped_column(String(160))  # kept readable even if the parent is removed
    weight: Mapped[float | None] = mapped_column(Float)


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)  # float32, L2-normalised


class Artifact(Base):
    """A versioned non-adapter file, e.g. a trained generator (safetensors + JSON metadata)."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_artifacts_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    artifact_type: Mapped[str] = mapped_column(String(32), index=True)  # e.g. generator-dnd
    base_model: Mapped[str | None] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    meta: Mapped[dict] = mapped_column(JSON, default=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"
