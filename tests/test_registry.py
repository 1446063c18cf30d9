"""The registry API on SQLite and PostgreSQL: add, versions, aliases, digests, fetch, search, rm, doctor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import damage_blob
from registry.errors import IntegrityError, InvalidName, NotFound, RegistryError


@pytest.fixture(params=["local", "s3"])
def blob_backend(request) -> str:
    """Every storage test here runs on the local blob folder and on S3 (moto's server)."""
    return request.param

MATH_PROMPTS = ["What is 12 plus 7?", "Add 3 and 9.", "Compute 45 + 11.", "What is the sum of 8 and 5?"]
REVERSE_PROMPTS = ["Spell the word 'garden' backwards.", "Reverse the letters of 'planet'.",
                   "Write 'orange' in reverse order.", "What is 'cat' spelled backwards?"]


def test_versions_aliases_and_refs(reg, tiny_adapter_factory):
    first = reg.add_directory(tiny_adapter_factory("a", seed=1), name="math", task="add")
    second = reg.add_directory(tiny_adapter_factory("b", seed=2), name="math", task="add")
    assert (first.version, second.version) == (1, 2)
    assert reg.resolve("math").ref == "math@2"
    assert reg.resolve("math@1").digest == first.digest
    reg.set_alias("math@1", "prod")
    assert reg.resolve("math@prod").ref == "math@1"
    reg.set_alias("math@2", "prod")  # aliases move
    assert reg.resolve("math@prod").ref == "math@2"
    assert reg.resolve(f"sha256:{first.digest}").ref == "math@1"
    assert reg.resolve(f"sha256:{first.digest[:10]}").ref == "math@1"
    assert reg.resolve(f"sha256:{first.weights_sha256}").ref == "math@1"
    with pytest.raises(NotFound):
        reg.resolve("math@7")
    with pytest.raises(NotFound):
        reg.resolve("nothing")
    with pytest.raises(InvalidName):
        reg.set_alias("math@1", "3")


def test_identical_weights_stored_once(reg, tiny_adapter_factory):
    path = tiny_adapter_factory("a", seed=1)
    one = reg.add_directory(path, name="one")
    two = reg.add_directory(path, name="two")
    assert one.weights_sha256 == two.weights_sha256
    assert len(reg.blobs.all_digests()) == 1


def test_metadata_is_recorded(reg, tiny_adapter_factory, tiny_base_dir):
    from registry import base_models

    info = reg.add_directory(tiny_adapter_factory("a", rank=8, targets=("q_proj", "k_proj", "v_proj")),
                             name="meta", task="t1", task_description="a test task",
                             tags=["exp", "tiny"], prompts=["hello there"])
    assert info.kind == "imported" and info.rank == 8 and info.alpha == 16.0
    assert info.target_modules == ["k_proj", "q_proj", "v_proj"]
    assert info.base_model == base_models.base_model_id(str(tiny_base_dir))
    assert info.base_fingerprint == base_models.base_fingerprint(base_models.load_base_config(str(tiny_base_dir)))
    assert info.tags == ["exp", "tiny"] and info.task == "t1"
    updated = reg.update_metrics("meta", {"accuracy": 0.5})
    assert updated.metrics == {"accuracy": 0.5}
    assert reg.prompts("meta") == ["hello there"]
    assert reg.prompt_embeddings("meta").shape == (1, 384)
    assert [a.ref for a in reg.list_adapters(tag="tiny")] == ["meta@1"]
    assert reg.list_adapters(kind="harvested") == []


def test_fetch_loads_in_peft_and_matches(reg, tiny_adapter_factory, tiny_base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = tiny_adapter_factory("a", rank=4, seed=3)
    reg.add_directory(source, name="fetchme")
    path = reg.fetch("fetchme")
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    inputs = torch.tensor([[1, 5, 9, 12, 40]])
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), source)(inputs).logits
    fetched = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), path)(inputs).logits
    assert torch.allclose(expected, fetched)
    copied = reg.fetch("fetchme", to=path.parent.parent / "copy")
    assert (copied / "adapter_model.safetensors").read_bytes() == (path / "adapter_model.safetensors").read_bytes()


