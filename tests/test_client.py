"""`registry.client`: download once, verify digests, cache by digest, never keep a tampered or mixed
download; `registry pull` and `registry sync --vllm` on top of it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

TOKEN = "client-token"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Spy:
    """ASGI wrapper that counts requests and can rewrite or cut responses, or act between requests."""

    def __init__(self, app):
        self.app = app
        self.paths: list[str] = []
        self.headers: list[dict] = []
        self.tamper = None  # (path fragment, function(bytes) -> bytes)
        self.cut_once = None  # path fragment: send half the body once, then drop the connection
        self.after = None  # (path fragment, callable) run once after that response was sent

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        self.paths.append(path)
        self.headers.append({k.decode().lower(): v.decode() for k, v in scope["headers"]})
        tamper = self.tamper if self.tamper and self.tamper[0] in path else None
        cut = self.cut_once is not None and self.cut_once in path
        if cut:
            self.cut_once = None
        if tamper or cut:
            # A middleware that rewrites bodies must not pass on the zero-copy extension: the app
            # would then hand the file to the server directly instead of sending bytes through here.
            scope = dict(scope, extensions={k: v for k, v in (scope.get("extensions") or {}).items()
                                            if k != "http.response.zerocopysend"})
            start, chunks = None, []

            async def buffered(message):
                nonlocal start
                if message["type"] == "http.response.start":
                    start = message
                else:
                    chunks.append(message.get("body", b""))

            await self.app(scope, receive, buffered)
            body = b"".join(chunks)
            if tamper:
                body = tamper[1](body)
                start = dict(start, headers=[(k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                                             for k, v in start["headers"]])
            await send(start)
            await send({"type": "http.response.body", "body": body[:len(body) // 2] if cut else body,
                        "more_body": False})
        else:
            await self.app(scope, receive, send)
        if self.after and self.after[0] in path:
            action, self.after = self.after[1], None
            action()


@pytest.fixture
def seeded(reg, tiny_adapter_factory):
    v1 = reg.add_directory(tiny_adapter_factory("m1", seed=1), name="math")
    v2 = reg.add_directory(tiny_adapter_factory("m2", seed=2), name="math")
    reg.set_alias("math@1", "prod")
    return {"v1": v1, "v2": v2}


@pytest.fixture
def server(reg, seeded):
    from registry.http.app import create_app
    from server_helpers import ServerThread

    spy = Spy(create_app(reg, token=TOKEN))
    thread = ServerThread(spy)
    url = thread.__enter__()
    yield url, spy, thread
    thread.__exit__(None, None, None)


def assert_peft_dir(path: Path, info) -> None:
    from safetensors.torch import load_file

    assert sha((path / CONFIG).read_bytes()) == info.config_sha256
    assert sha((path / WEIGHTS).read_bytes()) == info.weights_sha256
    assert json.loads((path / CONFIG).read_text())["peft_type"] == "LORA"
    assert all(".lora_" in key for key in load_file(path / WEIGHTS))
    record = json.loads((path / "registry.json").read_text())
    assert record["digest"] == info.digest and record["ref"] == info.ref


def cache_leftovers(cache: Path) -> list[str]:
    adapters = cache / "adapters"
    return sorted(p.name for p in adapters.iterdir()) if adapters.exists() else []


def test_immutable_ref_is_fetched_once_then_served_without_the_network(server, seeded, tmp_path):
    from registry.client import fetch, fetch_adapter

    url, spy, thread = server
    cache = tmp_path / "cache"
    first = fetch_adapter(url, "math@1", cache)
    assert not first.from_cache and first.requests == 3  # metadata + two files
    assert first.ref == "math@1" and first.digest == seeded["v1"].digest
    assert_peft_dir(first.path, seeded["v1"])
    assert spy.paths[1:] == [f"/v1/adapters/sha256:{seeded['v1'].digest}/files/{CONFIG}",
                             f"/v1/adapters/sha256:{seeded['v1'].digest}/files/{WEIGHTS}"]
    count = len(spy.paths)
    second = fetch_adapter(url, "math@1", cache)
    assert second.path == first.path and second.from_cache and second.requests == 0
    assert len(spy.paths) == count  # not a single request

    thread.__exit__(None, None, None)  # the server is gone: immutable refs still resolve from cache
    assert fetch(url, "math@1", cache) == first.path
    assert fetch(url, f"sha256:{seeded['v1'].digest}", cache) == first.path


def test_alias_ref_costs_one_metadata_request_then_reuses_the_cache(server, seeded, tmp_path, reg):
    from registry.client import fetch_adapter

    url, spy, _ = server
    cache = tmp_path / "cache"
    first = fetch_adapter(url, "math@prod", cache)
    assert first.ref == "math@1" and first.requests == 3
    count = len(spy.paths)
    second = fetch_adapter(url, "math@prod", cache)
    assert second.from_cache and second.requests == 1 and len(spy.paths) == count + 1
    assert spy.paths[-1] == "/v1/adapters/math@prod"
    # the version it resolved to is now cached too: no request at all
    assert fetch_adapter(url, "math@1", cache).requests == 1  # first time: resolves name@1 once
    assert fetch_adapter(url, "math@1", cache).requests == 0

    reg.set_alias("math@2", "prod")
    moved = fetch_adapter(url, "math@prod", cache)
    assert moved.ref == "math@2" and not moved.from_cache
    assert_peft_dir(moved.path, seeded["v2"])
    latest = fetch_adapter(url, "math", cache)
    assert latest.ref == "math@2" and latest.from_cache and latest.requests == 1


def test_alias_moving_mid_download_yields_one_consistent_version(server, seeded, tmp_path, reg):
    from registry.client import fetch_adapter

    url, spy, _ = server
    # the alias moves right after the client resolved it, before it downloads a single file
    spy.after = ("/v1/adapters/math@prod", lambda: reg.set_alias("math@2", "prod"))
    fetched = fetch_adapter(url, "math@prod", tmp_path / "cache")
    assert reg.resolve("math@prod").ref == "math@2"  # the move really happened mid-fetch
    assert fetched.ref == "math@1"
    assert_peft_dir(fetched.path, seeded["v1"])  # config and weights of the same version
    assert fetch_adapter(url, "math@prod", tmp_path / "cache").ref == "math@2"


@pytest.mark.parametrize("target", [WEIGHTS, CONFIG])
def test_a_tampered_file_is_refused_and_nothing_is_cached(server, seeded, tmp_path, target):
    from registry.client import fetch_adapter
    from registry.errors import IntegrityError

    url, spy, _ = server
    spy.tamper = (f"/files/{target}", lambda body: body[:-1] + bytes([body[-1] ^ 1]))
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match="do not match sha256"):
        fetch_adapter(url, "math@1", cache)
    assert cache_leftovers(cache) == []  # no adapter folder, no temp folder
    assert not (cache / "refs").exists()
    spy.tamper = None
    assert_peft_dir(fetch_adapter(url, "math@1", cache).path, seeded["v1"])  # a clean retry works


def test_tampered_metadata_is_refused(server, tmp_path):
    from registry.client import fetch_adapter
    from registry.errors import IntegrityError

    url, spy, _ = server

    def lie(body: bytes) -> bytes:
        meta = json.loads(body)
        meta["weights_sha256"] = "0" * 64  # no longer matches the adapter digest
        return json.dumps(meta).encode()

    spy.tamper = ("/v1/adapters/math@1", lie)
    with pytest.raises(IntegrityError, match="inconsistent"):
        fetch_adapter(url, "math@1", tmp_path / "cache")

    def escape(body: bytes) -> bytes:
        meta = json.loads(body)
        meta["digest"] = "../../etc"
        return json.dumps(meta).encode()

    spy.tamper = ("/v1/adapters/math@1", escape)
    with pytest.raises(IntegrityError, match="malformed"):
        fetch_adapter(url, "math@1", tmp_path / "cache")

    def other_version(body: bytes) -> bytes:
        meta = json.loads(body)
        meta["version"], meta["ref"] = 2, "math@2"  # a consistent record, but not the version asked for
        return json.dumps(meta).encode()

    spy.tamper = ("/v1/adapters/math@1", other_version)
    with pytest.raises(IntegrityError, match="answered math@2"):
        fetch_adapter(url, "math@1", tmp_path / "cache")
    assert not (tmp_path / "cache" / "refs").exists()
    assert cache_leftovers(tmp_path / "cache") == []


def test_a_dropped_download_resumes_with_range(server, seeded, tmp_path):
    from registry.client import fetch_adapter

    url, spy, _ = server
    spy.cut_once = f"/files/{WEIGHTS}"
    fetched = fetch_adapter(url, "math@1", tmp_path / "cache")
    assert_peft_dir(fetched.path, seeded["v1"])
    weights_requests = [h for p, h in zip(spy.paths, spy.headers) if p.endswith(WEIGHTS)]
    assert len(weights_requests) == 2
    assert weights_requests[1]["range"].startswith("bytes=") and weights_requests[1]["range"] != "bytes=0-"
    assert weights_requests[1]["if-range"] == f'"{seeded["v1"].weights_sha256}"'


def test_unknown_ref_bad_ref_and_unreachable_server(server, tmp_path):
    from registry.client import fetch
    from registry.errors import InvalidName, NotFound, RegistryError

    url, _, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(NotFound, match="no adapter matches nosuch"):
        fetch(url, "nosuch@prod", cache)
    with pytest.raises(InvalidName):
        fetch(url, "../etc/passwd", cache)
    with pytest.raises(RegistryError, match="cannot reach"):
        fetch("http://127.0.0.1:9", "math@prod", cache, timeout=5)
    with pytest.raises(RegistryError, match="http://"):
        fetch("file:///etc/passwd", "math@prod", cache)
    assert cache_leftovers(cache) == []


def test_protected_reads_need_the_token(reg, seeded, tmp_path):
    from registry.client import ServerError, fetch
    from registry.http.app import create_app
    from server_helpers import ServerThread

    with ServerThread(create_app(reg, token=TOKEN, protect_reads=True)) as url:
        with pytest.raises(ServerError, match="401"):
            fetch(url, "math@1", tmp_path / "cache", token="")
        with pytest.raises(ServerError, match="403"):
            fetch(url, "math@1", tmp_path / "cache", token="wrong")
        assert_peft_dir(fetch(url, "math@1", tmp_path / "cache", token=TOKEN), seeded["v1"])


def test_pull_and_sync_commands(server, seeded, tmp_path, reg, cli, monkeypatch):
    url, _, _ = server
    cache, vllm = tmp_path / "cache", tmp_path / "vllm"
    code, out, err = cli("pull", "math@prod", "--server", url, "--cache-dir", cache, "--json")
    assert code == 0, err
    assert json.loads(out)["ref"] == "math@1"

    code, out, err = cli("sync", "math@prod", "--server", url, "--vllm", vllm, "--cache-dir", cache, "--json")
    assert code == 0, err
    [item] = json.loads(out)
    assert item["changed"] and item["ref"] == "math@1" and Path(item["path"]) == vllm / "math"
    assert (vllm / "math" / CONFIG).exists()
    assert sha((vllm / "math" / WEIGHTS).read_bytes()) == seeded["v1"].weights_sha256
    assert json.loads((vllm / "math" / "registry.json").read_text())["digest"] == seeded["v1"].digest

    code, out, _ = cli("sync", "math@prod", "--server", url, "--vllm", vllm, "--cache-dir", cache, "--json")
    assert json.loads(out)[0]["changed"] is False

    reg.set_alias("math@2", "prod")
    code, out, _ = cli("sync", "math@prod", "--server", url, "--vllm", vllm, "--cache-dir", cache)
    assert code == 0 and out.strip().endswith("updated") and "math@2" in out
    assert sha((vllm / "math" / WEIGHTS).read_bytes()) == seeded["v2"].weights_sha256
    assert sorted(p.name for p in vllm.iterdir()) == ["math"]  # no staging or old folders left

    code, _, err = cli("sync", "math@1", "math@2", "--server", url, "--vllm", vllm, "--cache-dir", cache)
    assert code == 1 and "both resolve to adapters named math" in err
    code, _, err = cli("sync", "nosuch", "--server", url, "--vllm", vllm, "--cache-dir", cache)
    assert code == 1 and "no adapter matches nosuch" in err
    assert sha((vllm / "math" / WEIGHTS).read_bytes()) == seeded["v2"].weights_sha256  # untouched


def test_requests_are_retried_after_connection_errors_and_5xx_not_4xx(monkeypatch):
    """Two failures (connection refused, then a 503) and a success: one call, three requests, two
    waits of 0.25 s and 0.5 s; a 404 is answered at once."""
    import io
    import urllib.error
    import urllib.request

    from registry import client
    from registry.errors import NotFound

    waits, answers = [], []
    monkeypatch.setattr(client.time, "sleep", waits.append)

    def urlopen(request, timeout):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    http = client._Http("http://registry.invalid", None, timeout=1)
    monkeypatch.setattr(http._opener, "open", urlopen)

    def error(code: int):
        return urllib.error.HTTPError("http://registry.invalid/x", code, "x", {}, io.BytesIO(b'{"error": "busy"}'))

    answers[:] = [urllib.error.URLError("connection refused"), error(503), io.BytesIO(b'{"ok": true}')]
    assert http.json("/healthz") == {"ok": True}
    assert http.requests == 3 and waits == [0.25, 0.5]

    answers[:], waits[:] = [error(404)], []
    with pytest.raises(NotFound):
        http.json("/v1/adapters/nosuch")
    assert http.requests == 4 and waits == []

    answers[:] = [error(500)] * (client.RETRIES + 1)
    with pytest.raises(client.ServerError):
        http.json("/v1/adapters/x")
    assert waits == [0.25, 0.5, 1.0] and not answers
