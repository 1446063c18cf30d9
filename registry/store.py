"""The registry: adapters in SQL, their weights as content-addressed safetensors, their prompt
embeddings in FAISS.

Every write follows the same order so that a crash never leaves a half-added adapter visible:
validate everything first, write the blob (temp file + rename, invisible until referenced), insert
all rows in one transaction, then update the FAISS index (which ``doctor`` and the catch-up on open
repair if that last step is lost).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from registry import peft_io
from registry.atomic import atomic_write, swap_directory
from registry.blobs import BlobStore, sha256_bytes, sha256_file
from registry.db import ensure_schema, make_engine
from registry.embeddings import embed_texts, encoder_id, mean_embedding
from registry.errors import IntegrityError, InvalidAdapter, NotFound, RegistryError
from registry.index import AdapterIndex
from registry.paths import database_url, registry_home
from registry.refs import Ref, parse_ref, validate_alias, validate_name
from registry.schema import Adapter, AdapterTag, Alias, Artifact, Lineage, Prompt, utc_now

ADAPTER_KINDS = ("harvested", "imported", "generated", "composed")
EMBEDDING_DIM = 384


@dataclass
class AdapterInfo:
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

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ref"] = self.ref
        data["created_at"] = self.created_at.isoformat()
        return data


@dataclass
class SearchHit:
    adapter: AdapterInfo
    score: float


@dataclass
class ArtifactInfo:
    id: int
    name: str
    version: int
    artifact_type: str
    base_model: str | None
    sha256: str
    size_bytes: int
    created_at: datetime
    meta: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ref"] = self.ref
        data["created_at"] = self.created_at.isoformat()
        return data


@dataclass
class DoctorReport:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    checked_adapters: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _info(row: Adapter, tags: list[str], parents: list[dict], aliases: list[str]) -> AdapterInfo:
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


def _infos(session: Session, rows: Sequence[Adapter]) -> list[AdapterInfo]:
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
    return [_info(row, tags[row.id], parents[row.id], aliases[row.id]) for row in rows]


def _artifact_info(row: Artifact) -> ArtifactInfo:
    return ArtifactInfo(id=row.id, name=row.name, version=row.version, artifact_type=row.artifact_type,
                        base_model=row.base_model, sha256=row.sha256, size_bytes=row.size_bytes,
                        created_at=row.created_at, meta=dict(row.meta or {}))


def _vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _bytes_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32)


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


class Registry:
    """Open with ``Registry.open()``; every method takes REF strings (``name``, ``name@3``,
    ``name@prod``, ``sha256:<digest>``)."""

    def __init__(self, home: Path, url: str, encoder: str | None = None):
        self.home = home
        self.url = url
        self.encoder = encoder
        self.encoder_id = encoder_id(encoder)
        home.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(url)
        ensure_schema(self.engine, url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.blobs = BlobStore(home / "blobs")
        self._index: AdapterIndex | None = None
        self._defer_index_save = False

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, database_url_: str | None = None,
             encoder: str | None = None) -> "Registry":
        """Open (creating and migrating when needed) the registry at ``home`` / ``$REGISTRY_HOME``."""
        resolved = registry_home(home)
        return cls(resolved, database_url(resolved, database_url_), encoder)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def session(self):
        with self._sessions() as session, session.begin():
            yield session

    # -- resolving ------------------------------------------------------------------------------
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
            return _infos(session, [self._resolve_row(session, ref)])[0]

    # -- adding ---------------------------------------------------------------------------------
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
        modules = peft_io.lora_modules(state_dict)
        peft_io.check_finite(state_dict)

        base_ref = base or peft_config.get("base_model_name_or_path")
        if not base_ref:
            raise InvalidAdapter("the adapter does not name its base model: pass --base")
        base_facts = base_models.base_info(base_ref)  # cached by config.json's sha256: no transformers import
        base_id = base_models.base_model_id(base_ref)
        peft_io.check_against_base(modules, base_facts.shapes, base_id)
        ranks = {m.rank for m in modules}
        declared_rank = int(peft_config.get("r", 0))
        if declared_rank not in ranks and not peft_config.get("rank_pattern"):
            raise InvalidAdapter(f"adapter_config.json says r={declared_rank} but the weights have rank "
                                 f"{'/'.join(map(str, sorted(ranks)))}")

        prompts = [p for p in prompts]
        if prompts and any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise RegistryError("prompts must be non-empty strings")
        if prompts and prompt_embeddings is None:
            prompt_embeddings = embed_texts(prompts, self.encoder)
        if prompt_embeddings is not None and len(prompt_embeddings) != len(prompts):
            raise RegistryError("prompt_embeddings must have one row per prompt")

        config = canonical_peft_config(peft_config, base_id)
        config_bytes = peft_io.canonical_json(config)
        weights_bytes = peft_io.serialize_weights(state_dict)
        config_sha, weights_sha = sha256_bytes(config_bytes), sha256_bytes(weights_bytes)
        parent_refs = [(self.resolve(ref), weight) for ref, weight in parents]

        self.blobs.put(weights_bytes, digest=weights_sha)
        row = Adapter(
            name=name, kind=kind, base_model=base_id, base_fingerprint=base_facts.fingerprint,
            rank=max(ranks), alpha=float(config.get("lora_alpha", 0)), use_rslora=bool(config.get("use_rslora")),
            target_modules=sorted({m.module.rsplit(".", 1)[-1] for m in modules}),
            layout_fingerprint=peft_io.layout_fingerprint(modules), peft_config=config,
            task=task, task_description=task_description, weights_sha256=weights_sha,
            config_sha256=config_sha, digest=sha256_bytes(f"{config_sha}:{weights_sha}".encode()),
            size_bytes=len(weights_bytes), metrics=dict(metrics or {}), recipe=dict(recipe or {}),
            encoder=self.encoder_id if prompts else None,
            embedding=_vector_bytes(mean_embedding(prompt_embeddings)) if prompts else None,
            created_at=utc_now(),
        )
        row.tags = [AdapterTag(tag=t) for t in tags]
        row.prompts = [Prompt(position=i, text=text, embedding=_vector_bytes(vec))
                       for i, (text, vec) in enumerate(zip(prompts, prompt_embeddings if prompts else []))]
        row.parents = [Lineage(position=i, parent_id=info.id, parent_ref=info.ref, weight=weight)
                       for i, (info, weight) in enumerate(parent_refs)]
        info = self._insert_new_version(row)
        if row.embedding is not None:
            self._index_add([row.id], _bytes_vector(row.embedding)[None, :])
        return info

    def _insert_new_version(self, row: Adapter) -> AdapterInfo:
        """Number the version and insert in one transaction, retrying if a concurrent add won."""
        for _attempt in range(5):
            try:
                with self.session() as session:
                    latest = session.scalar(select(func.max(Adapter.version)).where(Adapter.name == row.name))
                    row.version = (latest or 0) + 1
                    session.add(row)
                    session.flush()
                    return _infos(session, [row])[0]
            except SQLIntegrityError:
                continue
        raise RegistryError(f"could not allocate a version for {row.name}: too many concurrent writers")

    # -- reading --------------------------------------------------------------------------------
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
            return _infos(session, session.scalars(query).all())

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
            return np.stack([_bytes_vector(p.embedding) for p in row.prompts])

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
        path = self.blobs.path(digest)
        if not path.exists():
            raise IntegrityError(f"blob {digest[:12]} is missing from {self.blobs.root}: run `registry doctor`")
        data = path.read_bytes()
        if sha256_bytes(data) != digest:
            raise IntegrityError(f"blob {digest[:12]} does not match its digest: run `registry doctor`")
        return data

    # -- fetching -------------------------------------------------------------------------------
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
        return directory

    def export_vllm(self, directory: str | os.PathLike, refs: Sequence[str]) -> list[Path]:
        """Write ``<directory>/<name>/adapter_config.json`` (+ weights) for each REF: the layout
        vLLM's filesystem resolver and LoRAX read. Each folder is swapped in atomically."""
        root = Path(directory).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        written = []
        for ref in refs:
            info = self.resolve(ref)
            source = self._materialize(info, verify=False)
            staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
            for file_name in (peft_io.CONFIG_FILE, peft_io.WEIGHTS_FILE):
                shutil.copyfile(source / file_name, staging / file_name)
            (staging / "registry.json").write_text(json.dumps({"ref": info.ref, "digest": info.digest}))
            target = root / info.name
            swap_directory(staging, target)
            written.append(target)
        return written

    # -- changing -------------------------------------------------------------------------------
    def set_alias(self, ref: str, alias: str) -> AdapterInfo:
        """Point ``<name>@<alias>`` at the version ``ref`` resolves to (creating or moving it)."""
        validate_alias(alias)
        with self.session() as session:
            row = self._resolve_row(session, ref)
            existing = session.get(Alias, (row.name, alias))
            if existing is None:
                session.add(Alias(name=row.name, alias=alias, adapter_id=row.id, updated_at=utc_now()))
            else:
                existing.adapter_id, existing.updated_at = row.id, utc_now()
            session.flush()
            return _infos(session, [row])[0]

    def update_metrics(self, ref: str, metrics: dict) -> AdapterInfo:
        """Merge ``metrics`` into the adapter's free-form metrics (JSON)."""
        with self.session() as session:
            row = self._resolve_row(session, ref)
            row.metrics = {**(row.metrics or {}), **metrics}
            session.flush()
            return _infos(session, [row])[0]

    def remove(self, ref: str) -> AdapterInfo:
        """Remove a version: it stops resolving, its aliases go, lineage that names it stays."""
        with self.session() as session:
            row = self._resolve_row(session, ref)
            row.removed_at = utc_now()
            for alias in session.scalars(select(Alias).where(Alias.adapter_id == row.id)):
                session.delete(alias)
            still_used = session.scalar(select(func.count()).select_from(Adapter).where(
                Adapter.weights_sha256 == row.weights_sha256, Adapter.removed_at.is_(None), Adapter.id != row.id))
            info = _infos(session, [row])[0]
        if not still_used:
            self.blobs.delete(info.weights_sha256)
            shutil.rmtree(self.home / "fetched" / info.digest, ignore_errors=True)
        index = self._get_index()
        index.remove([info.id])
        self._save_index()
        return info

    # -- artifacts (trained generators) ----------------------------------------------------------
    def add_artifact(self, name: str, artifact_type: str, tensors: dict, meta: dict,
                     base_model: str | None = None) -> ArtifactInfo:
        """Store a versioned safetensors artifact with JSON metadata (e.g. a trained generator)."""
        from safetensors.torch import save

        validate_name(name)
        data = save({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())},
                    metadata={"format": "pt"})
        digest = self.blobs.put(data)
        for _attempt in range(5):
            try:
                with self.session() as session:
                    latest = session.scalar(select(func.max(Artifact.version)).where(Artifact.name == name))
                    row = Artifact(name=name, version=(latest or 0) + 1, artifact_type=artifact_type,
                                   base_model=base_model, sha256=digest, size_bytes=len(data),
                                   meta=json.loads(json.dumps(meta)), created_at=utc_now())
                    session.add(row)
                    session.flush()
                    return _artifact_info(row)
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
            return _artifact_info(row)

    def latest_artifact(self, artifact_type: str) -> ArtifactInfo | None:
        with self.session() as session:
            row = session.scalar(select(Artifact).where(Artifact.removed_at.is_(None),
                                                        Artifact.artifact_type.startswith(artifact_type))
                                 .order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(1))
            return _artifact_info(row) if row else None

    def list_artifacts(self, artifact_type: str | None = None) -> list[ArtifactInfo]:
        with self.session() as session:
            query = select(Artifact).where(Artifact.removed_at.is_(None)).order_by(Artifact.name, Artifact.version)
            if artifact_type:
                query = query.where(Artifact.artifact_type.startswith(artifact_type))
            return [_artifact_info(r) for r in session.scalars(query)]

    def load_artifact(self, ref: str, artifact_type: str | None = None) -> tuple[dict, ArtifactInfo]:
        from safetensors.torch import load

        info = self.resolve_artifact(ref, artifact_type)
        return load(self._read_blob(info.sha256)), info

    # -- search ---------------------------------------------------------------------------------
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
                infos = {info.id: info for info in _infos(session, rows)}
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

    # -- the FAISS index --------------------------------------------------------------------------
    def _live_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        with self.session() as session:
            rows = session.execute(select(Adapter.id, Adapter.embedding).where(
                Adapter.removed_at.is_(None), Adapter.embedding.is_not(None),
                Adapter.encoder == self.encoder_id).order_by(Adapter.id)).all()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = np.stack([_bytes_vector(r[1]) for r in rows]) if rows else np.empty((0, EMBEDDING_DIM), np.float32)
        return ids, vectors

    def _get_index(self) -> AdapterIndex:
        """The loaded index, caught up with SQL (adds and removals made by other processes)."""
        if self._index is not None:
            return self._index
        index = AdapterIndex(self.home / "index", EMBEDDING_DIM, self.encoder_id)
        if not index.load():
            ids, vectors = self._live_embeddings()
            index.rebuild(ids, vectors)
            self._index = index
            self._save_index()
            return index
        self._index = index
        self._catch_up(index)
        return index

    def _catch_up(self, index: AdapterIndex) -> tuple[int, int]:
        with self.session() as session:
            live = set(session.scalars(select(Adapter.id).where(
                Adapter.removed_at.is_(None), Adapter.embedding.is_not(None), Adapter.encoder == self.encoder_id)))
        present = index.ids()
        missing, extra = sorted(live - present), sorted(present - live)
        if missing:
            with self.session() as session:
                rows = session.execute(select(Adapter.id, Adapter.embedding).where(Adapter.id.in_(missing))).all()
            index.add(np.array([r[0] for r in rows], np.int64), np.stack([_bytes_vector(r[1]) for r in rows]))
        if extra:
            index.remove(extra)
        if missing or extra:
            self._save_index()
        return len(missing), len(extra)

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
        if not self._defer_index_save and self._index is not None:
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
        ids, vectors = self._live_embeddings()
        index = AdapterIndex(self.home / "index", EMBEDDING_DIM, self.encoder_id)
        index.rebuild(ids, vectors)
        self._index = index
        self._save_index()
        return len(ids)

    # -- consistency ------------------------------------------------------------------------------
    def doctor(self, repair: bool = False) -> DoctorReport:
        """Check SQL vs blobs (every digest re-hashed) vs FAISS; with ``repair`` fix what can be fixed."""
        from registry.db import current_revision, head_revision

        report = DoctorReport()
        if current_revision(self.engine) != head_revision(self.url):
            report.problems.append("database schema is not at the latest migration: run `registry migrate`")
        with self.session() as session:
            rows = session.execute(select(Adapter.id, Adapter.name, Adapter.version, Adapter.weights_sha256,
                                          Adapter.digest).where(Adapter.removed_at.is_(None))).all()
            artifact_digests = set(session.scalars(select(Artifact.sha256).where(Artifact.removed_at.is_(None))))
        report.checked_adapters = len(rows)
        referenced = {r.weights_sha256 for r in rows} | artifact_digests
        for row in rows:
            path = self.blobs.path(row.weights_sha256)
            if not path.exists() or sha256_file(path) != row.weights_sha256:
                problem = f"{row.name}@{row.version}: weights blob {'missing' if not path.exists() else 'corrupt'}"
                cached = self.home / "fetched" / row.digest / peft_io.WEIGHTS_FILE
                if repair and cached.exists() and sha256_file(cached) == row.weights_sha256:
                    atomic_write(path, cached.read_bytes())
                    report.repaired.append(f"{problem}; restored from the fetch cache")
                else:
                    report.problems.append(problem + ("; no intact copy to restore from" if repair else ""))
        for digest in sorted(self.blobs.all_digests() - referenced):
            if repair:
                self.blobs.delete(digest)
                report.repaired.append(f"deleted unreferenced blob {digest[:12]}")
            else:
                report.problems.append(f"unreferenced blob {digest[:12]} (left by an interrupted add or a removal)")
        for temp in (self.blobs.root / "sha256").glob("??/.tmp-*") if (self.blobs.root / "sha256").exists() else []:
            if repair:
                temp.unlink(missing_ok=True)
                report.repaired.append(f"deleted partial write {temp.name}")
            else:
                report.problems.append(f"partial write {temp.name} left by an interrupted add")
        index = AdapterIndex(self.home / "index", EMBEDDING_DIM, self.encoder_id)
        live_ids, _ = self._live_embeddings()
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
                report.repaired.append(f"{problem}; rebuilt {self.reindex()} vectors from SQL")
            else:
                report.problems.append(problem)
        return report
