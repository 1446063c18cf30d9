"""Zoo harvests on a Ray cluster: one Ray task per zoo task, all writing to one shared registry.

Pure orchestration around ``harvest.service.harvest_task``: connect, submit one task per zoo name (a
GPU each where the cluster has GPUs, else a CPU), report each task as it finishes, and collect its
summary or its one-line error. Resuming is the harvest's own: a finished task is skipped, a killed
one continues from its work folder ``<home>/work/harvest/``; a worker that dies (killed, out of
memory, node lost) is retried by Ray and resumes the same way.

Workers get the registry's location as arguments and in their runtime environment (``REGISTRY_*``),
never from whatever environment the cluster was started with. Ray is imported only here, lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harvest.service import HarvestSummary
from harvest.train import HarvestConfig, HarvestError
from registry.errors import RegistryError

RETRIES = 3  # times Ray reruns a task whose worker died (not one that raised)
FORWARDED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
             # where the object store is (REGISTRY_BLOB_URL=s3://...); its credentials are not sent
             # through Ray's job metadata: nodes bring their own (instance role, env, ~/.aws)
             "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


@dataclass
class TaskOutcome:
    """One zoo task's result: its summary, or the one-line reason it failed."""

    task: str
    summary: HarvestSummary | None = None
    error: str | None = None


def harvest_on_ray(names: Sequence[str], *, home: Path, database_url: str, address: str | None = None,
                   base: str | None = None, config: HarvestConfig | None = None, device: str | None = None,
                   precision: str | None = None,
                   on_done: Callable[[TaskOutcome], None] | None = None) -> list[TaskOutcome]:
    """Harvest each of ``names`` as a Ray task into the registry at ``home`` / ``database_url``.

    ``address`` None: ``ray.init()``'s default (the cluster this machine runs, else a new local one).
    ``on_done`` is called with each outcome as its task finishes; the outcomes come back in ``names``
    order. Errors of single tasks are collected, not raised."""
    ray = _import_ray()
    home = Path(home).resolve()  # the workers run in other folders
    if base is not None and Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    env = {"env_vars": worker_env(home, database_url)}
    connected_here = not ray.is_initialized()
    if connected_here:
        _connect(ray, address, env)  # the job's environment: its first workers already have it
    try:
        _check_shared(ray, database_url)
        harvest_one = ray.remote(_harvest_one).options(
            **task_resources(ray.cluster_resources(), device), max_retries=RETRIES,
            **({} if connected_here else {"runtime_env": env}))
        args = (str(home), database_url, base, config, device, precision)
        pending = {harvest_one.remote(name, *args): name for name in names}
        outcomes: dict[str, TaskOutcome] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            outcomes[name] = _outcome(ray, name, ready[0])
            if on_done is not None:
                on_done(outcomes[name])
        return [outcomes[name] for name in names]
    finally:
        if connected_here:
            ray.shutdown()


def task_resources(cluster: dict[str, float], device: str | None = None) -> dict[str, float]:
    """What one harvest asks of the cluster: a GPU where it has any (unless ``device`` is cpu), else a CPU."""
    if cluster.get("GPU", 0) >= 1 and device != "cpu":
        return {"num_gpus": 1}
    return {"num_cpus": 1}


def worker_env(home: Path, database_url: str) -> dict[str, str]:
    """The workers' environment: the registry's location, this process's other ``REGISTRY_*``
    settings (blob store, precision, ...) and the Hugging Face offline and quiet switches."""
    env = {k: v for k, v in os.environ.items() if k.startswith("REGISTRY_") or k in FORWARDED}
    return env | {"REGISTRY_HOME": str(home), "REGISTRY_DATABASE_URL": database_url}


def _harvest_one(name: str, home: str, database_url: str, base: str | None, config: HarvestConfig | None,
                 device: str | None, precision: str | None) -> HarvestSummary:
    """The body of one Ray task: today's per-task harvest, on the registry the driver names."""
    from harvest.service import harvest_task, resolve_task
    from registry.store import Registry

    with Registry.open(home, database_url) as reg:
        return harvest_task(reg, resolve_task(name), base=base, config=config, device=device, precision=precision)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise HarvestError("--ray needs Ray: pip install 'lora-registry[ray]'") from None
    return ray


def _connect(ray, address: str | None, runtime_env: dict) -> None:
    import logging

    where = f"at {address}" if address else "on this machine"
    if address and not _answers(address):  # ray.init would retry for minutes
        raise HarvestError(f"cannot connect to the Ray cluster {where}: nothing answers there "
                           "(is `ray start --head` running?)")
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise HarvestError(f"cannot connect to the Ray cluster {where}: {_first_line(exc)}") from None


def _answers(address: str, timeout_s: float = 5.0) -> bool:
    """Whether something listens at a ``host:port`` (or ``ray://host:port``) address; other forms
    (``auto``, ``local``) are Ray's to resolve."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return True
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _check_shared(ray, database_url: str) -> None:
    """Several machines must share the registry: SQLite is one machine's file."""
    machines = sum(1 for node in ray.nodes() if node.get("Alive"))
    if machines > 1 and database_url.startswith("sqlite"):
        raise HarvestError(f"the Ray cluster has {machines} machines but the registry is SQLite; "
                           "set REGISTRY_DATABASE_URL to a PostgreSQL URL they all reach")


def _outcome(ray, name: str, ref) -> TaskOutcome:
    """The task's summary, or a one-line error: the exception it raised, or why its worker died."""
    try:
        return TaskOutcome(name, summary=ray.get(ref))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None) or exc
        message = _first_line(cause)
        return TaskOutcome(name, error=message if isinstance(cause, RegistryError)
                           else f"{type(cause).__name__}: {message}")
    except ray.exceptions.RayError as exc:  # worker died after its retries, node lost, cancelled
        return TaskOutcome(name, error=f"{type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
