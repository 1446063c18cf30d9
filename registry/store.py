"""The registry: adapters in SQL, their weights as content-addressed safetensors, their prompt
embeddings in FAISS.

Every write follows the same order so that a crash never leaves a half-added adapter visible:
validate everything first, write the blob (temp file + rename, invisible until referenced), insert
all rows in one transaction, then update the FAISS index (which ``doctor`` and the catch-up on open
repair if that last step is lost).

The ``Registry`` class is spread over a few modules, each one job: this one (open, resolve, add,
list, read, fetch, alias, remove), ``registry.search`` (search and the FAISS index sync),
``registry.artifacts`` (trained generators), ``registry.doctor`` and ``registry.export`` (vLLM
folders); the records it returns are ``registry.records``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from registry import peft_io
from registry.artifacts import ArtifactMethods
from registry.atomic import atomic_write
from registry.blobs import evict_least_recent, open_blob_store, sha256_bytes, sha256_file
from registry import faults
from registry.db import ensure_schema, make_engine, name_lock, write_engine
from registry.embeddings import embed_texts, encoder_id, mean_embedding
from registry.errors import IntegrityError, InvalidAdapter, NotFound, RegistryError
from registry.index import AdapterIndex
from registry.paths import database_url, registry_home
from registry.prompts import check_prompt
from registry.records import (ADAPTER_KINDS, EMBEDDING_DIM, AdapterInfo, ArtifactInfo, SearchHit, adapter_infos,
                              bytes_vector, vector_bytes)
from registry.refs import Ref, parse_ref, validate_alias, validate_name
from registry.schema import Adapter, AdapterTag, Alias, Artifact, Lineage, Prompt, utc_now
from registry.search import IndexMethods

__all__ = ["ADAPTER_KINDS", "EMBEDDING_DIM", "AdapterInfo", "ArtifactInfo", "Registry", "SearchHit",
           "canonical_peft_config"]

DEFAULT_FETCH_CACHE_BYTES = 8 << 30


def fetch_cache_bytes() -> int:
    """Size limit of ``<home>/fetched`` (``$REGISTRY_FETCH_CACHE_BYTES``): least recently used evicted."""
    return int(os.environ.get("REGISTRY_FETCH_CACHE_BYTES", DEFAULT_FETCH_CACHE_BYTES))


def canonical_peft_config(config: dict, base_model: str) -> dict:
    """The stored adapter_config.json: the user's fields plus the base model id we resolved."""
    config = dict(config)
    config["peft_type"] = "LORA"
    config["base_model_name_or_path"] = base_model
    config.setdefault("task_type", "CAUSAL_LM")
    if isinstance(config.get("target_modules"), (list, tuple, set)):
        config["target_modules"] = sorted(config["target_modules"])
    config.pop("revision", None)
    return config


