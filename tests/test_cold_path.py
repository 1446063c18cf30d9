"""The cold command path: what storing needs from a base is cached by config.json's sha256 (and gives
exactly what transformers gives), the schema check skips Alembic when the database is at head (and
still upgrades one that is behind), and a fresh `registry add` / `registry generate` process imports
neither transformers, sentence-transformers, peft nor Alembic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from registry import base_models, db

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "sentence_transformers", "peft", "alembic")


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    """A private model cache, and no record remembered by this process."""
    folder = tmp_path / "models"
    monkeypatch.setenv("REGISTRY_MODELS_DIR", str(folder))
    monkeypatch.setattr(base_models, "_INFO_MEMO", {})
    return folder


# -----------------------------------------------------------------------------
# base info cache


def test_base_info_is_what_transformers_gives(tiny_base_dir, tiny_base, models_dir):
    config = base_models.load_base_config(tiny_base_dir)
    info = base_models.base_info(tiny_base_dir)
    real = {name: (m.out_features, m.in_features) for name, m in tiny_base.named_modules()
            if isinstance(m, torch.nn.Linear)}
    assert info.shapes == real == base_models.linear_module_shapes(config)
    assert info.fields == base_models.architecture_fields(config)
    assert info.fingerprint == base_models.base_fingerprint(config)
    files = list((models_dir / "base-info").glob("*.json"))
    assert len(files) == 1 and not list((models_dir / "base-info").glob(".tmp-*"))


def test_base_info_is_read_back_without_transformers(tiny_base_dir, models_dir, monkeypatch):
    first = base_models.base_info(tiny_base_dir)
    monkeypatch.setattr(base_models, "_INFO_MEMO", {})

    def refuse(*_args, **_kwargs):
        raise AssertionError("the cached record should have been used")

    monkeypatch.setattr(base_models, "load_base_config", refuse)
    monkeypatch.setattr(base_models, "linear_module_shapes", refuse)
    again = base_models.base_info(tiny_base_dir)
    assert (again.shapes, again.fields, again.fingerprint) == (first.shapes, first.fields, first.fingerprint)


def test_a_changed_config_is_not_served_stale(tiny_base_dir, tmp_path, models_dir):
    copy = tmp_path / "base-copy"
    shutil.copytree(tiny_base_dir, copy)
    before = base_models.base_info(copy)
    config = json.loads((copy / "config.json").read_text())
    config["num_hidden_layers"] = 3
    config["intermediate_size"] = 40
    (copy / "config.json").write_text(json.dumps(config))
    after = base_models.base_info(copy)
    assert "model.layers.2.mlp.down_proj" in after.shapes and "model.layers.2.mlp.down_proj" not in before.shapes
    assert after.shapes["model.layers.0.mlp.down_proj"] == (32, 40)
    assert after.shapes == base_models.linear_module_shapes(base_models.load_base_config(copy))
    assert after.fingerprint != before.fingerprint
    assert len(list((models_dir / "base-info").glob("*.json"))) == 2


def test_a_damaged_record_is_rebuilt(tiny_base_dir, models_dir, monkeypatch):
    first = base_models.base_info(tiny_base_dir)
    (record,) = (models_dir / "base-info").glob("*.json")
    data = json.loads(record.read_text())
    data["fields"]["hidden_size"] = 999  # no longer matches its fingerprint
    record.write_text(json.dumps(data))
    monkeypatch.setattr(base_models, "_INFO_MEMO", {})
    assert base_models.base_info(tiny_base_dir).fields == first.fields
    record.write_text("{not json")
    monkeypatch.setattr(base_models, "_INFO_MEMO", {})
    assert base_models.base_info(tiny_base_dir).shapes == first.shapes
    assert json.loads(record.read_text())["fingerprint"] == first.fingerprint


def test_a_non_causal_base_is_still_refused(tmp_path, models_dir):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertModel"]).save_pretrained(bert)
    with pytest.raises(base_models.BaseModelError, match="not a causal language model"):
        base_models.base_info(bert)
    assert not list(models_dir.glob("base-info/*.json"))  # nothing cached for a refused base


# -----------------------------------------------------------------------------
# the schema check


def test_quick_head_is_alembics_head(database_url):
    assert db.quick_head_revision() == db.head_revision(database_url)


def test_database_at_head_skips_alembic(database_url, monkeypatch):
    engine = db.make_engine(database_url)
    db.ensure_schema(engine, database_url)  # empty: migrated by Alembic
    assert db.stored_revisions(engine) == [db.head_revision(database_url)]

    def refuse(*_args, **_kwargs):
        raise AssertionError("Alembic should not run for a database at head")

    monkeypatch.setattr(db, "current_revision", refuse)
    monkeypatch.setattr(db, "upgrade", refuse)
    db.ensure_schema(engine, database_url)
    engine.dispose()


NEXT_REVISION = '''"""add a probe table"""
from alembic import op
import sqlalchemy as sa

revision = "0002_probe"
down_revision = "0001_initial_schema"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("cold_path_probe", sa.Column("id", sa.Integer, primary_key=True))


def downgrade():
    op.drop_table("cold_path_probe")
'''


def test_a_database_behind_head_is_still_upgraded(database_url, tmp_path, monkeypatch):
    from sqlalchemy import inspect

    engine = db.make_engine(database_url)
    db.ensure_schema(engine, database_url)
    assert db.stored_revisions(engine) == ["0001_initial_schema"]
    migrations = tmp_path / "migrations"
    shutil.copytree(db.MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / "0002_probe.py").write_text(NEXT_REVISION)
    monkeypatch.setattr(db, "MIGRATIONS_DIR", migrations)
    assert db.quick_head_revision() == "0002_probe" == db.head_revision(database_url)
    try:
        db.ensure_schema(engine, database_url)
        assert db.stored_revisions(engine) == ["0002_probe"]
        assert "cold_path_probe" in inspect(engine).get_table_names()
    finally:
        if not database_url.startswith("sqlite"):
            db.upgrade(engine, database_url, "0001_initial_schema")  # leave the shared database as found
        engine.dispose()


def test_a_branched_history_is_left_to_alembic(tmp_path, monkeypatch):
    migrations = tmp_path / "migrations"
    shutil.copytree(db.MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("0002_a", "0002_b"):
        (migrations / "versions" / f"{name}.py").write_text(
            NEXT_REVISION.replace('"0002_probe"', f'"{name}"'))
    monkeypatch.setattr(db, "MIGRATIONS_DIR", migrations)
    assert db.quick_head_revision() is None


# -----------------------------------------------------------------------------
# what a fresh command process imports

PROBE = """
import json, sys
sys.argv = ["registry"] + json.loads(sys.argv[1])
from cli.main import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
sys.stderr.write("\\nPROBE " + json.dumps({{"code": code, "heavy": heavy}}) + "\\n")
"""


def run_probe(args: list[str], home: Path, models_dir: Path) -> dict:
    env = dict(os.environ, REGISTRY_HOME=str(home), REGISTRY_MODELS_DIR=str(models_dir), OMP_NUM_THREADS="1")
    env.pop("REGISTRY_DATABASE_URL", None)
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=set(HEAVY)), json.dumps([str(a) for a in args])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = [row for row in done.stderr.splitlines() if row.startswith("PROBE ")]
    assert line, done.stderr[-2000:]
    result = json.loads(line[-1][len("PROBE "):])
    assert result["code"] in (0, None), done.stderr[-2000:]
    return result


def test_cold_add_and_generate_import_nothing_heavy(tiny_adapter_factory, tmp_path, models_dir):
    from generator.service import train_generator_from_registry
    from registry.store import Registry
    from safetensors.torch import load_file

    home = tmp_path / "cold-home"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 plus 3?\nReverse the word cat.\nSort these letters: c a b.\nWhat is 4 plus 4?\n")
    with Registry.open(home) as reg:  # the first add builds the base record with transformers (this process)
        for seed, task in enumerate(("add", "reverse")):
            directory = tiny_adapter_factory(f"{task}-{seed}", seed=seed)
            config = json.loads((directory / "adapter_config.json").read_text())
            weights = load_file(str(directory / "adapter_model.safetensors"))
            for step in range(2):
                noisy = {k: v + 0.002 * (step + 1) * torch.ones_like(v) for k, v in weights.items()}
                reg.add_weights(f"{task}-ckpt", noisy, config, kind="harvested", task=task,
                                prompts=[f"{task} example {step}", f"another {task} prompt {step}"])
        train_generator_from_registry(reg, steps=2, batch_size=2, device="cpu", n_prompts=4, prompt_tokens=8,
                                      n_layers=2, hidden_tokens=8, kernel=3)

    added = run_probe(["add", tiny_adapter_factory("fresh", seed=7), "--name", "fresh", "--prompts", prompts,
                       "--json"], home, models_dir)
    assert added["heavy"] == []
    generated = run_probe(["generate", "--prompts", prompts, "--name", "cold-gen", "--precision", "fp32",
                           "--device", "cpu", "--json"], home, models_dir)
    assert generated["heavy"] == []
    with Registry.open(home) as reg:
        assert reg.resolve("cold-gen").kind == "generated" and reg.resolve("fresh").kind == "imported"
        assert {hit.adapter.name for hit in reg.search("What is 2 plus 3?", k=10)} >= {"fresh", "cold-gen"}
