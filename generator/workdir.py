"""Resumable training shared by every generator: the work folder under
``<home>/work/generators/<fingerprint>/`` (numbered states, a LATEST pointer, a lock), the artifact a
finished run already stored, the chunked loop that saves after every ``save_every`` steps and on
Ctrl-C, and the metadata every artifact records about its training."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from generator.errors import GeneratorError, TrainingStopped
from registry.errors import NotFound

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from generator.trainset import TrainingSet

MAX_CURVE_POINTS = 200


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
                          .encode("utf-8")).hexdigest()


def source_version(version: str, files: Sequence[str]) -> str:
    """``version`` plus a hash of these source files of the generator package (changes with the math)."""
    digest = hashlib.sha256()
    folder = Path(__file__).resolve().parent
    for module in files:
        path = folder / module
        if path.exists():
            digest.update(path.read_bytes())
    return f"{version}+{digest.hexdigest()[:12]}"


def subsample_curve(losses: Sequence[float], points: int = MAX_CURVE_POINTS) -> list[list[float]]:
    """[[step, loss], ...] with at most ``points`` entries, always including the last step."""
    if not losses:
        return []
    stride = max(1, -(-len(losses) // points))
    steps = list(range(stride, len(losses) + 1, stride))
    if steps[-1] != len(losses):
        steps.append(len(losses))
    return [[s, float(losses[s - 1])] for s in steps]

class WorkDir:
    """``<home>/work/generators/<fingerprint>/``: numbered state folders and a LATEST pointer.

    Each save goes into a fresh ``step-NNNNNNNN`` folder; LATEST (a small JSON written atomically)
    names the complete one, so a crash mid-save leaves the previous state in use.
    """

    def __init__(self, root: Path):
        self.root = root

    def _latest(self) -> dict | None:
        path = self.root / "LATEST"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def clear(self) -> None:
        for path in self.root.glob("step-*"):
            shutil.rmtree(path, ignore_errors=True)
        for name in ("LATEST", "LATEST.tmp"):
            (self.root / name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self):
        """Hold an exclusive lock on the folder (a second run of the same training is refused)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "w") as handle:
            try:
                import fcntl
            except ImportError:  # not POSIX: no locking
                yield
                return
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise GeneratorError(f"another train-generator run is using {self.root}") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self, model):
        """(TrainState, latest record) or (None, None) when nothing usable is saved."""
        from generator.training import load_training_state

        latest = self._latest()
        if not latest or not (self.root / latest["folder"] / "training_state.json").exists():
            return None, None
        return load_training_state(self.root / latest["folder"], model), latest

    def save(self, state, model, record: dict) -> None:
        from generator.training import save_training_state

        self.root.mkdir(parents=True, exist_ok=True)
        folder = f"step-{state.step:08d}"
        save_training_state(self.root / folder, state, model)
        self._write_latest({**record, "folder": folder, "step": state.step})
        for old in self.root.glob("step-*"):
            if old.name != folder:
                shutil.rmtree(old, ignore_errors=True)

    def mark_stored(self, artifact_ref: str, artifact_sha256: str, steps: int) -> None:
        latest = self._latest() or {}
        self._write_latest({**latest, "artifact": artifact_ref, "artifact_sha256": artifact_sha256,
                            "artifact_steps": steps})

    def stored(self) -> dict | None:
        latest = self._latest()
        return latest if latest and latest.get("artifact") else None

    def _write_latest(self, record: dict) -> None:
        from registry.atomic import atomic_write_json

        atomic_write_json(self.root / "LATEST", record)

def stored_artifact(reg, work, steps: int, artifact_type: str, status):
    """The artifact this exact training already stored (same work dir and steps), if still intact."""
    stored = work.stored()
    if stored and stored.get("artifact_steps") == steps:
        try:
            info = reg.resolve_artifact(stored["artifact"], artifact_type)
        except NotFound:
            return None
        if info.sha256 == stored.get("artifact_sha256"):
            status(f"already trained: {info.ref}")
            return info
    return None

def model_and_state(work, build_model, seed: int, steps: int):
    """A freshly seeded model with the saved training state (if any) loaded: (model, state, record)."""
    import torch

    from generator.training import TrainState

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model()
    try:
        state, record = work.load(model)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise GeneratorError(f"saved training state in {work.root} is unreadable ({str(err).splitlines()[0]}): "
                             "start over with resume=False / --fresh") from None
    if state is not None and state.step > steps:
        raise GeneratorError(f"saved training state is at step {state.step} > --steps {steps}: "
                             f"rerun with more steps or start over (resume=False / --fresh)")
    return model, state or TrainState(seed=seed), record

