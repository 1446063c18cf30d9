"""`registry serve`: reads, files with ETag/conditional GET/Range, archives, token-guarded writes, and
abuse (path traversal, unknown files and refs, oversized and malformed bodies, bad tokens). Every
refusal must be a 4xx with a JSON ``{"error": ...}``, write nothing, and leave the server serving."""

from __future__ import annotations

import hashlib
import http.client
import json
import sys
from pathlib import Path

import pytest

TOKEN = "s3cret-token"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def seeded(reg, tiny_adapter_factory):
    """math@1 (alias prod), math@2, and mix@1 composed from both."""
    v1 = reg.add_directory(tiny_adapter_factory("m1", seed=1), name="math", task="add",
                           prompts=["What is 2 plus 3?", "Add 4 and 5."])
    v2 = reg.add_directory(tiny_adapter_factory("m2", seed=2), name="math", task="add")
    reg.set_alias("math@1", "prod")
    mix = reg.add_directory(tiny_adapter_factory("mix", seed=3), name="mix", kind="composed",
                            parents=[("math@1", 0.5), ("math@2", 0.5)])
    return {"v1": v1, "v2": v2, "mix": mix}


@pytest.fixture
def client(reg, seeded):
    """The app as `registry serve` builds it: with the generate and compose backends."""
    from fastapi.testclient import TestClient

    from cli.serve_commands import backends
    from registry.http.app import create_app

    with TestClient(create_app(reg, token=TOKEN, **backends())) as test_client:
        yield test_client


@pytest.fixture
def make_client(reg, seeded):
    """``make_client(**backends)``: a test client of an app built with exactly these backends."""
    from fastapi.testclient import TestClient

    from registry.http.app import create_app

    clients = []

    def make(**backends):
        clients.append(TestClient(create_app(reg, token=TOKEN, **backends)).__enter__())
        return clients[-1]

    yield make
    for test_client in clients:
        test_client.__exit__(None, None, None)


