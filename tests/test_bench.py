"""`registry bench` v2 end to end on the tiny llama: two families, both protocols, every method."""

from __future__ import annotations

import json

import pytest

TINY_CVAE = {"positions": 16, "flat_channels": 4, "latent_dim": 8, "cond_embed": 8, "device": "cpu"}
TINY_SFT = {"n_prompts": 4, "prompt_tokens": 8, "n_layers": 2, "hidden_tokens": 8, "items_per_task": 2, "device": "cpu"}
FAMILIES = {"arithmetic": ("add_sub", "chain_sum", "plus_words"), "counting": ("letter_count", "word_count", "digit_count")}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def bench_registry(request, tmp_path_factory, tiny_base_dir):
    """(home, database URL) of a registry holding the tiny harvests of FAMILIES, on each database."""
    from conftest import empty_postgres
    from harvest.service import harvest_task, resolve_task
    from harvest.train import HarvestConfig
    from registry.paths import database_url
    from registry.store import Registry

    home = tmp_path_factory.mktemp("bench-home")
    url = database_url(home) if request.param == "sqlite" else empty_postgres()
    config = HarvestConfig(steps=3, n_checkpoints=2, batch_size=4, rank=4, target_modules=("q_proj", "v_proj"))
    with Registry.open(home, url) as reg:
        for names in FAMILIES.values():
            for name in names:
                harvest_task(reg, resolve_task(name), base=str(tiny_base_dir), config=config)
    return home, url


@pytest.fixture
def harvested(bench_registry, monkeypatch):
    """The bench registry's home, with ``$REGISTRY_DATABASE_URL`` naming its database for the test."""
    home, url = bench_registry
    monkeypatch.setenv("REGISTRY_DATABASE_URL", url)
    return home


def _settings(**changes):
    from evaluation.compare import BenchSettings

    settings = BenchSettings(variants=2, families=1, members_per_family=2, limit=3, k=2, generator_steps=2,
                             cvae_steps=2, cvae_options=TINY_CVAE, sft_steps=2, sft_options=TINY_SFT, best_other_max=3, training_mean_max=2, n_prompts=8,
                             generator_batch_size=2)
    for key, value in changes.items():
        setattr(settings, key, value)
    return settings


