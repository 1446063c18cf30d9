"""`registry bench` end to end on the tiny llama: harvest three zoo tasks, hold one out, compare."""

from __future__ import annotations

import json

import pytest


def test_bench_end_to_end_and_resume(cli, tiny_base_dir, tmp_path, registry_home):
    from harvest.service import harvest_task, resolve_task
    from harvest.train import HarvestConfig
    from registry.store import Registry

    config = HarvestConfig(steps=3, n_checkpoints=2, batch_size=4, rank=4, target_modules=("q_proj", "v_proj"))
    with Registry.open(registry_home) as reg:
        for name in ("add_sub", "letter_count", "larger_choice"):
            harvest_task(reg, resolve_task(name), base=str(tiny_base_dir), config=config)
    tiny_cvae = ["train-generator", "--arch", "cvae", "--positions", "16", "--flat-channels", "4", "--latent-dim", "8",
                 "--cond-embed", "8", "--device", "cpu", "--steps", "2"]
    code, _, err = cli(*tiny_cvae, "--exclude-tasks", "larger_choice")
    assert code == 0, err
    code, _, err = cli(*tiny_cvae, "--name", "cvae-all")  # newer, but it saw the held-out task: not used
    assert code == 0, err
    out = tmp_path / "report"
    args = ["bench", "--held-out", "larger_choice", "--methods", "base,oracle,training_mean,mixture,fusion,dnd,cvae",
            "--limit", "3", "--generator-steps", "2", "-k", "2", "--out", out, "--json"]
    code, stdout, err = cli(*args)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    methods = {row["method"]: row for row in report["rows"]}
    assert set(methods) == {"base", "oracle", "training_mean", "mixture", "fusion", "dnd", "cvae"}
    assert all(row["n"] == 3 and 0 <= row["accuracy"] <= 1 for row in methods.values())
    assert methods["training_mean"]["extra"]["adapters"] == ["add_sub@2", "letter_count@2"]
    assert methods["cvae"]["extra"]["generator"] == "cvae@1"  # the CVAE that never saw larger_choice
    assert "CVAE generator cvae@1: the newest CVAE trained on none of the held-out tasks" in report["notes"]
    assert methods["mixture"]["seconds_to_adapter"] > 0 and methods["dnd"]["adapter_ref"].startswith("bench-larger_choice-dnd@")
    with Registry.open(registry_home) as reg:
        composed = reg.resolve(methods["mixture"]["adapter_ref"])
        assert composed.kind == "composed" and all(not p["ref"].startswith("larger_choice") for p in composed.parents)
        generator = reg.latest_artifact("generator-dnd")
        assert "larger_choice" not in generator.meta["tasks"]
    assert (out / "accuracy.png").exists() and (out / "time_vs_accuracy.png").exists()
    # A rerun resumes from the cached rows: nothing new is stored, also when pinned to the same zoo
    # while another task's harvest is only half done.
    with Registry.open(registry_home) as reg:
        with pytest.raises(KeyboardInterrupt):
            harvest_task(reg, resolve_task("gcd"), base=str(tiny_base_dir), config=config, on_step=_stop_at(2))
        assert [a.task for a in reg.list_adapters(task="gcd")] == ["gcd"]  # one checkpoint, no `final`
        before = [a.ref for a in reg.list_adapters()]
        artifacts = [a.ref for a in reg.list_artifacts("generator-dnd")]
    assert cli(*args)[0] == 0
    assert cli(*args, "--tasks", "add_sub,larger_choice,letter_count")[0] == 0
    with Registry.open(registry_home) as reg:
        assert [a.ref for a in reg.list_adapters()] == before
        assert [a.ref for a in reg.list_artifacts("generator-dnd")] == artifacts
    code, _, err = cli(*args, "--tasks", "add_sub,larger_choice,gcd")
    assert code == 1 and err.strip() == "error: tasks without a finished harvest: gcd", err


def _stop_at(step):
    def on_step(current, loss):
        if current == step:
            raise KeyboardInterrupt
    return on_step


def test_bench_cvae_saw_none_of_the_held_out_tasks():
    from types import SimpleNamespace

    from evaluation.compare import _generator_without

    artifacts = [SimpleNamespace(ref="cvae@1", meta={"tasks": ["a", "b"]}),
                 SimpleNamespace(ref="cvae@2", meta={"tasks": ["a", "held2"]})]  # newer, saw another held-out task
    reg = SimpleNamespace(list_artifacts=lambda artifact_type: artifacts)
    assert _generator_without(reg, "generator-cvae", ["held1", "held2"]) == "cvae@1"
    assert _generator_without(reg, "generator-cvae", ["held1"]) == "cvae@2"
    assert _generator_without(reg, "generator-cvae", ["a"]) is None
