"""Two `registry serve` replicas (real processes) on one PostgreSQL and one S3 bucket
(benchmarks/bench_replicas.py, small): adds made elsewhere and aliases moved through replica A are
seen by replica B, B's readers never get a wrong or failed answer, and B outlives A's SIGKILL."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import empty_postgres

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_replicas_share_one_database_and_bucket(s3_endpoint, tmp_path, monkeypatch):
    from bench_replicas import run

    url = empty_postgres()
    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)  # run() sets them too; monkeypatch restores them after the test
    result = run(url, s3_endpoint, adds=6, readers=2, workdir=tmp_path)
    print(result)
    assert result["errors"] == 0, result["problems"]
    assert result["not_seen_on_b"] == []
    assert result["reads_on_b"] > 0 and result["reads_on_b_after_a_was_killed"] > 0
    assert result["replica_a_exit"] == -9