def test_bench_v2_both_protocols_every_method_and_resume(harvested, tmp_path):
    from evaluation.compare import ALL_METHODS, run_bench
    from registry.store import Registry

    out = tmp_path / "report"
    with Registry.open(harvested) as reg:
        paths = run_bench(reg, _settings(methods=list(ALL_METHODS)), out, on_status=lambda s: None)
        report = json.loads(paths["json"].read_text())
        splits = {s["protocol"]: s for s in report["settings"]["splits"]}
        assert set(splits) == {"variants", "families"}
        assert splits["variants"]["held_out"] == ["chain_sum", "letter_count"]  # the middle member of each family
        assert splits["families"]["held_out_families"] == ["counting"]
        assert splits["families"]["held_out"] == ["digit_count", "word_count"]  # 2 of 3 members, spread
        assert set(splits["families"]["training"]) == set(FAMILIES["arithmetic"])
        rows = {(r["protocol"], r["task"], r["method"]): r for r in report["rows"]}
        for protocol, split in splits.items():
            for task in split["held_out"]:
                for method in ALL_METHODS:
                    row = rows[(protocol, task, method)]
                    assert row["n"] == 3, (protocol, task, method)
        # the retrieval pool and best_other only use the split's training tasks
        for (protocol, task, method), row in rows.items():
            training = set(splits[protocol]["training"])
            if method == "mixture":
                assert {p["ref"].split("@")[0] for p in row["extra"]["parents"]} <= training
            if method == "best_other":
                assert {ref.split("@")[0] for ref in row["extra"]["candidates"]} <= training
            if method == "selection_multitask":  # the selected training adapter plus the split's multitask LoRA
                selected = rows[(protocol, task, "selection")]["extra"]["parents"]
                multitask_ref = rows[(protocol, task, "multitask")]["adapter_ref"]
                assert row["extra"]["parents"] == [*selected, {"ref": multitask_ref, "weight": 1.0}]
            if method == "selection_multitask_gated":  # that composition, or the multitask LoRA alone if surer
                gate = reg.resolve(row["adapter_ref"]).recipe["gate"]
                multitask_ref = rows[(protocol, task, "multitask")]["adapter_ref"]
                kept = (rows[(protocol, task, "selection_multitask")]["extra"]["parents"]
                        if gate["kept"] == "composition" else [{"ref": multitask_ref, "weight": 1.0}])
                assert row["extra"]["parents"] == kept and (gate["candidate"] < gate["fallback"]) == (gate["kept"] == "composition")
            if method == "dnd_other":
                assert row["extra"]["condition_task"] in splits[protocol]["held_out"] and row["extra"]["condition_task"] != task
        multitask = reg.resolve(rows[("families", "word_count", "multitask")]["adapter_ref"])
        assert multitask.kind == "harvested" and "multitask" in multitask.tags
        assert multitask.recipe["multitask_tasks"] == sorted(splits["families"]["training"])
        for protocol in splits:
            generator = reg.resolve_artifact(rows[(protocol, splits[protocol]["held_out"][0], "cvae")]["extra"]["generator"])
            assert not set(generator.meta["tasks"]) & set(splits[protocol]["held_out"])
        assert set(report["splits"]["variants"]["collapse"]) == {"dnd", "cvae", "sft"}
        sft = reg.resolve_artifact(rows[("variants", "chain_sum", "sft")]["extra"]["generator"])
        assert sft.artifact_type == "generator-dnd-sft" and sft.meta["anchor"] == rows[("variants", "chain_sum", "multitask")]["adapter_ref"]
        assert not set(sft.meta["tasks"]) & set(splits["variants"]["held_out"])
        text = paths["markdown"].read_text()
        assert "## Split `variants`" in text and "## Split `families`" in text and "minus multitask" in text
        assert "bench-dnd-variants@" in text and "multitask LoRA multitask-" in text
        from evaluation.compare import harvested_tasks

        assert harvested_tasks(reg) == sorted(n for names in FAMILIES.values() for n in names)  # multitask is no task

        # A rerun reuses every row (nothing new stored); a changed setting makes new rows.
        before = [a.ref for a in reg.list_adapters()]
        run_bench(reg, _settings(methods=list(ALL_METHODS)), out, on_status=lambda s: None)
        assert [a.ref for a in reg.list_adapters()] == before
        n_rows = len(list((out / "rows").glob("*.json")))
        run_bench(reg, _settings(methods=["base"], limit=2), out, on_status=lambda s: None)
        assert len(list((out / "rows").glob("*.json"))) == n_rows + 4


def test_bench_cvae_with_the_sft_objective(harvested, tmp_path):
    """`--cvae-objective sft`: the split's CVAE is trained by reconstruction, then through the base
    model on the training tasks only, and its rows and controls come from that fine-tuned CVAE."""
    from evaluation.compare import run_bench
    from registry.store import Registry

    with Registry.open(harvested) as reg:
        settings = _settings(methods=["cvae", "cvae_other"], protocols=["variants"], cvae_objective="sft")
        paths = run_bench(reg, settings, tmp_path / "report", on_status=lambda s: None)
        report = json.loads(paths["json"].read_text())
        held_out = report["settings"]["splits"][0]["held_out"]
        rows = [r for r in report["rows"] if r["method"] == "cvae"]
        assert len(rows) == len(held_out) and all(r["n"] == 3 for r in rows)
        generator = reg.resolve_artifact(rows[0]["extra"]["generator"])
        assert generator.meta["objective"] == "sft" and generator.meta["sft"]["steps"] == settings.sft_steps
        assert not set(generator.meta["sft_tasks"]) & set(held_out)
        assert reg.resolve_artifact(generator.meta["fine_tuned_from"]).meta["steps"] == settings.cvae_steps
        # a second generator seed trains a new CVAE and leaves the rest of the split as it was
        seeded = run_bench(reg, _settings(methods=["cvae"], protocols=["variants"], cvae_objective="sft", generator_seed=1),
                           tmp_path / "report", on_status=lambda s: None)
        rows_1 = [r for r in json.loads(seeded["json"].read_text())["rows"] if r["method"] == "cvae"]
        assert {r["extra"]["generator"] for r in rows_1}.isdisjoint({r["extra"]["generator"] for r in rows})
        assert reg.resolve_artifact(rows_1[0]["extra"]["generator"]).meta["sft"]["seed"] == 1
        # anchored on the split's multitask LoRA: the generator starts from the multitask row's adapter
        anchored = run_bench(reg, _settings(methods=["multitask", "cvae"], protocols=["variants"], cvae_objective="sft",
                                            cvae_anchor="multitask"), tmp_path / "report", on_status=lambda s: None)
        report = json.loads(anchored["json"].read_text())
        rows_a = [r for r in report["rows"] if r["method"] == "cvae"]
        meta = reg.resolve_artifact(rows_a[0]["extra"]["generator"]).meta
        multitask = {r["adapter_ref"] for r in report["rows"] if r["method"] == "multitask"}
        assert meta["anchor"] in multitask and meta["parametrisation"].startswith("anchor + gate")


