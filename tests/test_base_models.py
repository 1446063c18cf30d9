"""Base models: the tiny llama by path, fingerprints, linear shapes, errors, and the real SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from registry import base_models
from registry.base_models import (
    DEFAULT_BASE,
    BaseModelError,
    base_fingerprint,
    base_model_id,
    linear_module_shapes,
    load_base,
    load_base_config,
    resolve_base_dir,
)


def test_load_tiny_by_path(tiny_base_dir):
    model, tokenizer = load_base(tiny_base_dir, device="cpu")
    assert model.config.num_hidden_layers == 2 and not model.training
    assert tokenizer.pad_token is not None
    again, _ = load_base(str(tiny_base_dir), device="cpu")
    assert again is model  # cached per process
    fresh, _ = load_base(tiny_base_dir, device="cpu", cached=False)
    assert fresh is not model


def test_fingerprint_is_stable_and_architectural(tiny_base_dir):
    config = load_base_config(tiny_base_dir)
    first = base_fingerprint(config)
    assert first == base_fingerprint(load_base_config(str(tiny_base_dir))) == base_fingerprint(tiny_base_dir)
    assert len(first) == 64
    config.rope_theta = 1234.0  # not an architecture field
    assert base_fingerprint(config) == first
    config.num_hidden_layers = 3
    assert base_fingerprint(config) != first


def test_linear_shapes_match_the_real_model(tiny_base_dir, tiny_base):
    shapes = linear_module_shapes(load_base_config(tiny_base_dir))
    real = {name: (m.out_features, m.in_features) for name, m in tiny_base.named_modules()
            if isinstance(m, torch.nn.Linear)}
    assert shapes == real
    assert shapes["model.layers.0.self_attn.k_proj"] == (16, 32)
    assert shapes["model.layers.1.mlp.down_proj"] == (32, 48)


def test_base_model_id(tiny_base_dir):
    assert base_model_id(None) == DEFAULT_BASE
    assert base_model_id(DEFAULT_BASE) == DEFAULT_BASE
    assert base_model_id(tiny_base_dir) == str(tiny_base_dir.resolve())


def test_errors_are_one_line(tmp_path):
    with pytest.raises(BaseModelError, match="base model not found"):
        resolve_base_dir(tmp_path / "missing")
    with pytest.raises(BaseModelError, match="no config.json"):
        resolve_base_dir(tmp_path)
    bert = tmp_path / "bert"
    bert.mkdir()
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertModel"]).save_pretrained(bert)
    with pytest.raises(BaseModelError, match="not a causal language model") as info:
        load_base(bert)
    assert "\n" not in str(info.value)


def test_default_uses_the_model_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("REGISTRY_MODELS_DIR", str(tmp_path / "models"))
    assert base_models.models_cache_dir() == tmp_path / "models"


@pytest.mark.slow
def test_smollm2_default_answers_france():
    pytest.importorskip("gguf")
    try:
        base_models.default_gguf_path()
    except BaseModelError as exc:
        pytest.skip(str(exc))
    model, tokenizer = load_base(None, device="cpu")
    config = load_base_config(None)
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    assert json.loads((resolve_base_dir() / "registry_base.json").read_text())["base_model_id"] == DEFAULT_BASE
    assert base_model_id(resolve_base_dir()) == DEFAULT_BASE
    shapes = linear_module_shapes(config)
    assert shapes["model.layers.0.self_attn.k_proj"] == (192, 576)
    assert shapes["model.layers.29.mlp.down_proj"] == (576, 1536)

    from harvest.evaluate import generate

    (answer,), _ = generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=20)
    assert "Paris" in answer
