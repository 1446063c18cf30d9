"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): whatever the schema allows a
client to send, the server answers without a 5xx, with a JSON body where JSON is declared and a
body that matches the schema for every status the schema documents.

The app is built as `registry serve` builds it (both backends), on a seeded tiny registry; the
fuzzer sends the write token, so writes (alias moves, generate, compose) are exercised too."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

TOKEN = "fuzz-token"
STATUSES: list = []  # (operation, status) of every call: test_the_fuzzer_ran checks it ran at all


@pytest.fixture
def database_url(registry_home, monkeypatch) -> str:
    """SQLite only: the fuzzer tests the HTTP layer (the storage tests cover both databases)."""
    registry_home.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{registry_home / 'registry.db'}"
    monkeypatch.setenv("REGISTRY_DATABASE_URL", url)
    return url


@pytest.fixture
def api_schema(reg, tiny_adapter_factory):
    from cli.serve_commands import backends
    from registry.http.app import create_app

    reg.add_directory(tiny_adapter_factory("m1", seed=1), name="math", task="add",
                      prompts=["What is 2 plus 3?", "Add 4 and 5."])
    reg.add_directory(tiny_adapter_factory("m2", seed=2), name="math", task="add", prompts=["Sum 7 and 1."])
    reg.set_alias("math@1", "prod")
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(reg, token=TOKEN, **backends()))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_no_request_the_schema_allows_gets_a_5xx(case):
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    STATUSES.append((case.operation.label, response.status_code))
    case.validate_response(response, checks=[not_a_server_error, content_type_conformance,
                                             response_schema_conformance])


def test_the_fuzzer_ran_every_operation():
    """Runs after the fuzz test in this module: it called every operation, and more than once."""
    from collections import Counter

    if not STATUSES:
        pytest.skip("run together with test_no_request_the_schema_allows_gets_a_5xx")
    per_operation = Counter(label for label, _ in STATUSES)
    print(sorted(Counter(STATUSES).items()))
    assert len(per_operation) >= 9 and min(per_operation.values()) >= 2