def test_fetch_detects_a_corrupt_blob(reg, tiny_adapter_factory):
    info = reg.add_directory(tiny_adapter_factory("a"), name="corrupt")
    damage_blob(reg, info.weights_sha256, "corrupt")
    with pytest.raises(IntegrityError, match=info.weights_sha256[:12]):
        reg.fetch("corrupt")
    report = reg.doctor()
    assert not report.ok and any("corrupt" in p for p in report.problems)


def test_a_blob_deleted_behind_the_registrys_back(reg, tiny_adapter_factory):
    """Fetch names the missing digest; doctor reports it and restores it from an intact fetched copy."""
    info = reg.add_directory(tiny_adapter_factory("a"), name="gone")
    fetched = reg.fetch("gone")
    damage_blob(reg, info.weights_sha256, "delete")
    with pytest.raises(IntegrityError, match=f"{info.weights_sha256[:12]} is missing"):
        reg.load_weights("gone")
    report = reg.doctor()
    assert any(f"sha256:{info.weights_sha256[:12]} missing" in p for p in report.problems)
    assert any("restored from the fetch cache" in r for r in reg.doctor(repair=True).repaired)
    assert reg.doctor().ok and reg.load_weights("gone")[0].keys()
    assert (fetched / "adapter_model.safetensors").exists()


def test_fetch_rewrites_a_tampered_cached_copy(reg, tiny_adapter_factory):
    info = reg.add_directory(tiny_adapter_factory("a"), name="cached")
    path = reg.fetch("cached")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(b"tampered")
    path = reg.fetch("cached")
    from registry.blobs import sha256_file

    assert sha256_file(path / "adapter_model.safetensors") == info.weights_sha256


def test_search_finds_the_matching_task(reg, tiny_adapter_factory):
    reg.add_directory(tiny_adapter_factory("m", seed=1), name="math", task="add", prompts=MATH_PROMPTS)
    reg.add_directory(tiny_adapter_factory("r", seed=2), name="reverse", task="reverse", prompts=REVERSE_PROMPTS)
    hits = reg.search("What is 30 plus 4?", k=2)
    assert [h.adapter.name for h in hits] == ["math", "reverse"]
    assert hits[0].score > hits[1].score
    assert reg.search(["Reverse 'house'.", "Spell 'tree' backwards."], k=1)[0].adapter.name == "reverse"
    excluded = reg.search("What is 30 plus 4?", k=2, exclude_tasks=["add"])
    assert [h.adapter.name for h in excluded] == ["reverse"]
    assert reg.search("What is 30 plus 4?", k=5, kind="generated") == []
    with pytest.raises(RegistryError):
        reg.search("x", k=0)


def test_remove_keeps_lineage_and_updates_index(reg, tiny_adapter_factory):
    parent = reg.add_directory(tiny_adapter_factory("p", seed=1), name="parent", prompts=MATH_PROMPTS)
    state_dict, config = reg.load_weights("parent")
    child = reg.add_weights("child", state_dict, config, kind="composed", parents=[("parent", 1.0)],
                            recipe={"strategy": "selection"}, prompts=MATH_PROMPTS)
    assert child.parents == [{"ref": "parent@1", "weight": 1.0}]
    reg.set_alias("parent@1", "prod")
    reg.remove("parent@1")
    with pytest.raises(NotFound):
        reg.resolve("parent")
    with pytest.raises(NotFound):
        reg.resolve("parent@prod")
    assert reg.resolve("child").parents == [{"ref": "parent@1", "weight": 1.0}]
    assert [h.adapter.name for h in reg.search(MATH_PROMPTS[0], k=5)] == ["child"]
    assert reg.blobs.exists(child.weights_sha256)  # still used by the child
    assert reg.doctor().ok


