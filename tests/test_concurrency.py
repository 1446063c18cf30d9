"""Concurrent writers in real processes, on SQLite and PostgreSQL (issue 17): the probes of
``benchmarks/probe_races.py`` with small counts. Each asserts nothing was lost or left broken."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import probe_races  # noqa: E402


@pytest.fixture
def probe_env(tmp_path, database_url, monkeypatch):
    """(work dir, backend, PostgreSQL URL or None, tiny base folder) with the base's shapes cached."""
    from registry import base_models

    monkeypatch.setenv("REGISTRY_MODELS_DIR", str(tmp_path / "models"))
    base = probe_races.make_base(tmp_path / "tiny-base")
    base_models.base_info(base)
    backend = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    work = tmp_path / "work"
    work.mkdir()
    return work, backend, (None if backend == "sqlite" else database_url), base


def assert_intact(result: dict, expected_rows: int) -> None:
    assert result["lost"] == 0
    assert result["bad_versions"] == 0
    assert result["broken_blobs"] == 0
    assert result["rows"] == expected_rows
    assert result["index_ids"] == result["live_ids"] == expected_rows  # the index file lost no id
    assert result["index_stale"] == 0
    assert result["doctor_ok"], result["doctor_problems"]


def test_writers_on_one_name(probe_env):
    """4 processes x 6 adds to one name: every add acknowledged, stored, indexed, versions 1..24."""
    work, backend, url, base = probe_env
    result = probe_races.probe_writers(work, backend, url, base, writers=4, adds=6, mode="hot")
    assert result["failed"] == 0, result["failures"]
    assert_intact(result, 24)


def test_writers_with_alias_metrics_and_rm(probe_env):
    """Mixed names, each add followed by alias + update_metrics, every 10th removed again."""
    work, backend, url, base = probe_env
    result = probe_races.probe_writers(work, backend, url, base, writers=3, adds=10, mode="mixed")
    assert result["failed"] == 0, result["failures"]
    assert_intact(result, 27)


def test_processes_opening_a_new_registry(probe_env):
    """4 processes open a registry that does not exist yet at the same instant: one migrates."""
    work, backend, url, base = probe_env
    result = probe_races.probe_open(work, backend, url, base, writers=4)
    assert result["crashed_writers"] == 0, result["failures"]
    assert result["failed"] == 0, result["failures"]
    assert_intact(result, 4)


def test_doctor_repair_while_adding(probe_env):
    """`doctor --repair` in a loop beside a writer never deletes the blob of an add in flight."""
    work, backend, url, base = probe_env
    result = probe_races.probe_doctor(work, backend, url, base, adds=15, repairs=3)
    assert result["repair_runs"] >= 3
    assert result["failed"] == 0
    assert_intact(result, 15)
