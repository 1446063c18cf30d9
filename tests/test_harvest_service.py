"""`registry harvest` / `registry eval` on the tiny llama: checkpoints stored with prompts, resume, bad input."""

from __future__ import annotations

import json
import time

import pytest


def write_task(path, n=40):
    rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path.with_name(path.name + ".meta.json").write_text(json.dumps(
        {"name": "doubling", "description": "Double a number.", "metric": "numeric"}))
    return path


def state(home):
    from registry.store import Registry

    with Registry.open(home) as reg:
        return [a.ref for a in reg.list_adapters(include_removed=True)], sorted(reg.blobs.all_digests())


HARVEST = ["--steps", "6", "--keep", "3", "--batch-size", "4", "--rank", "4", "--targets", "q_proj,v_proj"]


def test_harvest_user_task_stores_checkpoints(cli, tiny_base_dir, tmp_path, registry_home, database_url):
    task = write_task(tmp_path / "doubling.jsonl")
    code, out, err = cli("harvest", "--task", task, "--base", tiny_base_dir, *HARVEST, "--json")
    assert code == 0, err
    summary = json.loads(out)[0]
    assert summary["task"] == "doubling" and len(summary["refs"]) == 3 and not summary["skipped"]
    from registry.store import Registry

    with Registry.open(registry_home) as reg:
        adapters = reg.list_adapters(kind="harvested", task="doubling")
        assert [a.version for a in adapters] == [1, 2, 3]
        assert sorted(a.recipe["step"] for a in adapters) == [a.recipe["step"] for a in adapters]
        assert all(a.rank == 4 and a.target_modules == ["q_proj", "v_proj"] for a in adapters)
        assert len(reg.prompts("doubling@1")) == 24 and reg.prompt_embeddings("doubling@1").shape == (24, 384)
        assert reg.resolve("doubling@final").ref == "doubling@3"
        assert reg.search("What is 7 plus 7?", k=1)[0].adapter.task == "doubling"
    # Rerunning the same harvest is a no-op that reports the stored checkpoints.
    code, out, _ = cli("harvest", "--task", task, "--base", tiny_base_dir, *HARVEST, "--json")
    assert json.loads(out)[0]["skipped"] and state(registry_home)[0] == ["doubling@1", "doubling@2", "doubling@3"]
    code, out, err = cli("eval", "--task", task, "--adapter", "doubling@final", "--limit", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == 4
    with Registry.open(registry_home) as reg:
        assert "eval/doubling/numeric" in reg.resolve("doubling@3").metrics


def test_interrupted_harvest_resumes(tiny_base_dir, tmp_path, registry_home, database_url):
    from harvest.service import harvest_task, resolve_task
    from harvest.train import HarvestConfig
    from registry.store import Registry

    task = resolve_task(str(write_task(tmp_path / "doubling.jsonl")))
    config = HarvestConfig(steps=8, n_checkpoints=3, batch_size=4, rank=4, target_modules=("q_proj", "v_proj"),
                           save_every=2)

    def crash(step, loss):
        if step == 5:
            time.sleep(1.5)  # time spent before the crash must count in harvest_seconds
        if step == 7:
            raise KeyboardInterrupt

    with Registry.open(registry_home) as reg:
        with pytest.raises(KeyboardInterrupt):
            harvest_task(reg, task, base=str(tiny_base_dir), config=config, on_step=crash)
        partial = [a.recipe["step"] for a in reg.list_adapters(task="doubling")]
        assert partial and len(partial) < 3
        summary = harvest_task(reg, task, base=str(tiny_base_dir), config=config)
        steps = [a.recipe["step"] for a in reg.list_adapters(task="doubling")]
        assert len(steps) == 3 == len(set(steps)) and summary.refs[-1] == "doubling@3"
        assert reg.resolve("doubling@final").metrics["harvest_seconds"] >= 1.5 <= summary.seconds


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "rank must be a positive integer"),
    (["--targets", "q_proj,nonexistent_proj"], "nonexistent_proj"),
    (["--base", "NOT_A_MODEL"], "NOT_A_MODEL"),
])
def test_bad_harvest_settings_write_nothing(args, message, cli, tiny_base_dir, tmp_path, registry_home):
    task = write_task(tmp_path / "doubling.jsonl")
    base = [] if "--base" in args else ["--base", tiny_base_dir]
    code, _, err = cli("harvest", "--task", task, *base, "--steps", "4", "--keep", "2", "--batch-size", "4", *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert state(registry_home) == ([], [])


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "a"}\n', "answer"),
    (b"\n\n  \n", "empty"),
    (b'{"prompt": "caf\xe9", "answer": "x"}\n', "UTF-8"),
])
def test_bad_task_files_write_nothing(content, message, cli, tiny_base_dir, tmp_path, registry_home):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    code, _, err = cli("harvest", "--task", path, "--base", tiny_base_dir, "--steps", "4", "--keep", "2")
    assert code == 1 and message.lower() in err.lower() and len(err.strip().splitlines()) == 1, err
    assert state(registry_home) == ([], [])


def test_unknown_metric_is_refused(cli, tiny_base_dir, tmp_path, registry_home):
    path = write_task(tmp_path / "t.jsonl")
    path.with_name(path.name + ".meta.json").write_text(json.dumps({"name": "t", "metric": "bleu"}))
    code, _, err = cli("harvest", "--task", path, "--base", tiny_base_dir, "--steps", "4", "--keep", "2")
    assert code == 1 and "bleu" in err
    assert state(registry_home) == ([], [])
