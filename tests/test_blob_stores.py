"""Blob stores beyond the shared storage tests (tests/test_registry.py runs those on both backends):
S3 write-if-absent and the deletion grace period, cache limits and eviction, an unreachable or
wrong object store, and downloads redirected to presigned URLs (moto's S3 server, a real process)."""

from __future__ import annotations

import http.client
import time
from urllib.parse import urlsplit

import pytest

from conftest import damage_blob, make_bucket
from registry.errors import IntegrityError, RegistryError


@pytest.fixture
def blob_backend() -> str:
    return "s3"


def _age(store, digest: str) -> float:
    head = store.client.head_object(Bucket=store.bucket, Key=store.key(digest))
    return time.time() - head["LastModified"].timestamp()


def test_s3_put_is_write_if_absent_and_refreshes_the_age_of_existing_bytes(reg, monkeypatch):
    store = reg.blobs
    digest = store.put(b"same bytes")
    time.sleep(1.1)
    assert _age(store, digest) >= 1.0
    assert store.put(b"same bytes") == digest  # already there: not rewritten, but made young again
    assert _age(store, digest) < 1.0
    assert store.all_digests() == {digest}
    assert store.read(digest) == b"same bytes"


def test_s3_deletions_wait_for_the_grace_period(reg, tiny_adapter_factory, monkeypatch):
    """An add on another machine may be about to reference a young blob: rm and doctor keep it."""
    reg.blobs.grace_s = 3600
    info = reg.add_directory(tiny_adapter_factory("a"), name="young")
    reg.remove("young")
    assert reg.blobs.exists(info.weights_sha256)  # unreferenced but young: kept
    repaired = reg.doctor(repair=True).repaired
    assert any("younger than the grace period" in r for r in repaired) and reg.blobs.exists(info.weights_sha256)
    reg.blobs.grace_s = 0
    assert any("deleted unreferenced blob" in r for r in reg.doctor(repair=True).repaired)
    assert not reg.blobs.exists(info.weights_sha256) and reg.doctor().ok


def test_s3_reads_go_through_a_size_limited_verified_cache(reg, tiny_adapter_factory):
    infos = [reg.add_directory(tiny_adapter_factory(f"a{i}", seed=i), name=f"c{i}") for i in range(3)]
    size = infos[0].size_bytes
    reg.blobs.cache_bytes = 2 * size  # room for two blobs
    for info in infos:
        reg.load_weights(info.ref)
        time.sleep(0.01)  # distinct mtimes: least recently used is well defined
    cached = {p.name for p in (reg.blobs.cache_root / "sha256").glob("??/*")}
    assert cached == {infos[1].weights_sha256, infos[2].weights_sha256}  # the oldest one was evicted
    damage_blob(reg, infos[0].weights_sha256, "corrupt")  # a download is hashed before it is cached
    with pytest.raises(IntegrityError, match="does not match its digest"):
        reg.load_weights(infos[0].ref)
    assert infos[0].weights_sha256 not in {p.name for p in (reg.blobs.cache_root / "sha256").glob("??/*")}


@pytest.mark.parametrize("blob_backend", ["local", "s3"])
def test_the_fetched_directories_are_size_limited_too(reg, tiny_adapter_factory, monkeypatch, blob_backend):
    infos = [reg.add_directory(tiny_adapter_factory(f"a{i}", seed=i), name=f"f{i}") for i in range(3)]
    one = sum(f.stat().st_size for f in reg.fetch(infos[0].ref).iterdir() if f.is_file())
    monkeypatch.setenv("REGISTRY_FETCH_CACHE_BYTES", str(2 * one + 200))
    paths = []
    for info in infos:
        paths.append(reg.fetch(info.ref))
        time.sleep(0.01)
    assert not paths[0].exists() and paths[1].exists() and paths[2].exists()
    assert reg.fetch(infos[0].ref).exists()  # evicted copies are rebuilt on demand