@pytest.fixture
def live(reg, seeded):
    """A real uvicorn on a free loopback port: raw requests are sent exactly as written."""
    from registry.http.app import create_app
    from server_helpers import ServerThread

    with ServerThread(create_app(reg, token=TOKEN)) as url:
        yield url


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request with the path sent byte for byte (no client-side normalisation of '..')."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        headers = dict(headers or {})
        if body is not None and "Transfer-Encoding" not in headers:
            headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        if body is not None:
            if headers.get("Transfer-Encoding") == "chunked":
                for offset in range(0, len(body), 65536):
                    part = body[offset:offset + 65536]
                    connection.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                connection.send(b"0\r\n\r\n")
            else:
                connection.send(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def registry_state(reg) -> tuple:
    """Everything a write could change: adapters, aliases, blobs, cached fetches."""
    adapters = [(a.ref, tuple(a.aliases)) for a in reg.list_adapters(include_removed=True)]
    fetched = sorted(p.name for p in (reg.home / "fetched").glob("*")) if (reg.home / "fetched").exists() else []
    return adapters, sorted(reg.blobs.all_digests()), fetched


def assert_json_error(status: int, body: bytes, expected_status: int | tuple) -> str:
    expected = expected_status if isinstance(expected_status, tuple) else (expected_status,)
    assert status in expected, (status, body[:300])
    payload = json.loads(body)
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"]
    assert "\n" not in payload["error"] and "Traceback" not in payload["error"]  # one line, never a traceback
    return payload["error"]


def assert_still_serving(url: str, seeded) -> None:
    status, headers, body = raw(url, "GET", "/v1/adapters/math@1/files/adapter_model.safetensors")
    assert status == 200 and sha(body) == seeded["v1"].weights_sha256


# --------------------------------------------------------------------------------------------
# Reads
# --------------------------------------------------------------------------------------------


def test_list_show_lineage_and_prompts(client, seeded):
    refs = [a["ref"] for a in client.get("/v1/adapters").json()]
    assert refs == ["math@1", "math@2", "mix@1"]
    assert [a["ref"] for a in client.get("/v1/adapters", params={"name": "math"}).json()] == ["math@1", "math@2"]

    response = client.get("/v1/adapters/math@prod")
    assert response.status_code == 200
    data = response.json()
    assert data["ref"] == "math@1" and data["digest"] == seeded["v1"].digest and data["aliases"] == ["prod"]
    assert response.headers["x-registry-ref"] == "math@1"
    assert response.headers["x-registry-digest"] == seeded["v1"].digest
    assert data["lineage"]["children"] == [{"ref": "mix@1", "weight": 0.5}]
    assert data["files"] == {CONFIG: seeded["v1"].config_sha256, WEIGHTS: seeded["v1"].weights_sha256}

    mix = client.get("/v1/adapters/mix").json()
    assert mix["lineage"]["parents"] == [{"ref": "math@1", "weight": 0.5}, {"ref": "math@2", "weight": 0.5}]
    assert client.get("/v1/adapters/math@prod/prompts").json() == {
        "ref": "math@1", "prompts": ["What is 2 plus 3?", "Add 4 and 5."]}
    by_digest = client.get(f"/v1/adapters/sha256:{seeded['v2'].digest[:16]}")
    assert by_digest.json()["ref"] == "math@2"


def test_search(client):
    response = client.get("/v1/search", params={"q": "What is 7 plus 1?", "k": 2})
    assert response.status_code == 200
    assert response.json()[0]["ref"] == "math@1"  # the only adapter with prompts
    for params in ({"q": "x", "k": 0}, {}):
        response = client.get("/v1/search", params=params)
        assert_json_error(response.status_code, response.content, 422)


def test_files_have_digest_etags_conditional_get_and_ranges(client, seeded, reg):
    v1 = seeded["v1"]
    config = client.get("/v1/adapters/math@1/files/adapter_config.json")
    assert config.status_code == 200 and sha(config.content) == v1.config_sha256
    assert config.headers["etag"] == f'"{v1.config_sha256}"'
    assert json.loads(config.content)["peft_type"] == "LORA"
    weights = client.get("/v1/adapters/math@1/files/adapter_model.safetensors")
    assert weights.status_code == 200 and sha(weights.content) == v1.weights_sha256
    assert weights.headers["etag"] == f'"{v1.weights_sha256}"'
    assert int(weights.headers["content-length"]) == v1.size_bytes == len(weights.content)
    assert weights.content == (reg.fetch("math@1") / WEIGHTS).read_bytes()
    assert "immutable" in weights.headers["cache-control"]
    assert "immutable" in client.get(f"/v1/adapters/sha256:{v1.digest}/files/{WEIGHTS}").headers["cache-control"]
    assert client.get(f"/v1/adapters/math@prod/files/{WEIGHTS}").headers["cache-control"] == "no-cache"

    url = f"/v1/adapters/math@1/files/{WEIGHTS}"
    not_modified = client.get(url, headers={"If-None-Match": f'"{v1.weights_sha256}"'})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert client.get(url, headers={"If-None-Match": '"other", W/"' + v1.weights_sha256 + '"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    size, body = v1.size_bytes, weights.content
    part = client.get(url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == body[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{size}"
    assert client.get(url, headers={"Range": "bytes=100-"}).content == body[100:]
    assert client.get(url, headers={"Range": "bytes=-10"}).content == body[-10:]
    assert client.get(url, headers={"Range": f"bytes=10-{size * 2}"}).content == body[10:]
    resumed = client.get(url, headers={"Range": "bytes=50-", "If-Range": f'"{v1.weights_sha256}"'})
    assert resumed.status_code == 206 and resumed.content == body[50:]
    stale = client.get(url, headers={"Range": "bytes=50-", "If-Range": '"something-else"'})
    assert stale.status_code == 200 and stale.content == body
    multi = client.get(url, headers={"Range": "bytes=0-1,5-6"})
    assert multi.status_code == 200 and multi.content == body  # multi-range: the whole file
    assert client.get(url, headers={"Range": "pages=1-2"}).status_code == 200  # malformed: ignored
    for bad in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        response = client.get(url, headers={"Range": bad})
        assert_json_error(response.status_code, response.content, 416)
        assert response.headers["content-range"] == f"bytes */{size}"

    head = client.head(url)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == size
    config_part = client.get(f"/v1/adapters/math@1/files/{CONFIG}", headers={"Range": "bytes=2-5"})
    assert config_part.status_code == 206 and config_part.content == config.content[2:6]


def test_archive_is_the_peft_directory(client, seeded):
    from server_helpers import read_tar

    response = client.get("/v1/adapters/math@prod/archive")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers["x-registry-digest"] == seeded["v1"].digest
    members = read_tar(response.content)
    assert sha(members[CONFIG]) == seeded["v1"].config_sha256
    assert sha(members[WEIGHTS]) == seeded["v1"].weights_sha256
    again = client.get("/v1/adapters/math@1/archive", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304
    assert client.get("/v1/adapters/math@1/archive").content == response.content  # deterministic bytes


def test_large_files_are_streamed_without_zero_copy(reg, seeded, monkeypatch):
    """uvicorn's own protocol (no zero-copy extension): small slices are read at once, larger ones
    stream in CHUNKs; the bytes and lengths are the same either way."""
    import registry.http.replies as serve_reads
    from registry.http.app import create_app
    from server_helpers import ServerThread, read_tar

    monkeypatch.setattr(serve_reads, "SMALL_BODY", 100)  # everything above 100 bytes takes the streaming path
    monkeypatch.setattr(serve_reads, "CHUNK", 1000)
    v1 = seeded["v1"]
    with ServerThread(create_app(reg, token=TOKEN), zero_copy=False) as live:
        status, headers, body = raw(live, "GET", f"/v1/adapters/math@1/files/{WEIGHTS}")
        assert status == 200 and sha(body) == v1.weights_sha256 and int(headers["content-length"]) == len(body)
        status, headers, body = raw(live, "GET", f"/v1/adapters/math@1/files/{WEIGHTS}",
                                    headers={"Range": "bytes=1500-3999"})
        assert status == 206 and len(body) == 2500 and headers["content-range"].startswith("bytes 1500-3999/")
        status, headers, body = raw(live, "GET", "/v1/adapters/math@1/archive")
        assert status == 200 and int(headers["content-length"]) == len(body)
        assert sha(read_tar(body)[WEIGHTS]) == v1.weights_sha256


def test_alias_headers_let_a_client_pin_the_version_while_the_alias_moves(client, seeded, reg):
    first = client.get(f"/v1/adapters/math@prod/files/{CONFIG}")
    pinned = first.headers["x-registry-digest"]
    assert pinned == seeded["v1"].digest and first.headers["x-registry-ref"] == "math@1"
    reg.set_alias("math@2", "prod")  # the alias moves between the two files
    moved = client.get(f"/v1/adapters/math@prod/files/{WEIGHTS}")
    assert moved.headers["x-registry-digest"] == seeded["v2"].digest  # the client sees the move...
    weights = client.get(f"/v1/adapters/sha256:{pinned}/files/{WEIGHTS}")  # ...and fetches by digest
    assert sha(weights.content) == seeded["v1"].weights_sha256
    assert sha(f"{sha(first.content)}:{sha(weights.content)}".encode()) == pinned  # one consistent version


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/adapters/{ref}/files/{file_name}" in paths and "/v1/compose" in paths


# --------------------------------------------------------------------------------------------
# Abuse: traversal, unknown things, bodies, tokens
# --------------------------------------------------------------------------------------------

TRAVERSALS = [
    ("/v1/adapters/../../etc/passwd", 404),
    ("/v1/adapters/..%2F..%2Fetc%2Fpasswd", 404),
    ("/v1/adapters/%2e%2e", 400),
    ("/v1/adapters/%2E%2E/files/adapter_config.json", 400),
    ("/v1/adapters/%2e%2e%2f%2e%2e%2fregistry.db/files/adapter_config.json", 404),
    ("/v1/adapters/math@1/files/../../registry.db", 404),
    ("/v1/adapters/math@1/files/..%2f..%2fregistry.db", 404),
    ("/v1/adapters/math@1/files/%2e%2e", 404),
    ("/v1/adapters/math@1/files/%2fetc%2fpasswd", 404),
    ("/v1/adapters/%2fetc%2fpasswd/files/adapter_config.json", 404),
    ("/v1/adapters//etc/passwd", 404),
    ("/v1/adapters/math@..%2f..%2fblobs/archive", 404),
    ("/v1/adapters/math@../archive", 400),
    ("/v1/adapters/.hidden/archive", 400),
    ("/v1/adapters/math%00/archive", 400),
    ("/v1/adapters/sha256:..%2f..%2f/archive", 404),
    ("/v1/adapters/sha256:../archive", 400),
    ("/v1/adapters/math@1/files/registry.json", 404),
    ("/v1/adapters/math@1/files/adapter_model.bin", 404),
    ("/v1/adapters/math@1/files/ADAPTER_CONFIG.JSON", 404),
    ("/v1/adapters/math@1/files/", 404),
    ("/v1/adapters/math@1/files", 404),
    ("/v1/adapters/C:%5cWindows%5cwin.ini/archive", 400),
]


@pytest.mark.parametrize(("path", "expected"), TRAVERSALS)
def test_traversal_and_unknown_files_are_refused(live, seeded, reg, path, expected):
    before = registry_state(reg)
    status, headers, body = raw(live, "GET", path)
    assert_json_error(status, body, expected)
    assert headers["content-type"] == "application/json"
    assert b"root:" not in body and b"SQLite" not in body
    assert registry_state(reg) == before
    assert_still_serving(live, seeded)


def test_unknown_refs_and_endpoints_are_json_404s(live, seeded):
    for path, fragment in [("/v1/adapters/nosuch", "no adapter matches nosuch"),
                           ("/v1/adapters/math@7/files/adapter_config.json", "no adapter matches math@7"),
                           ("/v1/adapters/math@staging/archive", "no adapter matches math@staging"),
                           (f"/v1/adapters/sha256:{'0' * 64}", "no adapter matches sha256:"),
                           ("/v2/adapters", "no such endpoint")]:
        status, _, body = raw(live, "GET", path)
        assert fragment in assert_json_error(status, body, 404)
    status, _, body = raw(live, "DELETE", "/v1/adapters/math@1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert_json_error(status, body, 405)
    status, _, body = raw(live, "GET", "/v1/adapters/sha256:xyz")
    assert "invalid digest reference" in assert_json_error(status, body, 400)
    assert_still_serving(live, seeded)


def test_writes_need_the_token(live, seeded, reg):
    before = registry_state(reg)
    body = json.dumps({"version": 2}).encode()
    path = "/v1/adapters/math/aliases/prod"
    status, headers, answer = raw(live, "PUT", path, body, {"Content-Type": "application/json"})
    assert "Authorization" in assert_json_error(status, answer, 401)
    assert headers["www-authenticate"].startswith("Bearer")
    for auth in ("Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer ", TOKEN):
        status, _, answer = raw(live, "PUT", path, body, {"Content-Type": "application/json", "Authorization": auth})
        assert_json_error(status, answer, (401, 403))
    # auth is checked before the body is even parsed
    for endpoint in ("/v1/generate", "/v1/compose"):
        status, _, answer = raw(live, "POST", endpoint, b"{not json", {"Content-Type": "application/json"})
        assert_json_error(status, answer, 401)
    assert registry_state(reg) == before and reg.resolve("math@prod").ref == "math@1"

    status, headers, answer = raw(live, "PUT", path, body, {"Content-Type": "application/json",
                                                            "Authorization": f"Bearer {TOKEN}"})
    assert status == 200, answer
    assert json.loads(answer)["ref"] == "math@2" and headers["x-registry-digest"] == seeded["v2"].digest
    assert reg.resolve("math@prod").ref == "math@2"
    status, _, answer = raw(live, "GET", "/v1/adapters/math@prod")
    assert json.loads(answer)["ref"] == "math@2"


def test_a_server_without_a_token_refuses_every_write(reg, seeded, monkeypatch):
    from fastapi.testclient import TestClient

    from registry.http.app import create_app

    monkeypatch.delenv("REGISTRY_TOKEN", raising=False)
    client = TestClient(create_app(reg))
    response = client.put("/v1/adapters/math/aliases/prod", json={"version": 2},
                          headers={"Authorization": "Bearer anything"})
    assert "REGISTRY_TOKEN" in assert_json_error(response.status_code, response.content, 403)
    assert client.get("/v1/adapters/math@prod").json()["ref"] == "math@1"


@pytest.mark.parametrize(("body", "expected", "fragment"), [
    (b"{not json", 400, "malformed JSON"),
    (b"", 422, "invalid request"),
    (b"[1, 2]", 422, "invalid request"),
    (b'{"version": "two"}', 422, "version"),
    (b'{"version": 0}', 422, "version"),
    (b'{"version": 2, "extra": 1}', 422, "extra"),
    (b'{}', 422, "version"),
    (b'{"version": 99}', 404, "no adapter matches math@99"),
    (b'\xff\xfe\x00garbage', 400, "malformed JSON"),
])
def test_malformed_alias_bodies(live, seeded, reg, body, expected, fragment):
    before = registry_state(reg)
    status, _, answer = raw(live, "PUT", "/v1/adapters/math/aliases/prod", body,
                            {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert fragment in assert_json_error(status, answer, expected)
    assert registry_state(reg) == before and reg.resolve("math@prod").ref == "math@1"
    assert_still_serving(live, seeded)


@pytest.mark.parametrize(("path", "fragment"), [
    ("/v1/adapters/math/aliases/latest", "invalid alias"),
    ("/v1/adapters/math/aliases/42", "invalid alias"),
    ("/v1/adapters/math/aliases/%2e%2e", "invalid alias"),
    ("/v1/adapters/..%2e/aliases/prod", "invalid name"),
    ("/v1/adapters/nosuch/aliases/prod", "no adapter matches nosuch@2"),
])
def test_bad_alias_targets(live, seeded, reg, path, fragment):
    before = registry_state(reg)
    status, _, answer = raw(live, "PUT", path, b'{"version": 2}',
                            {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert fragment in assert_json_error(status, answer, (400, 404))
    assert registry_state(reg) == before


def test_oversized_bodies_get_413_declared_or_chunked(live, seeded, reg):
    before = registry_state(reg)
    big = json.dumps({"prompts": ["x" * 1000] * 2000, "name": "big"}).encode()  # ~2 MB
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    status, _, answer = raw(live, "POST", "/v1/generate", big, headers)
    assert "limit" in assert_json_error(status, answer, 413)
    status, _, answer = raw(live, "POST", "/v1/compose", big, dict(headers, **{"Transfer-Encoding": "chunked"}))
    assert "limit" in assert_json_error(status, answer, 413)
    status, _, answer = raw(live, "PUT", "/v1/adapters/math/aliases/prod", b'{"version": 2}',
                            dict(headers, **{"Content-Length": "99999999999"}))
    assert_json_error(status, answer, 413)
    assert registry_state(reg) == before
    assert_still_serving(live, seeded)


def test_generate_and_compose_answer_501_without_a_backend(make_client, reg):
    client = make_client()  # an app built without generate/compose backends
    before = registry_state(reg)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = client.post("/v1/generate", json={"prompts": ["What is 1+1?"], "name": "gen"}, headers=auth)
    assert "generator.service.generate_adapter" in assert_json_error(response.status_code, response.content, 501)
    response = client.post("/v1/compose", json={"prompts": ["What is 1+1?"], "name": "cmp", "k": 2}, headers=auth)
    assert "retrieval.service.compose_adapter" in assert_json_error(response.status_code, response.content, 501)
    bad = client.post("/v1/compose", json={"prompts": [], "name": "cmp"}, headers=auth)
    assert_json_error(bad.status_code, bad.content, 422)
    bad = client.post("/v1/generate", json={"prompts": ["x"], "name": "../evil"}, headers=auth)
    assert "invalid name" in assert_json_error(bad.status_code, bad.content, 400)
    assert registry_state(reg) == before


def test_generate_and_compose_call_the_backend(make_client, reg, tiny_adapter_factory):
    calls = []
    source = tiny_adapter_factory("generated", seed=9)

    def generate_adapter(registry, prompts, *, name, generator_ref=None):
        calls.append(("generate", prompts, name, generator_ref))
        return registry.add_directory(source, name=name, kind="generated")

    def compose_adapter(registry, prompts, *, k, strategy, name):
        calls.append(("compose", prompts, k, strategy, name))
        return registry.add_directory(source, name=name, kind="composed", parents=[("math@1", 1.0)])

    client = make_client(generate=generate_adapter, compose=compose_adapter)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = client.post("/v1/generate", json={"prompts": ["Add 1 and 2."], "name": "gen", "generator": "dnd@1"},
                           headers=auth)
    assert response.status_code == 201, response.content
    assert response.json()["ref"] == "gen@1" and response.headers["location"] == "/v1/adapters/gen@1"
    response = client.post("/v1/compose", json={"prompts": ["Add 1 and 2."], "name": "cmp", "k": 2,
                                                "strategy": "fusion"}, headers=auth)
    assert response.status_code == 201 and response.json()["kind"] == "composed"
    assert calls == [("generate", ["Add 1 and 2."], "gen", "dnd@1"), ("compose", ["Add 1 and 2."], 2, "fusion", "cmp")]
    assert client.get("/v1/adapters/gen").json()["ref"] == "gen@1"


def test_compose_and_generate_with_the_real_backends(client, reg):
    pytest.importorskip("retrieval.service")
    pytest.importorskip("generator.service")
    before = registry_state(reg)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = client.post("/v1/generate", json={"prompts": ["Add 1 and 2."], "name": "gen"}, headers=auth)
    assert_json_error(response.status_code, response.content, (400, 404))  # no trained generator here
    assert registry_state(reg) == before
    response = client.post("/v1/compose", json={"prompts": ["Add 1 and 2."], "name": "cmp", "k": 1}, headers=auth)
    assert response.status_code == 201, response.content
    assert response.json()["parents"] == [{"ref": "math@1", "weight": 1.0}]
    assert client.get(f"/v1/adapters/cmp@1/files/{WEIGHTS}").status_code == 200
    before = registry_state(reg)
    response = client.post("/v1/compose", json={"prompts": ["Add 1 and 2."], "name": "cmp", "k": 1,
                                                "strategy": "selection", "add": ["nope@1"]}, headers=auth)
    assert "nope@1" in assert_json_error(response.status_code, response.content, 404)
    assert registry_state(reg) == before
    response = client.post("/v1/compose", json={"prompts": ["Add 1 and 2."], "name": "cmp", "k": 1,
                                                "strategy": "selection", "add": ["math@1"]}, headers=auth)
    assert response.status_code == 201, response.content
    assert response.json()["parents"] == [{"ref": "math@1", "weight": 1.0}, {"ref": "math@1", "weight": 1.0}]
    response = client.post("/v1/compose", json={"prompts": ["Add 1 and 2."], "name": "gated", "k": 1,
                                                "strategy": "selection", "add": ["math@1"], "gate": True}, headers=auth)
    assert response.status_code == 201, response.content
    gate = response.json()["recipe"]["gate"]  # the same adapter twice vs once: whichever the tiny base is surer with
    assert gate["kept"] == ("composition" if gate["candidate"] < gate["fallback"] else "added")
    before = registry_state(reg)
    response = client.post("/v1/compose", json={"prompts": ["Add 1 and 2."], "name": "gated", "k": 1, "gate": True},
                           headers=auth)
    assert "--add" in assert_json_error(response.status_code, response.content, 400)
    assert registry_state(reg) == before


def test_protected_reads(reg, seeded):
    from fastapi.testclient import TestClient

    from registry.http.app import create_app

    client = TestClient(create_app(reg, token=TOKEN, protect_reads=True))
    for path in ("/v1/adapters", "/v1/adapters/math@1", f"/v1/adapters/math@1/files/{WEIGHTS}",
                 "/v1/adapters/math@1/archive", "/v1/search?q=hi"):
        response = client.get(path)
        assert_json_error(response.status_code, response.content, 401)
        response = client.get(path, headers={"Authorization": "Bearer nope"})
        assert_json_error(response.status_code, response.content, 403)
    ok = client.get(f"/v1/adapters/math@1/files/{WEIGHTS}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and "private" in ok.headers["cache-control"]
    assert client.get("/healthz").status_code == 200 and client.get("/docs").status_code == 200


def test_protect_reads_from_the_environment(reg, seeded, monkeypatch):
    from fastapi.testclient import TestClient

    from registry.http.app import create_app

    monkeypatch.setenv("REGISTRY_TOKEN", TOKEN)
    monkeypatch.setenv("REGISTRY_PROTECT_READS", "1")
    client = TestClient(create_app(reg))
    assert client.get("/v1/adapters").status_code == 401
    assert client.get("/v1/adapters", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_a_corrupt_blob_is_never_served(client, seeded, reg):
    blob = reg.blobs.path(seeded["v2"].weights_sha256)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    response = client.get(f"/v1/adapters/math@2/files/{WEIGHTS}")
    assert "do not match their digest" in assert_json_error(response.status_code, response.content, 500)
    response = client.get("/v1/adapters/math@2/archive")
    assert_json_error(response.status_code, response.content, 500)
    assert client.get(f"/v1/adapters/math@1/files/{WEIGHTS}").status_code == 200


def test_serve_command_runs_uvicorn(registry_home, seeded, tmp_path, cli, monkeypatch):
    """`registry serve` in a real subprocess on a free loopback port; stopped by its pid."""
    import os
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    code, out, _ = cli("serve", "--help")
    assert code == 0 and "--protect-reads" in out and "--port" in out
    monkeypatch.delenv("REGISTRY_TOKEN", raising=False)
    code, _, err = cli("serve", "--protect-reads")
    assert code == 1 and "needs REGISTRY_TOKEN" in err

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, REGISTRY_TOKEN=TOKEN, PYTHONPATH=str(root))
    process = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--no-access-log"],
                               cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/adapters/math@prod", timeout=5) as response:
                    assert json.loads(response.read())["ref"] == "math@1"
                    break
            except OSError:
                time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/docs", timeout=5) as response:
            assert b"swagger" in response.read().lower()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def test_parse_range_edges():
    from registry.http.replies import parse_range

    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    assert parse_range("bytes=9-", 10) == (9, 9)
    assert parse_range("bytes=10-", 10) == "unsatisfiable"
    assert parse_range("bytes=5-2", 10) is None
    assert parse_range("bytes=a-b", 10) is None
    assert parse_range("bytes=-", 10) is None
    assert parse_range("bytes=0-", 0) == "unsatisfiable"


# --------------------------------------------------------------------------------------------
# What the server keeps in memory must never outlive a change (registry.http.cache)
# --------------------------------------------------------------------------------------------


def other_process(code: str) -> None:
    """Run ``code`` (with ``reg`` = the registry opened afresh) in another Python process."""
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    script = f"from registry.store import Registry\nreg = Registry.open()\n{code}\nreg.close()\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def get_json(url: str, path: str) -> tuple[int, dict, dict]:
    status, headers, body = raw(url, "GET", path)
    return status, headers, json.loads(body)


def test_an_alias_moved_elsewhere_is_seen_on_the_next_request(live, seeded, reg):
    """The answers for math@prod are cached; a move by another handle or another process must
    show on the very next request, in the metadata, the files and the archive."""
    from server_helpers import read_tar
    from registry.store import Registry

    for _ in range(3):  # warm: these are now answered from memory
        status, headers, data = get_json(live, "/v1/adapters/math@prod")
        assert status == 200 and data["ref"] == "math@1" and data["aliases"] == ["prod"]
        assert raw(live, "GET", f"/v1/adapters/math@prod/files/{WEIGHTS}")[1]["x-registry-digest"] == seeded["v1"].digest

    with Registry.open() as other:  # another handle: its own engine and connections
        other.set_alias("math@2", "prod")
    status, headers, data = get_json(live, "/v1/adapters/math@prod")
    assert data["ref"] == "math@2" and headers["x-registry-digest"] == seeded["v2"].digest
    status, headers, body = raw(live, "GET", f"/v1/adapters/math@prod/files/{WEIGHTS}")
    assert headers["x-registry-digest"] == seeded["v2"].digest and sha(body) == seeded["v2"].weights_sha256
    assert get_json(live, "/v1/adapters/math@1")[2]["aliases"] == []  # the old target's record moved too

    other_process('reg.set_alias("math@1", "prod")')  # and from another process
    status, headers, data = get_json(live, "/v1/adapters/math@prod")
    assert data["ref"] == "math@1" and data["aliases"] == ["prod"]
    status, headers, body = raw(live, "GET", "/v1/adapters/math@prod/archive")
    assert headers["x-registry-digest"] == seeded["v1"].digest
    assert sha(read_tar(body)[WEIGHTS]) == seeded["v1"].weights_sha256


def test_a_version_removed_elsewhere_stops_resolving(live, seeded, reg):
    v2 = seeded["v2"]
    paths = ["/v1/adapters/math@2", f"/v1/adapters/sha256:{v2.digest}", f"/v1/adapters/sha256:{v2.digest[:12]}",
             f"/v1/adapters/math@2/files/{WEIGHTS}", f"/v1/adapters/math@2/files/{CONFIG}",
             "/v1/adapters/math@2/archive", "/v1/adapters/math@2/prompts"]
    for path in paths:  # cached
        assert raw(live, "GET", path)[0] == 200, path
    assert get_json(live, "/v1/adapters/math")[2]["ref"] == "math@2"  # latest

    other_process('reg.remove("math@2")')
    for path in paths:
        status, _, body = raw(live, "GET", path)
        assert "no adapter matches" in assert_json_error(status, body, 404), path
    assert get_json(live, "/v1/adapters/math")[2]["ref"] == "math@1"  # latest moves back
    assert get_json(live, "/v1/adapters/mix@1")[2]["lineage"]["parents"][1]["ref"] == "math@2"  # lineage stays
    assert [c["ref"] for c in get_json(live, "/v1/adapters/math@1")[2]["lineage"]["children"]] == ["mix@1"]


def test_metrics_and_new_children_are_seen(live, seeded, reg, tiny_adapter_factory):
    from registry.store import Registry

    before = get_json(live, "/v1/adapters/math@2")[2]
    assert before["metrics"] == {} and [c["ref"] for c in before["lineage"]["children"]] == ["mix@1"]
    with Registry.open() as other:
        other.update_metrics("math@2", {"accuracy": 0.75})
        other.add_directory(tiny_adapter_factory("child", seed=7), name="child", kind="composed",
                            parents=[("math@2", 1.0)])
    after = get_json(live, "/v1/adapters/math@2")[2]
    assert after["metrics"] == {"accuracy": 0.75}
    assert after["lineage"]["children"] == [{"ref": "child@1", "weight": 1.0}, {"ref": "mix@1", "weight": 0.5}]


def test_an_unknown_ref_that_appears_later_resolves(live, seeded, reg, tiny_adapter_factory):
    """404s are cached too (a client retrying a missing adapter costs no SQL): until something changes."""
    for _ in range(2):
        status, _, body = raw(live, "GET", "/v1/adapters/later")
        assert "no adapter matches later" in assert_json_error(status, body, 404)
    reg.add_directory(tiny_adapter_factory("later", seed=8), name="later")  # the server's own handle
    assert get_json(live, "/v1/adapters/later")[2]["ref"] == "later@1"


def test_repeated_reads_run_no_sql(reg, seeded):
    """Once warm, reads of an unchanged registry are answered from memory: not one statement goes
    through the registry's engine (the change stamp uses its own connection, outside the pool)."""
    from fastapi.testclient import TestClient
    from sqlalchemy import event

    from registry.http.app import create_app
    from registry.http.cache import ChangeStamp

    client = TestClient(create_app(reg, token=TOKEN))
    paths = ["/v1/adapters/math@prod", "/v1/adapters/math", f"/v1/adapters/sha256:{seeded['v1'].digest[:10]}",
             f"/v1/adapters/math@1/files/{CONFIG}", f"/v1/adapters/math@prod/files/{WEIGHTS}",
             "/v1/adapters/math@prod/archive", "/v1/adapters/math@1/prompts", "/v1/adapters/nosuch"]
    first = [(client.get(p).status_code, client.get(p).content) for p in paths]
    statements = []

    def record(_connection, _cursor, statement, *_args):
        statements.append(statement)

    event.listen(reg.engine, "before_cursor_execute", record)
    watch = ChangeStamp(reg.engine)  # PostgreSQL's stamp also moves when autovacuum commits elsewhere
    try:
        for _attempt in range(5):
            statements.clear()
            before = watch.read()
            again = [(client.get(p).status_code, client.get(p).content) for p in paths * 5]
            if statements == [] or watch.read() == before:
                break  # a clean pass, or SQL ran although nothing changed: judged below
        assert statements == []
        assert again == first * 5
        reg.set_alias("math@2", "prod")  # a change: the next reads go to SQL again, once
        statements.clear()
        assert client.get("/v1/adapters/math@prod").json()["ref"] == "math@2"
        assert statements
    finally:
        event.remove(reg.engine, "before_cursor_execute", record)
        watch.close()


def test_a_blob_corrupted_after_it_was_served_is_refused(client, seeded, reg):
    """Verified weights are remembered by (size, mtime): a changed blob is hashed again first."""
    url = f"/v1/adapters/math@1/files/{WEIGHTS}"
    assert client.get(url).status_code == 200
    blob = reg.blobs.path(seeded["v1"].weights_sha256)
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    response = client.get(url)
    assert "do not match their digest" in assert_json_error(response.status_code, response.content, 500)


# --------------------------------------------------------------------------------------------
# Zero-copy file responses (registry.http.zerocopy) and the fast read path (registry.http.reads)
# --------------------------------------------------------------------------------------------


def parsers() -> list[str]:
    import importlib.util

    return ["h11"] + (["httptools"] if importlib.util.find_spec("httptools") else [])


@pytest.fixture(params=parsers())
def zero_copy_server(request, reg, seeded, monkeypatch):
    """A live server on the zero-copy protocol of each installed parser, counting os.sendfile calls."""
    import os

    import registry.http.zerocopy as serve_http
    from registry.http.app import create_app
    from server_helpers import ServerThread

    calls = []
    real = os.sendfile

    def counting(*args):
        sent = real(*args)
        calls.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", counting)
    thread = ServerThread(create_app(reg, token=TOKEN))
    thread.server.config.http = serve_http.protocol_class(request.param)
    assert thread.server.config.http is not None
    with thread as url:
        yield url, calls


def test_zero_copy_files_keep_etag_range_and_conditional_semantics(zero_copy_server, seeded):
    """Everything on ONE keep-alive connection: the byte accounting after each sendfile must leave
    the connection usable for the next request."""
    from server_helpers import read_tar

    url, calls = zero_copy_server
    v1 = seeded["v1"]
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)

    def get(path, headers=None, method="GET"):
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()

    try:
        path = f"/v1/adapters/math@1/files/{WEIGHTS}"
        status, headers, body = get(path)
        assert status == 200 and sha(body) == v1.weights_sha256 and headers["etag"] == f'"{v1.weights_sha256}"'
        assert int(headers["content-length"]) == len(body) == v1.size_bytes
        assert sum(calls) == v1.size_bytes  # the body went out by sendfile, all of it
        size = len(body)
        assert get(path, {"Range": "bytes=10-99"})[1:] == (get(path, {"Range": "bytes=10-99"})[1], body[10:100])
        status, headers, part = get(path, {"Range": "bytes=-7"})
        assert status == 206 and part == body[-7:] and headers["content-range"] == f"bytes {size - 7}-{size - 1}/{size}"
        status, _, part = get(path, {"Range": "bytes=5-", "If-Range": f'"{v1.weights_sha256}"'})
        assert status == 206 and part == body[5:]
        status, _, part = get(path, {"Range": "bytes=5-", "If-Range": '"other"'})
        assert status == 200 and part == body
        status, headers, empty = get(path, {"If-None-Match": f'"{v1.weights_sha256}"'})
        assert status == 304 and empty == b"" and headers["etag"] == f'"{v1.weights_sha256}"'
        status, headers, answer = get(path, {"Range": f"bytes={size}-"})
        assert_json_error(status, answer, 416)
        assert headers["content-range"] == f"bytes */{size}"
        status, headers, empty = get(path, method="HEAD")
        assert status == 200 and empty == b"" and int(headers["content-length"]) == size
        status, headers, archive = get("/v1/adapters/math@1/archive")
        assert status == 200 and int(headers["content-length"]) == len(archive)
        assert sha(read_tar(archive)[WEIGHTS]) == v1.weights_sha256
        status, _, meta = get("/v1/adapters/math@1")  # and a plain JSON answer after all of that
        assert status == 200 and json.loads(meta)["digest"] == v1.digest
        status, _, answer = get("/v1/adapters/math@1/files/nope.bin")
        assert "unknown file" in assert_json_error(status, answer, 404)
    finally:
        connection.close()


def test_the_fast_path_answers_like_the_fastapi_routes(reg, seeded):
    """FastReads takes the hot reads off FastAPI; the FastAPI routes stay for /docs and must give
    the same status, body and headers."""
    from fastapi.testclient import TestClient

    from registry.http.app import create_app

    fast = TestClient(create_app(reg, token=TOKEN))
    routed = TestClient(create_app(reg, token=TOKEN, fast_reads=False))
    v1 = seeded["v1"]
    weights = f"/v1/adapters/math@1/files/{WEIGHTS}"
    cases = [("GET", "/v1/adapters/math@prod", {}), ("GET", "/v1/adapters/mix", {}),
             ("GET", f"/v1/adapters/sha256:{v1.digest[:9]}", {}), ("GET", "/v1/adapters/math@1/prompts", {}),
             ("GET", f"/v1/adapters/math@prod/files/{CONFIG}", {"Range": "bytes=3-8"}),
             ("GET", weights, {}), ("GET", weights, {"Range": "bytes=-20"}), ("HEAD", weights, {}),
             ("GET", weights, {"If-None-Match": f'W/"{v1.weights_sha256}"'}), ("GET", weights, {"Range": "bytes=-0"}),
             ("GET", "/v1/adapters/math@1/archive", {}), ("HEAD", "/v1/adapters/math@prod/archive", {}),
             ("GET", "/v1/adapters/nosuch", {}), ("GET", "/v1/adapters/math@..", {}),
             ("GET", "/v1/adapters/math@1/files/other.json", {}), ("GET", "/v1/adapters/sha256:12", {})]
    compared = ("content-type", "content-length", "etag", "content-range", "cache-control", "x-registry-ref",
                "x-registry-digest", "accept-ranges", "content-disposition")
    for method, path, headers in cases:
        a, b = fast.request(method, path, headers=headers), routed.request(method, path, headers=headers)
        assert (a.status_code, a.content) == (b.status_code, b.content), path
        assert {k: a.headers.get(k) for k in compared} == {k: b.headers.get(k) for k in compared}, path


def test_search_follows_adds_and_removals_by_what_changed(reg, seeded):
    """/v1/search catches the index up only when the database changed, and then by the new rows;
    only a removal makes it compare the id sets."""
    from fastapi.testclient import TestClient

    from registry.embeddings import embed_texts
    from registry.http.app import create_app
    from registry.store import Registry

    app = create_app(reg, token=TOKEN)
    client = TestClient(app)
    follower = app.state.index_follower
    query = "What is 7 plus 1?"
    assert [h["ref"] for h in client.get("/v1/search", params={"q": query, "k": 3}).json()] == ["math@1"]
    assert client.get("/v1/search", params={"q": query, "k": 3}).status_code == 200
    assert follower.full_scans == 0

    vector = embed_texts([query])  # a new adapter whose prompt is the query itself: the top hit
    with Registry.open() as other:
        source = reg.fetch("math@2")
        other.add_directory(source, name="exact", prompts=[query], prompt_embeddings=vector)
    hits = client.get("/v1/search", params={"q": query, "k": 3}).json()
    assert [h["ref"] for h in hits] == ["exact@1", "math@1"] and follower.full_scans == 0

    with Registry.open() as other:
        other.remove("exact@1")
    assert [h["ref"] for h in client.get("/v1/search", params={"q": query, "k": 3}).json()] == ["math@1"]
    assert follower.full_scans == 1
    client.get("/v1/search", params={"q": query, "k": 3})
    assert follower.full_scans == 1  # nothing changed since: no catch-up at all


def test_connection_close_and_http_1_0_get_whole_bodies(zero_copy_server, seeded):
    """uvicorn closes these connections after the response: what was held back to go out in one
    write (headers + body) must be written before the close."""
    import socket

    url, _ = zero_copy_server
    v1 = seeded["v1"]
    for path, check in [(f"/v1/adapters/math@1/files/{WEIGHTS}", lambda body: sha(body) == v1.weights_sha256),
                        ("/v1/adapters/math@1", lambda body: json.loads(body)["digest"] == v1.digest)]:
        status, headers, body = raw(url, "GET", path, headers={"Connection": "close"})
        assert status == 200 and check(body) and headers["connection"] == "close"
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):  # HTTP/1.0: the server closes when done
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and check(body), head


def test_a_client_that_goes_away_mid_sendfile_leaves_the_server_serving(reg, seeded, tmp_path, monkeypatch):
    """A 9 MB blob (more than a socket's send buffer takes, so sendfile has to wait) to readers
    that stop reading and hang up: their sends fail, their connections are dropped, and other
    clients (including one reading at the same time) are served intact."""
    import logging

    from registry.http.app import create_app
    from server_helpers import ServerThread

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_serve_load import random_lora, write_base_config

    state, config = random_lora(0, rank=40)  # 30 layers x (q, v): 9.2 MB of float32
    big = reg.add_weights("big", state, config, kind="imported", base=str(write_base_config(tmp_path / "base")))
    path = f"/v1/adapters/big@1/files/{WEIGHTS}"
    problems = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                problems.append(record.getMessage())

    thread = ServerThread(create_app(reg, token=TOKEN))  # (uvicorn's logging is set up here)
    collect = Collect()
    logging.getLogger("uvicorn.error").addHandler(collect)
    try:
        serve_while_clients_quit(thread, path, big, seeded)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(collect)
    assert problems == []  # a client hanging up is not an application error: no traceback logged


def serve_while_clients_quit(thread, path, big, seeded):
    import socket
    import threading

    with thread as url:
        host, port = url.removeprefix("http://").split(":")
        quitters = []
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(1000)
            quitters.append(sock)
        results = []
        reader = threading.Thread(target=lambda: results.append(raw(url, "GET", path)))
        reader.start()
        for sock in quitters:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # reset on close
            sock.close()
        reader.join(timeout=60)
        status, _, body = results[0]
        assert status == 200 and sha(body) == big.weights_sha256 and len(body) == big.size_bytes
        status, _, body = raw(url, "GET", path, headers={"Range": "bytes=1000000-"})
        assert status == 206 and body == results[0][2][1000000:]
        assert_still_serving(url, seeded)


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_idle_and_trickling_connections_are_closed(reg, seeded, monkeypatch, parser):
    """A connection that sends nothing, or trickles its request head, is closed after the header
    timeout; one that sends its request in time is answered and kept alive as before."""
    import socket
    import time

    from registry.http import zerocopy
    from registry.http.app import create_app
    from server_helpers import ServerThread

    monkeypatch.setenv("REGISTRY_HEADER_TIMEOUT_S", "1")
    protocol = zerocopy._httptools_protocol() if parser == "httptools" else zerocopy._h11_protocol()
    assert protocol.header_timeout == 1.0
    thread = ServerThread(create_app(reg, token=TOKEN))
    thread.server.config.http = protocol
    with thread as url:
        port = int(url.rsplit(":", 1)[1])

        def closed_after(send_slowly: bytes) -> float:
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                for byte in send_slowly:
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(0.2)
                while sock.recv(1024):
                    pass
            return time.monotonic() - start

        assert closed_after(b"") < 5  # idle: closed after ~1 s
        assert closed_after(b"GET /v1/adapters/math HTTP/1.1\r\nHost: x\r\nX-Slow: 1234567890") < 5  # trickled
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for _ in range(2):  # in time, twice on one keep-alive connection
                sock.sendall(b"GET /v1/adapters/math HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b""
                while b"math@2" not in reply:
                    chunk = sock.recv(65536)
                    assert chunk, reply
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 200")
