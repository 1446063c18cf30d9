"""`registry harvest --zoo --ray-address ADDRESS` on a real local Ray cluster (a separate `ray start --head`
process with two CPUs): tasks land in the registry with `final`, a rerun skips them, a failing task
gives one line and exit 1, a killed worker's task is retried and finishes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

TASKS = ["gcd", "lcm"]  # one wave on two CPUs
HARVEST = ["--steps", "4", "--keep", "2", "--batch-size", "4", "--rank", "4", "--targets", "q_proj,v_proj",
           "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray head with 2 CPUs in its own process group; yields (address, decoy home). The cluster's
    own environment names a decoy registry, so workers that ignored what the CLI passes would write there."""
    decoy = tmp_path_factory.mktemp("decoy-home")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")} | {
        "REGISTRY_HOME": str(decoy), "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
         "--include-dashboard=false", "--object-store-memory=100000000", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while "Ray runtime started" not in (Path(temp_dir) / "ray-start.log").read_text():
        assert proc.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "ray start did not come up in 90 s"
        time.sleep(0.5)
    yield f"127.0.0.1:{port}", decoy
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: raylet, GCS and workers started under it
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:  # `ray start` and the GCS linger for 30 s and more on SIGTERM
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def few_zoo_tasks(monkeypatch):
    """`--zoo` means three small zoo tasks in this test (the workers load them by name from the real zoo)."""
    import harvest.zoo

    monkeypatch.setattr(harvest.zoo, "zoo_names", lambda family=None: list(TASKS))


def final_refs(home) -> dict[str, str]:
    """task -> the REF its `final` alias points at, for the tasks that have one."""
    from registry.errors import NotFound
    from registry.store import Registry

    refs = {}
    with Registry.open(home) as reg:
        for task in TASKS:
            try:
                refs[task] = reg.resolve(f"{task}@final").ref
            except NotFound:
                pass
    return refs


def test_zoo_harvest_on_ray_then_rerun_skips(ray_cluster, few_zoo_tasks, cli, tiny_base_dir, registry_home):
    address, decoy = ray_cluster
    code, out, err = cli("harvest", "--zoo", "--ray-address", address, "--base", tiny_base_dir, *HARVEST, "--json")
    assert code == 0, err
    summaries = json.loads(out)
    assert [s["task"] for s in summaries] == TASKS and not any(s["skipped"] for s in summaries)
    assert final_refs(registry_home) == {"gcd": "gcd@2", "lcm": "lcm@2"}
    from registry.store import Registry

    with Registry.open(registry_home) as reg:
        assert len(reg.list_adapters(kind="harvested")) == 4  # 2 checkpoints x 2 tasks, none twice
        assert reg.search("What is the greatest common divisor of 12 and 18?", k=1)[0].adapter.task == "gcd"
    assert list(decoy.iterdir()) == []  # the workers used the home the CLI passed, not the cluster's

    code, out, err = cli("harvest", "--zoo", "--ray-address", address, "--base", tiny_base_dir, *HARVEST, "--json")
    assert code == 0, err
    again = json.loads(out)
    assert all(s["skipped"] for s in again) and [s["refs"] for s in again] == [s["refs"] for s in summaries]


def test_failed_task_is_one_line_and_exit_1_killed_worker_is_retried(ray_cluster, few_zoo_tasks, cli,
                                                                    tiny_base_dir, registry_home, monkeypatch):
    from harvest.service import harvest_id, resolve_task
    from harvest.train import HarvestConfig
    from registry.base_models import base_model_id

    address, _ = ray_cluster
    config = HarvestConfig(rank=4, target_modules=("q_proj", "v_proj"), steps=4, batch_size=4, n_checkpoints=2)
    hid = harvest_id(resolve_task("gcd"), config, base_model_id(str(tiny_base_dir)), "fp32")
    blocked = registry_home / "work" / "harvest" / f"gcd-{hid}"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")  # gcd's work folder is broken
    # Every worker SIGKILLs itself after storing its checkpoints, before `final`: Ray reruns the task,
    # and the rerun finds the checkpoints stored and only sets the alias.
    monkeypatch.setenv("REGISTRY_FAULT", "harvest.before_final")
    # fp32 pinned: the harvest id (so the work folder blocked above) includes the precision, and auto
    # is bf16 on CPUs with AVX-512 BF16 / AMX
    code, out, err = cli("harvest", "--zoo", "--ray-address", address, "--base", tiny_base_dir, *HARVEST,
                         "--precision", "fp32")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: gcd: FileExistsError: ") and str(blocked) in errors[0]
    assert final_refs(registry_home) == {"lcm": "lcm@2"}
    from registry.store import Registry

    with Registry.open(registry_home) as reg:  # lcm: each checkpoint once, though its first worker died
        assert [a.version for a in reg.list_adapters(kind="harvested", task="lcm")] == [1, 2]


def test_ray_without_ray_installed_or_cluster_is_one_line(few_zoo_tasks, cli, monkeypatch, tiny_base_dir):
    code, _, err = cli("harvest", "--zoo", "--ray-address", "127.0.0.1:1", "--base", tiny_base_dir, *HARVEST)
    assert code == 1 and err.strip().splitlines() == [
        "error: cannot connect to the Ray cluster at 127.0.0.1:1: nothing answers there "
        "(is `ray start --head` running?)"]
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as it does without the extra
    code, _, err = cli("harvest", "--zoo", "--ray", "--base", tiny_base_dir, *HARVEST)
    assert code == 1 and err.strip() == "error: --ray needs Ray: pip install 'lora-registry[ray]'"
    code, _, err = cli("harvest", "--task", "gcd", "--ray", "--base", tiny_base_dir)
    assert code == 1 and err.strip() == "error: --ray goes with --zoo"


def test_a_gpu_per_task_where_the_cluster_has_gpus():
    from harvest.distributed import task_resources

    assert task_resources({"CPU": 16.0, "GPU": 4.0}) == {"num_gpus": 1}
    assert task_resources({"CPU": 16.0, "GPU": 4.0}, device="cpu") == {"num_cpus": 1}
    assert task_resources({"CPU": 2.0}) == {"num_cpus": 1}