def _check_config_types(config: dict) -> None:
    """adapter_config.json fields of the wrong type or out of range are one error line, not a traceback."""
    if not isinstance(config, dict):
        raise InvalidAdapter("adapter_config.json must hold a JSON object")
    rank = config.get("r", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= 65536:
        raise InvalidAdapter(f"adapter_config.json: r must be an integer from 0 to 65536, got {rank!r}")
    alpha = config.get("lora_alpha", 0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidAdapter(f"adapter_config.json: lora_alpha must be a finite number, got {alpha!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise InvalidAdapter(f"adapter_config.json: use_rslora must be true or false, got {config['use_rslora']!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise InvalidAdapter(f"adapter_config.json: {key} must be an object")


def _check_target_modules(targets, base_shapes: dict, base_id: str) -> None:
    """``target_modules`` (a list of module names, or one name) must name linear layers of the base."""
    if targets is None:
        return
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise InvalidAdapter(f"adapter_config.json: target_modules must be a list of module names, got {targets!r}")
    leaves = {path.rsplit(".", 1)[-1] for path in base_shapes} | set(base_shapes)
    unknown = sorted(t for t in targets if t not in leaves and t != "all-linear")
    if unknown:
        shown = ", ".join(t.encode("unicode_escape").decode() for t in unknown[:5])
        raise InvalidAdapter(f"adapter_config.json: target_modules {shown} are not linear layers of {base_id}")


class Registry(IndexMethods, ArtifactMethods):
    """Open with ``Registry.open()``; every method takes REF strings (``name``, ``name@3``,
    ``name@prod``, ``sha256:<digest>``)."""

    def __init__(self, home: Path, url: str, encoder: str | None = None, blob_url: str | None = None):
        self.home = home
        self.url = url
        self.encoder = encoder
        self.encoder_id = encoder_id(encoder)
        home.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(url)
        ensure_schema(self.engine, url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(write_engine(self.engine), expire_on_commit=False)
        self.blobs = open_blob_store(home, blob_url)  # <home>/blobs, or $REGISTRY_BLOB_URL (s3://...)
        self._index: AdapterIndex | None = None
        self._defer_index_save = False

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, database_url_: str | None = None,
             encoder: str | None = None, blob_url: str | None = None) -> "Registry":
        """Open (creating and migrating when needed) the registry at ``home`` / ``$REGISTRY_HOME``
        (metadata in ``$REGISTRY_DATABASE_URL``, blobs in ``$REGISTRY_BLOB_URL`` when set)."""
        resolved = registry_home(home)
        return cls(resolved, database_url(resolved, database_url_), encoder, blob_url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def session(self):
        """A read transaction (writes inside it are allowed but may meet a concurrent writer)."""
        with self._sessions() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def write_session(self):
        """A transaction for a read-modify-write: on SQLite it holds the write lock from its first
        statement (``BEGIN IMMEDIATE``), so what it reads cannot change before it commits."""
        with self._write_sessions() as session, session.begin():
            yield session

    # -- resolving -------------------------------------------------------------------------------
    def _resolve_row(self, session: Session, ref: str | Ref) -> Adapter:
        parsed = ref if isinstance(ref, Ref) else parse_ref(ref)
        live = Adapter.removed_at.is_(None)
        if parsed.digest:
            rows = session.scalars(
                select(Adapter).where(live, (Adapter.digest.startswith(parsed.digest))
                                      | (Adapter.weights_sha256.startswith(parsed.digest)))
                .order_by(Adapter.id)).all()
            digests = {r.digest for r in rows}
            if len(digests) > 1:
                raise NotFound(f"digest prefix {parsed.digest} is ambiguous: give more digits")
            row = rows[0] if rows else None
        elif parsed.alias:
            row = session.scalar(select(Adapter).join(Alias, Alias.adapter_id == Adapter.id)
                                 .where(Alias.name == parsed.name, Alias.alias == parsed.alias, live))
        elif parsed.version is not None:
            row = session.scalar(select(Adapter).where(Adapter.name == parsed.name,
                                                       Adapter.version == parsed.version, live))
        else:
            row = session.scalar(select(Adapter).where(Adapter.name == parsed.name, live)
                                 .order_by(Adapter.version.desc()).limit(1))
        if row is None:
            raise NotFound(f"no adapter matches {parsed}")
        return row

    def resolve(self, ref: str) -> AdapterInfo:
        """The adapter version a REF points at now."""
        with self.session() as session:
            return adapter_infos(session, [self._resolve_row(session, ref)])[0]

    # -- adding ----------------------------------------------------------------------------------
    def add_directory(self, path: str | os.PathLike, *, name: str | None = None, kind: str = "imported",
                      base: str | None = None, **metadata) -> AdapterInfo:
        """Import a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        directory = Path(path).expanduser()
        config, state_dict = peft_io.read_adapter_dir(directory)
        return self.add_weights(name or directory.resolve().name, state_dict, config, kind=kind,
                                base=base, **metadata)

    def add_weights(self, name: str, state_dict: dict, peft_config: dict, *, kind: str,
                    base: str | None = None, task: str | None = None, task_description: str | None = None,
                    prompts: Sequence[str] = (), prompt_embeddings: np.ndarray | None = None,
                    tags: Iterable[str] = (), metrics: dict | None = None, recipe: dict | None = None,
                    parents: Sequence[tuple[str, float | None]] = ()) -> AdapterInfo:
        """Validate and store one adapter version; returns its record. Nothing is written on error.

        ``base`` overrides the config's ``base_model_name_or_path`` (e.g. a local folder for a
        hub id). ``parents`` are (REF, weight) pairs recorded as lineage.
        """
        from registry import base_models

        validate_name(name)
        if kind not in ADAPTER_KINDS:
            raise RegistryError(f"unknown kind {kind!r}: one of {', '.join(ADAPTER_KINDS)}")
        tags = sorted(set(tags))
        for tag in tags:
            validate_name(tag, "tag")
        state_dict = {peft_io.normalize_key(k): v for k, v in state_dict.items()}
        for key, tensor in state_dict.items():
            if not tensor.is_floating_point():
                raise InvalidAdapter(f"tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}: "
                                     "LoRA weights must be floating point")
        modules = peft_io.lora_modules(state_dict)
        peft_io.check_finite(state_dict)
        _check_config_types(peft_config)

        base_ref = base or peft_config.get("base_model_name_or_path")
        if not base_ref:
            raise InvalidAdapter("the adapter does not name its base model: pass --base")
        base_facts = base_models.base_info(base_ref)  # cached by config.json's sha256: no transformers import
        base_id = base_models.base_model_id(base_ref)
        peft_io.check_against_base(modules, base_facts.shapes, base_id)
        _check_target_modules(peft_config.get("target_modules"), base_facts.shapes, base_id)
        ranks = {m.rank for m in modules}
        declared_rank = int(peft_config.get("r", 0))
        if declared_rank not in ranks and not peft_config.get("rank_pattern"):
            raise InvalidAdapter(f"adapter_config.json says r={declared_rank} but the weights have rank "
                                 f"{'/'.join(map(str, sorted(ranks)))}")

        prompts = [p for p in prompts]
        if prompts and any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise RegistryError("prompts must be non-empty strings")
        for i, prompt in enumerate(prompts):
            check_prompt(prompt, f"prompt {i + 1}")
        if prompts and prompt_embeddings is None:
            prompt_embeddings = embed_texts(prompts, self.encoder)
        if prompt_embeddings is not None and len(prompt_embeddings) != len(prompts):
            raise RegistryError("prompt_embeddings must have one row per prompt")

        config = canonical_peft_config(peft_config, base_id)
        config_bytes = peft_io.canonical_json(config)
        weights_bytes = peft_io.serialize_weights(state_dict)
        config_sha, weights_sha = sha256_bytes(config_bytes), sha256_bytes(weights_bytes)
        parent_refs = [(self.resolve(ref), weight) for ref, weight in parents]

        row = Adapter(
            name=name, kind=kind, base_model=base_id, base_fingerprint=base_facts.fingerprint,
            rank=max(ranks), alpha=float(config.get("lora_alpha", 0)), use_rslora=bool(config.get("use_rslora")),
            target_modules=sorted({m.module.rsplit(".", 1)[-1] for m in modules}),
            layout_fingerprint=peft_io.layout_fingerprint(modules), peft_config=config,
            task=task, task_description=task_description, weights_sha256=weights_sha,
            config_sha256=config_sha, digest=sha256_bytes(f"{config_sha}:{weights_sha}".encode()),
            size_bytes=len(weights_bytes), metrics=dict(metrics or {}), recipe=dict(recipe or {}),
            encoder=self.encoder_id if prompts else None,
            embedding=vector_bytes(mean_embedding(prompt_embeddings)) if prompts else None,
            created_at=utc_now(),
        )
        row.tags = [AdapterTag(tag=t) for t in tags]
        row.prompts = [Prompt(position=i, text=text, embedding=vector_bytes(vec))
                       for i, (text, vec) in enumerate(zip(prompts, prompt_embeddings if prompts else []))]
        row.parents = [Lineage(position=i, parent_id=info.id, parent_ref=info.ref, weight=weight)
                       for i, (info, weight) in enumerate(parent_refs)]
        with self.blobs.guard():  # no deletion between writing the blob and committing its row
            self.blobs.put(weights_bytes, digest=weights_sha)
            faults.point("add.after_blob")
            info = self._insert_new_version(row)
        faults.point("add.after_commit")
        if row.embedding is not None:
            self._index_add([row.id], bytes_vector(row.embedding)[None, :])
        return info

    def _insert_new_version(self, row: Adapter) -> AdapterInfo:
        """Number the version and insert in one transaction, retrying if a concurrent add won."""
        for _attempt in range(5):
            try:
                with self.write_session() as session:
                    name_lock(session, f"adapter:{row.name}")
                    latest = session.scalar(select(func.max(Adapter.version)).where(Adapter.name == row.name))
                    row.version = (latest or 0) + 1
                    session.add(row)
                    session.flush()
                    return adapter_infos(session, [row])[0]
            except SQLIntegrityError:
                continue
        raise RegistryError(f"could not allocate a version for {row.name}: too many concurrent writers")

    # -- reading ---------------------------------------------------------------------------------
    def list_adapters(self, *, base_model: str | None = None, kind: str | None = None,
                      task: str | None = None, tag: str | None = None, name: str | None = None,
                      include_removed: bool = False) -> list[AdapterInfo]:
        with self.session() as session:
            query = select(Adapter).order_by(Adapter.name, Adapter.version)
            if not include_removed:
                query = query.where(Adapter.removed_at.is_(None))
            if base_model:
                from registry import base_models

                query = query.where(Adapter.base_model == base_models.base_model_id(base_model))
            if kind:
                query = query.where(Adapter.kind == kind)
            if task:
                query = query.where(Adapter.task == task)
            if name:
                query = query.where(Adapter.name == name)
            if tag:
                query = query.join(AdapterTag).where(AdapterTag.tag == tag)
            return adapter_infos(session, session.scalars(query).all())

    def prompts(self, ref: str) -> list[str]:
        with self.session() as session:
            row = self._resolve_row(session, ref)
            return [p.text for p in row.prompts]

    def prompt_embeddings(self, ref: str) -> np.ndarray:
        """The stored embeddings of an adapter's prompts: (n, C) float32."""
        with self.session() as session:
            row = self._resolve_row(session, ref)
            if not row.prompts:
                return np.empty((0, EMBEDDING_DIM), np.float32)
            return np.stack([bytes_vector(p.embedding) for p in row.prompts])

    def load_weights(self, ref: str) -> tuple[dict, dict]:
        """The adapter's (state dict, adapter_config dict), digest-checked."""
        from safetensors.torch import load

        info = self.resolve(ref)
        data = self._read_blob(info.weights_sha256)
        return load(data), self._config_of(info)

    def _config_of(self, info: AdapterInfo) -> dict:
        with self.session() as session:
            return dict(session.get(Adapter, info.id).peft_config)

    def _read_blob(self, digest: str) -> bytes:
        return self.blobs.read(digest)

    # -- fetching --------------------------------------------------------------------------------
    def fetch(self, ref: str, to: str | os.PathLike | None = None, verify: bool = False) -> Path:
        """A PEFT directory for ``ref`` that ``PeftModel.from_pretrained(base, path)`` loads.

        Without ``to``, the directory is a read-only cache under the home, keyed by digest: the
        weights are checked against their digest when it is written, and re-checked whenever the
        files' size or mtime changed since (or always with ``verify=True``).
        """
        info = self.resolve(ref)
        cached = self._materialize(info, verify)
        if to is None:
            return cached
        target = Path(to).expanduser()
        target.mkdir(parents=True, exist_ok=True)
        for file_name in (peft_io.CONFIG_FILE, peft_io.WEIGHTS_FILE):
            atomic_write(target / file_name, (cached / file_name).read_bytes())
        return target

    def _materialize(self, info: AdapterInfo, verify: bool) -> Path:
        directory = self.home / "fetched" / info.digest
        stamp = directory / ".verified"
        files = (directory / peft_io.CONFIG_FILE, directory / peft_io.WEIGHTS_FILE)
        expected = [[os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files if f.exists()]
        if not verify and stamp.exists() and len(expected) == 2:
            try:
                if json.loads(stamp.read_text()) == expected:
                    os.utime(directory)  # recently used: evicted last
                    return directory
            except (OSError, ValueError):
                pass
        weights = self._read_blob(info.weights_sha256)
        config = self._config_of(info)
        if sha256_bytes(peft_io.canonical_json(config)) != info.config_sha256:
            raise IntegrityError(f"stored config of {info.ref} does not match its digest")
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(files[0], json.dumps(config, indent=2, sort_keys=True).encode())
        if not files[1].exists() or sha256_file(files[1]) != info.weights_sha256:
            atomic_write(files[1], weights)
        atomic_write(stamp, json.dumps([[os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]).encode())
        os.utime(directory)  # recently used: evicted last
        evict_least_recent(sorted(directory.parent.iterdir()), fetch_cache_bytes(), keep=directory)
        return directory

    def export_vllm(self, directory: str | os.PathLike, refs: Sequence[str]) -> list[Path]:
        """Write ``<directory>/<name>/`` (PEFT files + ``registry.json``) for each REF (``registry.export``)."""
        from registry.export import export_vllm

        return export_vllm(self, directory, refs)

    # -- changing -------------------------------------------------------------------------------
    def set_alias(self, ref: str, alias: str) -> AdapterInfo:
        """Point ``<name>@<alias>`` at the version ``ref`` resolves to (creating or moving it)."""
        validate_alias(alias)
        with self.write_session() as session:
            row = self._resolve_row(session, ref)
            name_lock(session, f"adapter:{row.name}")
            existing = session.get(Alias, (row.name, alias))
            if existing is None:
                session.add(Alias(name=row.name, alias=alias, adapter_id=row.id, updated_at=utc_now()))
            else:
                existing.adapter_id, existing.updated_at = row.id, utc_now()
            session.flush()
            return adapter_infos(session, [row])[0]

    def update_metrics(self, ref: str, metrics: dict) -> AdapterInfo:
        """Merge ``metrics`` into the adapter's free-form metrics (JSON)."""
        with self.write_session() as session:
            row = self._resolve_row(session, ref)
            session.refresh(row, with_for_update=True)  # PostgreSQL: a row lock; SQLite: BEGIN IMMEDIATE
            row.metrics = {**(row.metrics or {}), **metrics}
            session.flush()
            return adapter_infos(session, [row])[0]

    def remove(self, ref: str) -> AdapterInfo:
        """Remove a version: it stops resolving, its aliases go, lineage that names it stays."""
        with self.write_session() as session:
            row = self._resolve_row(session, ref)
            name_lock(session, f"adapter:{row.name}")
            row.removed_at = utc_now()
            for alias in session.scalars(select(Alias).where(Alias.adapter_id == row.id)):
                session.delete(alias)
            info = adapter_infos(session, [row])[0]
        faults.point("rm.after_commit")
        with self.blobs.guard(exclusive=True):  # no add in flight that could be reusing this blob
            if not self.blob_referenced(info.weights_sha256):
                self.blobs.delete_unreferenced(info.weights_sha256)
                shutil.rmtree(self.home / "fetched" / info.digest, ignore_errors=True)
        index = self._get_index()
        index.remove([info.id])
        self._save_index()
        return info

    def blob_referenced(self, digest: str) -> bool:
        """Whether a live adapter or artifact references the blob ``digest`` (ask under ``blobs.guard``)."""
        with self.session() as session:
            return bool(session.scalar(select(func.count()).select_from(Adapter).where(
                Adapter.weights_sha256 == digest, Adapter.removed_at.is_(None)))
                or session.scalar(select(func.count()).select_from(Artifact).where(
                    Artifact.sha256 == digest, Artifact.removed_at.is_(None))))

    # -- consistency ------------------------------------------------------------------------------
    def doctor(self, repair: bool = False):
        """Check SQL vs blobs vs FAISS; with ``repair`` fix what can be fixed (``registry.doctor``)."""
        from registry.doctor import doctor

        return doctor(self, repair)
