"""Real crashes (issue 17): a subprocess SIGKILLs itself at a named fault point (``REGISTRY_FAULT``,
``registry.faults``), which skips every ``finally`` and ``atexit`` a monkeypatched exception would
run. After each: nothing half-visible to a reader, ``doctor`` reports what is left, ``--repair``
fixes it, and a rerun completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, fault: str | None = None, env_extra: dict | None = None, timeout: float = 300):
    env = {**os.environ, **(env_extra or {})}
    env.pop("REGISTRY_FAULT", None)
    if fault:
        env["REGISTRY_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", "from cli.main import main; main()", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def killed(proc) -> bool:
    return proc.returncode == -signal.SIGKILL


def reader_view(home):
    """What a reader sees: every listed adapter must load (no half-visible add)."""
    from registry.store import Registry

    with Registry.open(home) as reg:
        refs = [a.ref for a in reg.list_adapters()]
        for ref in refs:
            reg.load_weights(ref)
        return refs, reg.doctor()


def repaired_clean(home) -> None:
    from registry.store import Registry

    with Registry.open(home) as reg:
        reg.doctor(repair=True)
        report = reg.doctor()
        assert report.ok, report.problems


# Every fault point on SQLite; on PostgreSQL the one between the SQL commit and the index (each case
# is two CLI processes, so the matrix is kept small for CI's time budget).
@pytest.mark.parametrize("point, visible, problem, database_url", [
    ("add.after_blob", [], "unreferenced blob", "sqlite"),          # blob written, row never committed
    ("add.after_commit", ["a@1"], "FAISS index", "sqlite"),         # row committed, index not saved
    ("index.between_files", ["a@1"], None, "sqlite"),               # .faiss renamed, .json not yet
    ("index.before_save", ["a@1"], "FAISS index", "sqlite"),
    ("add.after_commit", ["a@1"], "FAISS index", "postgres"),
], indirect=["database_url"])
def test_kill_during_add(point, visible, problem, database_url, tiny_adapter_factory, registry_home, tmp_path):
    adapter = tiny_adapter_factory("a")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("add two numbers\n")
    first = run_cli("add", adapter, "--name", "a", "--prompts", prompts, fault=point)
    assert killed(first), first.stderr
    refs, report = reader_view(registry_home)
    assert refs == visible
    if problem:
        assert any(problem in p for p in report.problems), report.problems
    repaired_clean(registry_home)
    again = run_cli("add", adapter, "--name", "a", "--prompts", prompts)
    assert again.returncode == 0, again.stderr
    refs, report = reader_view(registry_home)
    assert refs == visible + [f"a@{len(visible) + 1}"] and report.ok, report.problems


def test_kill_during_rm_leaves_a_removed_adapter_and_a_reported_blob(database_url, tiny_adapter_factory,
                                                                      registry_home):
    assert run_cli("add", tiny_adapter_factory("a"), "--name", "a").returncode == 0
    proc = run_cli("rm", "a@1", fault="rm.after_commit")
    assert killed(proc), proc.stderr
    refs, report = reader_view(registry_home)
    assert refs == [] and any("unreferenced blob" in p for p in report.problems), report.problems
    repaired_clean(registry_home)


def test_kill_mid_migration_leaves_no_partial_schema(registry_home):
    """SQLite: the whole migration is one transaction (real BEGIN), so a kill rolls it all back."""
    from sqlalchemy import create_engine, inspect

    proc = run_cli("list", fault="migration.mid")
    assert killed(proc), proc.stderr
    engine = create_engine(f"sqlite:///{registry_home / 'registry.db'}")
    assert inspect(engine).get_table_names() == []  # not `adapters` without `prompts`
    engine.dispose()
    again = run_cli("list")
    assert again.returncode == 0, again.stderr
    refs, report = reader_view(registry_home)
    assert refs == [] and report.ok, report.problems


HARVEST = ["--steps", "6", "--keep", "3", "--batch-size", "4", "--rank", "4", "--targets", "q_proj,v_proj"]


def write_task(path, n=24):
    rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path.with_name(path.name + ".meta.json").write_text(json.dumps(
        {"name": "doubling", "description": "Double a number.", "metric": "numeric"}))
    return path


def test_harvest_killed_before_final_gets_final_on_rerun(tiny_base_dir, tmp_path, registry_home):
    task = write_task(tmp_path / "doubling.jsonl")
    proc = run_cli("harvest", "--task", task, "--base", tiny_base_dir, *HARVEST, fault="harvest.before_final")
    assert killed(proc), proc.stderr
    refs, _ = reader_view(registry_home)
    assert refs == ["doubling@1", "doubling@2", "doubling@3"]
    from registry.errors import NotFound
    from registry.store import Registry

    with Registry.open(registry_home) as reg, pytest.raises(NotFound):
        reg.resolve("doubling@final")
    again = run_cli("harvest", "--task", task, "--base", tiny_base_dir, *HARVEST, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)[0]["skipped"]
    with Registry.open(registry_home) as reg:
        assert reg.resolve("doubling@final").ref == "doubling@3"


def test_harvest_killed_between_state_files_resumes(tiny_base_dir, tmp_path, registry_home):
    """Killed after the new tensors but before the JSON naming them: the rerun resumes from the
    previous (consistent) state and stores each checkpoint once."""
    task = write_task(tmp_path / "doubling.jsonl")
    proc = run_cli("harvest", "--task", task, "--base", tiny_base_dir, *HARVEST,
                   fault="harvest.state_between_files:2")
    assert killed(proc), proc.stderr
    again = run_cli("harvest", "--task", task, "--base", tiny_base_dir, *HARVEST, "--json")
    assert again.returncode == 0, again.stderr
    from registry.store import Registry

    with Registry.open(registry_home) as reg:
        steps = [a.recipe["step"] for a in reg.list_adapters(task="doubling")]
        assert len(steps) == 3 == len(set(steps))
        assert reg.resolve("doubling@final").ref == "doubling@3"


def test_two_harvests_of_one_task_at_once_store_each_checkpoint_once(tiny_base_dir, tmp_path, registry_home):
    task = write_task(tmp_path / "doubling.jsonl")
    args = [sys.executable, "-c", "from cli.main import main; main()", "harvest", "--task", str(task),
            "--base", str(tiny_base_dir), *HARVEST]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    refs, report = reader_view(registry_home)
    assert refs == ["doubling@1", "doubling@2", "doubling@3"] and report.ok, report.problems


def _age(path, seconds: float = 7200) -> None:
    """Make ``path`` look untouched for ``seconds`` (what a killed writer left an hour ago)."""
    import time

    old = time.time() - seconds
    os.utime(path, (old, old))


def test_export_killed_mid_swap_leaves_a_complete_folder(tiny_adapter_factory, registry_home, tmp_path):
    """`registry export --vllm`: killed right after the folders were exchanged, the resolver
    folder is the new complete version; the old one, left under a temp name, is removed later."""
    from registry.blobs import sha256_file

    out = tmp_path / "loras"
    assert run_cli("add", tiny_adapter_factory("a", seed=1), "--name", "a").returncode == 0
    assert run_cli("export", "a@1", "--vllm", out).returncode == 0
    assert run_cli("add", tiny_adapter_factory("b", seed=2), "--name", "a").returncode == 0
    proc = run_cli("export", "a@2", "--vllm", out, fault="swap.after_exchange")
    assert killed(proc), proc.stderr
    from registry.store import Registry

    with Registry.open(registry_home) as reg:
        second = reg.resolve("a@2")
    record = json.loads((out / "a" / "registry.json").read_text())
    assert record["digest"] == second.digest
    assert sha256_file(out / "a" / "adapter_model.safetensors") == second.weights_sha256
    leftovers = [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # the old folder, exchanged out
    _age(leftovers[0])
    assert run_cli("export", "a@2", "--vllm", out).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["a"]


def test_client_download_killed_mid_body_leaves_nothing_cached(reg, tiny_adapter_factory, tmp_path):
    """`registry pull`: a client killed in the middle of the weights leaves only a temp folder (never
    a cached adapter a later run would trust); the rerun downloads, verifies, and cleans up."""
    from registry.blobs import sha256_file
    from registry.http.app import create_app
    from server_helpers import ServerThread

    info = reg.add_directory(tiny_adapter_factory("a"), name="far")
    cache = tmp_path / "client-cache"
    with ServerThread(create_app(reg, token="t")) as url:
        proc = run_cli("pull", "far@1", "--server", url, "--cache-dir", cache, fault="client.mid_download")
        assert killed(proc), proc.stderr
        entries = list((cache / "adapters").iterdir())
        assert entries and all(p.name.startswith(".tmp-") for p in entries)
        for entry in entries:
            _age(entry)
        again = run_cli("pull", "far@1", "--server", url, "--cache-dir", cache)
        assert again.returncode == 0, again.stderr
    path = Path(again.stdout.strip().splitlines()[-1])
    assert sha256_file(path / "adapter_model.safetensors") == info.weights_sha256
    assert sorted(p.name for p in (cache / "adapters").iterdir()) == [info.digest]