def test_bench_user_task_file_held_out_without_harvest(harvested, tmp_path, cli, monkeypatch):
    from harvest.zoo import export_task

    path = export_task("digit_count", tmp_path / "mine.jsonl")
    meta = json.loads((tmp_path / "mine.jsonl.meta.json").read_text())
    (tmp_path / "mine.jsonl.meta.json").write_text(json.dumps(meta | {"name": "my_digits"}))
    out = tmp_path / "r"
    code, stdout, err = cli("bench", "--home", harvested, "--held-out", str(path), "--methods", "base,oracle,selection",
                            "--limit", "2", "--n-prompts", "8", "-k", "2", "--out", out, "--json")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["oracle"]["n"] == 0 and rows["oracle"]["extra"]["missing"] == "my_digits has no harvest"
    assert rows["selection"]["n"] == 2 and "my_digits has no harvest" in (out / "report.md").read_text()


def test_bench_controls_borrow_prompts_from_held_out_task_files(harvested, tmp_path):
    """Two held-out task files (names no zoo lookup knows): the "another task's prompts" control
    takes the other file's prompts, from the loaded task, not from a zoo name."""
    from evaluation.compare import run_bench
    from harvest.zoo import export_task
    from registry.store import Registry

    files = []
    for zoo_name, name in (("digit_count", "my_digits"), ("chain_sum", "my_chains")):
        path = export_task(zoo_name, tmp_path / f"{name}.jsonl")
        meta_path = tmp_path / f"{name}.jsonl.meta.json"
        meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"name": name}))
        files.append(str(path))
    with Registry.open(harvested) as reg:
        paths = run_bench(reg, _settings(held_out=files, methods=["dnd", "dnd_other"]), tmp_path / "r",
                          on_status=lambda s: None)
    rows = json.loads(paths["json"].read_text())["rows"]
    donors = {r["task"]: r["extra"]["condition_task"] for r in rows if r["method"] == "dnd_other"}
    assert donors == {"my_digits": "my_chains", "my_chains": "my_digits"}


@pytest.mark.parametrize("args, message", [
    (["--held-out", "nope"], "unknown task 'nope'"),
    (["--methods", "base,magic"], "unknown bench method(s): magic"),
    (["--protocols", "weird"], "unknown protocol(s): weird"),
    (["--tasks", "add_sub,gcd"], "tasks without a finished harvest: gcd"),
    (["--sft-anchor-k", "0"], "--sft-anchor-k must be >= 1"),
    (["--sft-contrast", "-1"], "--sft-contrast must be >= 0"),
    (["--sft-anchor-train", "own"], "--sft-anchor-train takes one of others, own, with --sft-anchor-k"),
    (["--sft-anchor-k", "1", "--sft-anchor-train", "self"], "--sft-anchor-train takes one of others, own"),
    (["--sft-head", "wide"], "--sft-head must be one of residual, gated, routed"),
    (["--sft-tasks-per-step", "0"], "--sft-tasks-per-step must be >= 1"),
    (["--sft-items-per-task", "0"], "--sft-items-per-task must be >= 1"),
    (["--cvae-objective", "both"], "--cvae-objective must be recon or sft, not 'both'"),
    (["--sft-head", "gated", "--sft-anchor-k", "2"], "--sft-head gated starts from the multitask LoRA"),
    (["--sft-under-multitask"], "--sft-under-multitask goes with --sft-anchor-k"),
    (["--sft-gate"], "--sft-gate falls back to the adapter under the generator: give --sft-under-multitask"),
])
def test_bench_bad_input_is_one_line_and_writes_nothing(harvested, tmp_path, cli, args, message):
    out = tmp_path / "r"
    code, _, err = cli("bench", "--home", harvested, *args, "--out", out)
    assert code != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (out / "report.json").exists()