def test_crash_before_commit_leaves_nothing_visible(reg, tiny_adapter_factory, monkeypatch):
    def crash(row):
        raise RuntimeError("power cut")

    monkeypatch.setattr(reg, "_insert_new_version", crash)
    with pytest.raises(RuntimeError):
        reg.add_directory(tiny_adapter_factory("a"), name="halfway", prompts=MATH_PROMPTS)
    monkeypatch.undo()
    assert reg.list_adapters() == []
    assert reg.search(MATH_PROMPTS[0], k=3) == []
    report = reg.doctor()
    assert any("unreferenced blob" in p for p in report.problems)
    assert reg.doctor(repair=True).repaired and reg.doctor().ok
    assert reg.blobs.all_digests() == set()


def test_index_lost_after_commit_is_caught_up(reg, tiny_adapter_factory):
    from registry.store import Registry

    reg.add_directory(tiny_adapter_factory("a"), name="math", prompts=MATH_PROMPTS)
    (reg.home / "index" / "adapters.faiss").unlink()
    assert not reg.doctor().ok
    assert reg.doctor(repair=True).repaired
    assert reg.doctor().ok
    # A second process that added behind our back: a fresh open catches the index up from SQL.
    other = Registry.open()
    other.add_directory(tiny_adapter_factory("b", seed=5), name="reverse", prompts=REVERSE_PROMPTS)
    other.close()
    (reg.home / "index" / "adapters.json").write_text(json.dumps({"dim": 1}))  # stale sidecar
    fresh = Registry.open()
    assert fresh.search(REVERSE_PROMPTS[0], k=1)[0].adapter.name == "reverse"
    fresh.close()


def test_artifacts_are_versioned(reg):
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    first = reg.add_artifact("gen", "generator-dnd", tensors, {"config": {"a": 1}})
    second = reg.add_artifact("gen", "generator-dnd", tensors, {"config": {"a": 2}})
    assert (first.version, second.version) == (1, 2)
    loaded, info = reg.load_artifact("gen@1")
    assert torch.equal(loaded["w"], tensors["w"]) and info.meta == {"config": {"a": 1}}
    assert reg.latest_artifact("generator").ref == "gen@2"
    assert reg.doctor().ok


def test_export_vllm_layout(reg, tiny_adapter_factory, tmp_path):
    reg.add_directory(tiny_adapter_factory("a", seed=1), name="alpha")
    reg.add_directory(tiny_adapter_factory("b", seed=2), name="beta")
    reg.set_alias("alpha@1", "prod")
    root = tmp_path / "loras"
    reg.export_vllm(root, ["alpha@prod", "beta"])
    for name in ("alpha", "beta"):
        config = json.loads((root / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"]
        assert (root / name / "adapter_model.safetensors").exists()
    reg.add_directory(tiny_adapter_factory("c", seed=3), name="alpha")
    reg.export_vllm(root, ["alpha"])  # replaced in place
    assert json.loads((root / "alpha" / "registry.json").read_text())["ref"] == "alpha@2"
    assert sorted(p.name for p in root.iterdir()) == ["alpha", "beta"]


def test_large_index_uses_hnsw_and_filters(tmp_path):
    from registry import index as index_module

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(1, 301)
    old = index_module.HNSW_THRESHOLD
    index_module.HNSW_THRESHOLD = 100
    try:
        index = index_module.AdapterIndex(tmp_path, 8, "enc")
        index.rebuild(ids[:50], vectors[:50])
        assert index.kind == "flat"
        index.add(ids[50:], vectors[50:])  # grows past the threshold
        assert index.kind == "hnsw"
        _, found = index.search(vectors[10:11], 1)
        assert found[0, 0] == 11
        index.remove([11])
        _, found = index.search(vectors[10:11], 3)
        assert 11 not in found[0]
        _, found = index.search(vectors[10:11], 3, allowed_ids=[200, 201, 11])
        assert set(found[0]) <= {200, 201}
        index.save()
        again = index_module.AdapterIndex(tmp_path, 8, "enc")
        assert again.load() and again.tombstones == {11} and len(again.ids()) == 299
    finally:
        index_module.HNSW_THRESHOLD = old
