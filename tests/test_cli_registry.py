"""The registry CLI end to end, and every bad input it must refuse without writing anything."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


def registry_state(home: Path) -> tuple:
    """What a reader could see: adapters, blobs, cached fetches."""
    from registry.store import Registry

    with Registry.open(home) as reg:
        adapters = [a.ref for a in reg.list_adapters(include_removed=True)]
        blobs = sorted(reg.blobs.all_digests())
    fetched = sorted(p.name for p in (home / "fetched").glob("*")) if (home / "fetched").exists() else []
    return adapters, blobs, fetched


def test_cli_add_list_show_search_fetch_alias_rm(cli, tiny_adapter_factory, tmp_path, registry_home, database_url):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 plus 2?\nAdd 5 and 6.\n")
    code, out, err = cli("add", tiny_adapter_factory("a"), "--name", "math", "--task", "add",
                         "--prompts", prompts, "--tag", "demo", "--json")
    assert code == 0, err
    added = json.loads(out)
    assert added["ref"] == "math@1" and added["tags"] == ["demo"]
    code, out, _ = cli("list", "--json", "--tag", "demo")
    assert [a["ref"] for a in json.loads(out)] == ["math@1"]
    code, out, _ = cli("search", "What is 9 plus 1?", "--json", "-k", "3")
    assert json.loads(out)[0]["ref"] == "math@1"
    assert cli("alias", "math@1", "prod")[0] == 0
    code, out, _ = cli("show", "math@prod", "--json")
    assert json.loads(out)["prompts"] == ["What is 2 plus 2?", "Add 5 and 6."]
    code, out, _ = cli("fetch", f"sha256:{added['digest'][:16]}")
    assert code == 0 and (Path(out.strip()) / "adapter_config.json").exists()
    code, out, _ = cli("fetch", "math", "--to", tmp_path / "out", "--json")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    code, out, _ = cli("export", "math@prod", "--vllm", tmp_path / "vllm")
    assert code == 0 and (tmp_path / "vllm" / "math" / "adapter_config.json").exists()
    assert cli("doctor")[0] == 0
    assert cli("rm", "math@1")[0] == 0
    code, _, err = cli("show", "math")
    assert code == 1 and "no adapter matches math" in err


def _no_config(tmp_path, factory):
    path = factory("a")
    (path / "adapter_config.json").unlink()
    return path


def _pickled(tmp_path, factory):
    path = factory("a")
    (path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (path / "adapter_model.bin").write_bytes(pickle.dumps(Exploit()))
    return path


def _truncated(tmp_path, factory):
    path = factory("a")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return path


def _malformed(tmp_path, factory):
    path = factory("a")
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    return path


def _nan(tmp_path, factory):
    path = factory("a")
    weights = load_file(path / "adapter_model.safetensors")
    key = sorted(weights)[0]
    weights[key][0, 0] = float("nan")
    save_file(weights, path / "adapter_model.safetensors")
    return path


def _inf(tmp_path, factory):
    path = factory("a")
    weights = load_file(path / "adapter_model.safetensors")
    key = sorted(weights)[-1]
    weights[key][0, 0] = float("inf")
    save_file(weights, path / "adapter_model.safetensors")
    return path


def _wrong_shape(tmp_path, factory):
    path = factory("a")
    weights = load_file(path / "adapter_model.safetensors")
    key = next(k for k in sorted(weights) if "lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0], 40)  # the base has 32 input features
    save_file(weights, path / "adapter_model.safetensors")
    return path


def _unknown_base(tmp_path, factory):
    path = factory("a")
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-model")
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


BAD_ADAPTERS = {
    "no PEFT config": (_no_config, "no adapter_config.json"),
    "pickled weights": (_pickled, "pickles are refused"),
    "truncated safetensors": (_truncated, "not a readable safetensors file"),
    "malformed safetensors": (_malformed, "not a readable safetensors file"),
    "NaN weights": (_nan, "NaN or Inf"),
    "Inf weights": (_inf, "NaN or Inf"),
    "shape does not fit the base": (_wrong_shape, "but base model"),
    "unknown base model": (_unknown_base, "no-such-model"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_refused_and_nothing_is_written(case, cli, tiny_adapter_factory, tmp_path, registry_home,
                                                         database_url):
    make, message = BAD_ADAPTERS[case]
    cli("add", tiny_adapter_factory("good"), "--name", "good")
    before = registry_state(registry_home)
    code, out, err = cli("add", make(tmp_path, tiny_adapter_factory), "--name", "bad")
    assert code != 0
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert registry_state(registry_home) == before
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("name", ["a/b", "..", "x..y", "bad\x07name", "-lead", "tab\tname"])
def test_bad_names_are_refused(name, cli, tiny_adapter_factory, registry_home):
    code, _, err = cli("add", tiny_adapter_factory("a"), "--name", name)
    assert code == 1 and "invalid name" in err and len(err.strip().splitlines()) == 1
    assert registry_state(registry_home)[0] == []


@pytest.mark.parametrize("ref", ["missing", "missing@2", "missing@prod", "sha256:0123456789abcdef", "sha256:zz", "a/b@1"])
def test_unknown_or_malformed_refs(ref, cli):
    for command in ("show", "fetch"):
        code, _, err = cli(command, ref)
        assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_empty_prompts_file_is_refused(cli, tiny_adapter_factory, tmp_path, registry_home):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n  \n")
    code, _, err = cli("add", tiny_adapter_factory("a"), "--name", "x", "--prompts", prompts)
    assert code == 1 and "holds no prompts" in err
    assert registry_state(registry_home) == ([], [], [])
    code, _, err = cli("search", "--prompts", prompts)
    assert code == 1 and "holds no prompts" in err


def test_doctor_repairs_and_reports(cli, tiny_adapter_factory, registry_home):
    cli("add", tiny_adapter_factory("a"), "--name", "x", "--prompts", __file__)
    shutil.rmtree(registry_home / "index")
    code, out, _ = cli("doctor", "--json")
    assert code == 1 and not json.loads(out)["ok"]
    assert cli("doctor", "--repair")[0] == 0
    assert cli("doctor")[0] == 0
