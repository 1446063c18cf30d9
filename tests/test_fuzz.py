"""Hostile input (issue 17): names and REFs (property tests), adapter directories and REFs on the CLI,
and HTTP paths and bodies. Every refusal is one error line on the CLI and a 4xx over HTTP: never a
traceback, never a 500, never an accepted bad value."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.errors import InvalidName
from registry.refs import MAX_VERSION, Ref, parse_ref, validate_alias, validate_name

SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
hostile_text = st.one_of(
    st.text(max_size=140),
    st.text(alphabet="abc09._-@/\\\n\r\t\x00 ²١:", max_size=40),
    st.from_regex(SAFE, fullmatch=True).map(lambda s: s + "\n"),
)


@given(hostile_text)
@settings(max_examples=400, deadline=None)
def test_validate_name_accepts_exactly_the_safe_names(text):
    safe = bool(SAFE.fullmatch(text)) and ".." not in text
    try:
        assert validate_name(text) == text and safe
    except InvalidName as err:
        assert not safe
        assert "\n" not in str(err)  # one line, control characters escaped


@given(hostile_text)
@settings(max_examples=400, deadline=None)
def test_parse_ref_returns_a_ref_or_one_error_line(text):
    try:
        ref = parse_ref(text)
    except InvalidName as err:
        assert "\n" not in str(err)
        return
    assert isinstance(ref, Ref)
    assert parse_ref(str(ref)) == ref  # round trip
    if ref.version is not None:
        assert 0 <= ref.version <= MAX_VERSION
        assert text.strip().rpartition("@")[2].isascii()  # "good@١" is not "good@1"
    if ref.name is not None:
        assert validate_name(ref.name) == ref.name
    if ref.alias is not None:
        assert validate_alias(ref.alias) == ref.alias


@pytest.mark.parametrize("ref", ["good@99999999999999999999", "good@²", "good@١", "good@1\n", "evil\n",
                                 "sha256:zz", "@", "good@@1", "../etc", "good@" + "9" * 400])
def test_bad_refs_on_the_cli_are_one_error_line(ref, cli):
    code, _out, err = cli("show", ref)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    text = path.read_text()
    config = json.loads(text)
    raw = {}
    for key, value in changes.items():
        if isinstance(value, RawJSON):
            raw[key] = value.text
            value = f"@@{key}@@"
        config[key] = value
    text = json.dumps(config)
    for key, literal in raw.items():
        text = text.replace(f'"@@{key}@@"', literal)
    path.write_text(text)


class RawJSON:
    def __init__(self, text: str):
        self.text = text


@pytest.mark.parametrize("changes, message", [
    ({"r": RawJSON("1e999")}, "r must be an integer"),
    ({"r": "four"}, "r must be an integer"),
    ({"r": None}, "r must be an integer"),
    ({"r": True}, "r must be an integer"),
    ({"lora_alpha": "eight"}, "lora_alpha must be a finite number"),
    ({"lora_alpha": RawJSON("-1e999")}, "lora_alpha must be a finite number"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    ({"target_modules": "../../etc/passwd"}, "are not linear layers"),
    ({"target_modules": ["q_proj", "v_proj", "evil\n"]}, "are not linear layers"),
    ({"target_modules": 7}, "target_modules must be a list"),
    ({"rank_pattern": [1]}, "rank_pattern must be an object"),
])
def test_bad_adapter_configs_are_one_error_line(changes, message, cli, tiny_adapter_factory, registry_home):
    adapter = tiny_adapter_factory("bad")
    _edit_config(adapter, **changes)
    code, _out, err = cli("add", adapter, "--name", "bad")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    code, out, _ = cli("list", "--json")
    assert code == 0 and json.loads(out) == []


def test_integer_weights_and_bad_names_are_refused(cli, tiny_adapter_factory, registry_home, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    adapter = tiny_adapter_factory("ints")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[first] = tensors[first].to(torch.int32)
    save_file(tensors, str(weights))
    code, _, err = cli("add", adapter, "--name", "ints")
    assert code == 1 and "must be floating point" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("add", tiny_adapter_factory("ok"), "--name", "evil\n")
    assert code == 1 and "invalid name" in err and len(err.strip().splitlines()) == 1, err
    huge = tmp_path / "huge.txt"
    huge.write_text("x" * 10_000 + "\n")
    code, _, err = cli("add", tiny_adapter_factory("ok2"), "--name", "ok", "--prompts", huge)
    assert code == 1 and "the limit is 8,192" in err, err


@pytest.fixture
def http(reg, tiny_adapter_factory):
    from fastapi.testclient import TestClient

    from registry.http.app import create_app

    reg.add_directory(tiny_adapter_factory("g"), name="good", prompts=["add two numbers"])
    with TestClient(create_app(reg, token="t0ken"), raise_server_exceptions=False) as client:
        yield client


@given(ref=hostile_text)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_http_refs_never_500(http, ref):
    from urllib.parse import quote

    for path in (f"/v1/adapters/{quote(ref, safe='')}", f"/v1/adapters/{quote(ref, safe='')}/prompts"):
        response = http.get(path)
        assert response.status_code < 500, (path, response.text)
        if response.status_code >= 400:
            assert "error" in response.json()


@pytest.mark.parametrize("ref", ["good@99999999999999999999", "good@²", "good@١"])
def test_http_bad_versions_are_400(http, ref):
    from urllib.parse import quote

    response = http.get(f"/v1/adapters/{quote(ref, safe='')}")
    assert response.status_code == 400, response.text


# finite floats: NaN and Infinity are not JSON, and the test client refuses to encode them (the server never sees them)
@given(body=st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.integers() | st.text(max_size=20),
                         lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=4),
                         max_leaves=12),
       alias=hostile_text)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_http_write_bodies_never_500(http, body, alias):
    from urllib.parse import quote

    headers = {"Authorization": "Bearer t0ken"}
    for method, path in (("POST", "/v1/generate"), ("POST", "/v1/compose"),
                         ("PUT", f"/v1/adapters/good/aliases/{quote(alias, safe='')}")):
        response = http.request(method, path, json=body, headers=headers)
        assert response.status_code < 500, (method, path, body, response.text)
    search = http.get("/v1/search", params={"q": alias or "x", "k": str(body)[:10]})
    assert search.status_code < 500, search.text