def test_an_unreachable_object_store_fails_the_add_in_one_line_and_writes_no_row(cli, reg, tiny_adapter_factory,
                                                                                monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, out, err = cli("add", tiny_adapter_factory("a"), "--name", "nowhere")
    assert code != 0 and "Traceback" not in err
    assert "object store http://127.0.0.1:9" in err and len(err.strip().splitlines()) == 1
    assert reg.list_adapters(include_removed=True) == []


def test_a_missing_bucket_is_named(cli, reg, tiny_adapter_factory, monkeypatch):
    monkeypatch.setenv("REGISTRY_BLOB_URL", "s3://no-such-bucket-here/blobs")
    code, _out, err = cli("add", tiny_adapter_factory("a"), "--name", "nobucket")
    assert code != 0 and "NoSuchBucket" in err and "no-such-bucket-here" in err and "Traceback" not in err
    assert reg.list_adapters(include_removed=True) == []


def test_a_bad_blob_url_is_refused(cli, monkeypatch):
    monkeypatch.setenv("REGISTRY_BLOB_URL", "gs://elsewhere")
    code, _out, err = cli("list")
    assert code != 0 and "unsupported blob URL" in err and "Traceback" not in err


def test_downloads_redirect_to_presigned_urls_and_the_client_still_verifies(reg, tiny_adapter_factory, tmp_path):
    from registry.client import fetch_adapter
    from registry.http.app import create_app
    from server_helpers import ServerThread

    info = reg.add_directory(tiny_adapter_factory("a"), name="far")
    with ServerThread(create_app(reg, token="secret", redirect_downloads=True)) as url:
        host = urlsplit(url)
        connection = http.client.HTTPConnection(host.hostname, host.port)
        connection.request("GET", "/v1/adapters/far@1/files/adapter_model.safetensors")
        reply = connection.getresponse()
        reply.read()
        assert reply.status == 307 and "X-Amz-Signature=" in reply.getheader("Location")
        assert reply.getheader("ETag") == f'"{info.weights_sha256}"'
        connection.close()

        fetched = fetch_adapter(url, "far@1", tmp_path / "client", token="secret")
        assert (fetched.path / "adapter_model.safetensors").read_bytes() == reg.blobs.read(info.weights_sha256)

        damage_blob(reg, info.weights_sha256, "corrupt")  # the object store now serves other bytes
        with pytest.raises(IntegrityError, match="do not match"):
            fetch_adapter(url, f"sha256:{info.digest}", tmp_path / "client2")


def test_redirect_downloads_needs_an_s3_store(cli, monkeypatch):
    monkeypatch.delenv("REGISTRY_BLOB_URL", raising=False)
    code, _out, err = cli("serve", "--redirect-downloads", "--port", "1")
    assert code != 0 and "needs an S3 blob store" in err


def test_two_registries_share_one_bucket(reg, tiny_adapter_factory, tmp_path, database_url, blob_url):
    """A second home (another machine) on the same database and bucket reads what the first added."""
    from registry.store import Registry

    info = reg.add_directory(tiny_adapter_factory("a"), name="shared")
    other = Registry.open(tmp_path / "other-home", database_url, blob_url=blob_url)
    try:
        weights, _config = other.load_weights("shared")
        assert weights.keys() == reg.load_weights("shared")[0].keys()
        assert other.fetch("shared").exists() and other.resolve("shared").digest == info.digest
    finally:
        other.close()


def test_make_bucket_helper_points_boto3_at_the_test_server(s3_endpoint, monkeypatch):
    import boto3

    bucket = make_bucket(s3_endpoint, monkeypatch)
    assert bucket in [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]


def test_s3_errors_are_registry_errors(reg):
    store = reg.blobs
    store.bucket = "no-such-bucket-at-all"
    with pytest.raises(RegistryError, match="NoSuchBucket"):
        store.all_digests()


def test_the_client_never_sends_its_token_to_another_host():
    import urllib.request

    from registry.client import _SameOriginAuth

    request = urllib.request.Request("http://registry:8080/v1/adapters/x/files/w", headers={"Authorization": "Bearer t"})
    handler = _SameOriginAuth()
    elsewhere = handler.redirect_request(request, None, 307, "", {}, "http://bucket.s3:9000/k?X-Amz-Signature=s")
    same = handler.redirect_request(request, None, 307, "", {}, "http://registry:8080/v1/other")
    assert not elsewhere.has_header("Authorization") and same.get_header("Authorization") == "Bearer t"