def run_chunked_training(work, model, state, *, steps: int, save_every: int, train_chunk, on_step, record: dict,
                         wall_before: float):
    """Train up to ``steps`` in chunks of ``save_every``, saving the state after each chunk and on Ctrl-C.

    ``train_chunk(model, state, target, on_chunk_step) -> (model, state)`` trains to step ``target``;
    ``on_step(step, steps, loss)`` returning False stops after that step (state saved,
    ``TrainingStopped`` raised). Returns ``(model, state, wall_time_s)``, resumed runs included.
    """
    started, stopped = time.perf_counter(), False

    def stop_requested(step: int, _chunk_end: int, loss: float):
        nonlocal stopped
        if on_step is not None and on_step(step, steps, loss) is False:  # the whole run, not the chunk
            stopped = True
            return False
        return None

    def save() -> None:
        work.save(state, model, {**record, "wall_time_s": wall_before + time.perf_counter() - started})

    try:
        while state.step < steps and not stopped:
            target = min(steps, (state.step // save_every + 1) * save_every)
            model, state = train_chunk(model, state, target, stop_requested)
            save()
    except KeyboardInterrupt:
        save()
        raise
    if stopped and state.step < steps:
        raise TrainingStopped(f"training stopped at step {state.step}/{steps}; state saved in {work.root}: "
                              "rerun the same command to resume")
    return model, state, wall_before + time.perf_counter() - started

def training_meta(data: TrainingSet, layout, exclude_tasks: Sequence[str], checkpoints_per_task: dict, state,
                  training: dict) -> dict:
    """The artifact metadata every generator records: what it was trained on and how training went."""
    losses = state.losses
    tail = losses[-max(1, min(20, len(losses) // 10)):]
    return {
        "layout": layout.to_dict(),
        "layout_fingerprint": layout.fingerprint,
        "registry_layout_fingerprint": data.registry_layout,
        "base_model": data.base_model,
        "base_fingerprint": data.base_fingerprint,
        "peft_config": data.peft_fields,
        "dtype": data.dtype,
        "adapters": data.adapters,
        "tasks": data.tasks,
        "excluded_tasks": sorted(set(exclude_tasks)),
        "checkpoints_per_task": checkpoints_per_task,
        "prompts_per_task": {t: len(v) for t, v in data.prompts.items()},
        "steps": state.step,
        "final_loss": float(losses[-1]) if losses else None,
        "final_loss_mean": float(sum(tail) / len(tail)) if tail else None,
        "loss_curve": subsample_curve(losses),
        "training": training,
    }


def train_and_store(reg, work: WorkDir, *, artifact_type: str, steps: int, resume: bool, status, build_model,
                    seed: int, device, save_every: int, on_step, record: dict, train_chunk, store):
    """The run every backend shares, under the work folder's lock: start over (``resume=False``) or
    resume, return the artifact this exact run already stored, else train to ``steps`` in saved
    chunks and store the result.

    ``build_model()`` makes the freshly seeded model; ``train_chunk`` is ``run_chunked_training``'s;
    ``store(model, state, wall_time_s, resumed_from) -> (tensors, meta)`` makes what is stored as
    ``record["name"]``, base model ``record["base_model"]``. Returns the ``ArtifactInfo``.
    """
    with work.locked():
        if not resume:
            work.clear()
        info = stored_artifact(reg, work, steps, artifact_type, status)
        if info is not None:
            return info
        model, state, saved = model_and_state(work, build_model, seed, steps)
        wall_before = float(saved.get("wall_time_s", 0.0)) if saved else 0.0
        resumed_from = state.step
        status(f"training on {device}" + (f", resuming at step {resumed_from}" if resumed_from else ""))
        model, state, wall_time = run_chunked_training(
            work, model, state, steps=steps, save_every=save_every, on_step=on_step, wall_before=wall_before,
            record={k: v for k, v in record.items() if k != "base_model"}, train_chunk=train_chunk)
        tensors, meta = store(model, state, wall_time, resumed_from)
        status("storing the generator")
        info = reg.add_artifact(record["name"], artifact_type, tensors, meta, base_model=record.get("base_model"))
        work.mark_stored(info.ref, info.sha256, steps)
        return info