def test_bench_killed_while_writing_a_row_leaves_no_torn_row(harvested, tmp_path):
    """SIGKILL between a row's temp file and its rename: no row file is half-written, and the rerun
    completes the report (and does not count the killed row as done)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "r"
    args = [sys.executable, "-c", "from cli.main import main; main()", "bench", "--home", str(harvested),
            "--held-out", "add_sub", "--methods", "base", "--limit", "2", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "REGISTRY_FAULT"}
    killed = subprocess.run(args, cwd=root, env=env | {"REGISTRY_FAULT": "atomic_write.before_rename"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list((out / "rows").glob(".tmp-*")) and not list((out / "rows").glob("*.json"))
    again = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    assert [r["method"] for r in rows] == ["base"] and len(rows[0]["scores"]) == 2
    assert json.loads((out / "report.json").read_text())["rows"][0]["method"] == "base"


def test_a_task_harvested_while_the_bench_runs_stays_out_of_its_pool(reg, tiny_base_dir, tiny_adapter_factory):
    """The split's pool is its training tasks; what is outside it is read at each retrieval, so an
    adapter another process harvests mid-run is never retrieved (it leaked in once: README)."""
    from evaluation.compare import _SplitContext
    from evaluation.protocols import custom_split

    reg.add_directory(tiny_adapter_factory("a"), name="add_sub", kind="harvested", task="add_sub")
    context = _SplitContext(custom_split(["add_sub", "chain_sum"], ["chain_sum"]), "tiny", {"add_sub": "add_sub@1"})
    assert context.outside_pool(reg) == []
    reg.add_directory(tiny_adapter_factory("b", seed=1), name="plus_words", kind="harvested", task="plus_words")
    assert context.outside_pool(reg) == ["plus_words"]


def test_held_out_candidates_come_from_stored_evaluations(reg, tiny_base_dir, tiny_adapter_factory):
    """With stored base and final-adapter evaluations, only tasks whose harvest gains min_gain may be held out;
    a task never evaluated counts as not learnable; a bench with no evaluation at all may hold out any task."""
    from evaluation.compare import _learnable
    from harvest.service import base_eval_path, resolve_task, stored_gain

    tasks = {n: resolve_task(n) for names in FAMILIES.values() for n in names}
    for name in tasks:
        reg.add_directory(tiny_adapter_factory(name), name=name, kind="harvested", base=str(tiny_base_dir), task=name)
    assert _learnable(reg, tasks, list(tasks), 0.15)[0] is None
    for name, (base, final) in {"add_sub": (0.1, 0.6), "chain_sum": (0.2, 0.25), "word_count": (0.0, 0.5)}.items():
        path = base_eval_path(reg, name, str(tiny_base_dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"accuracy": base}))
        reg.update_metrics(f"{name}@1", {f"eval/{name}/{tasks[name].metric}": final})
    assert stored_gain(reg, tasks["add_sub"]) == pytest.approx(0.5)
    assert stored_gain(reg, tasks["plus_words"]) is None
    learnable, notes = _learnable(reg, tasks, list(tasks), 0.15)
    assert learnable == {"add_sub", "word_count"}
    assert "2 of 6" in notes[0] and "3 never evaluated" in notes[0]
