"""The hyper-convolutional decoder: computed shape cascades, output shapes, gradients."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from generator.dnd import DnDConfig, DnDDecoder, HyperConvLayer, feature_shapes, geometric_steps
from generator.tokenizer import layout_from_state_dict


@pytest.fixture
def tiny_layout(tiny_adapter_factory):
    directory = tiny_adapter_factory("qv", rank=4, targets=("q_proj", "v_proj"))
    return layout_from_state_dict(load_file(str(directory / "adapter_model.safetensors")))


SMOLLM2_R8 = dict(n_prompts=16, prompt_tokens=64, embed_dim=384, tokens=1590, token_height=8, token_width=192)


@pytest.mark.parametrize("overrides", [
    {},
    {"n_layers": 1},
    {"n_layers": 6, "hidden_tokens": None},
    {"tokens": 4770, "token_width": 64, "hidden_tokens": 32},
    {"n_prompts": 4, "prompt_tokens": 8, "embed_dim": 32, "tokens": 14, "token_height": 4, "token_width": 16},
])
def test_feature_shapes_are_computed_from_ends(overrides):
    config = DnDConfig(**{**SMOLLM2_R8, **overrides})
    shapes = feature_shapes(config)
    assert len(shapes) == config.n_layers + 1
    assert shapes[0] == config.input_shape and shapes[-1] == config.output_shape
    for dim in range(3):  # each dim moves monotonically from start to end
        values = [shape[dim] for shape in shapes]
        assert values == sorted(values) or values == sorted(values, reverse=True)
    if config.hidden_tokens is not None and config.n_layers > 1:
        assert max(shape[0] for shape in shapes[:-1]) <= max(config.hidden_tokens, config.n_prompts)


def test_geometric_steps():
    assert geometric_steps(16, 256, 4) == [16, 32, 64, 128, 256]
    assert geometric_steps(64, 8, 3) == [64, 32, 16, 8]
    assert geometric_steps(5, 9, 0) == [9]


def test_decoder_output_shape_for_tiny_layout(tiny_layout):
    torch.manual_seed(0)
    config = DnDConfig.from_layout(tiny_layout, n_prompts=4, prompt_tokens=8, embed_dim=32,
                                   n_layers=3, hidden_tokens=8)
    assert config.output_shape == tiny_layout.shape == (14, 4, 16)
    assert config.layout_fingerprint == tiny_layout.fingerprint
    model = DnDDecoder(config)
    out = model(torch.randn(2, 4, 8, 32))
    assert out.shape == (2, 14, 4, 16)
    assert torch.isfinite(out).all()
    single = model(torch.randn(4, 8, 32))
    assert single.shape == (14, 4, 16)
    with pytest.raises(ValueError, match="condition"):
        model(torch.randn(1, 5, 8, 32))


def test_output_depends_on_condition_and_all_parameters_get_gradients():
    torch.manual_seed(0)
    config = DnDConfig(n_prompts=4, prompt_tokens=8, embed_dim=32, tokens=20, token_height=4,
                       token_width=16, n_layers=3, hidden_tokens=8)
    model = DnDDecoder(config)
    a, b = torch.randn(2, 4, 8, 32).unbind(0)
    assert not torch.allclose(model(a), model(b))
    model(torch.randn(3, 4, 8, 32)).pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_hyperconv_layer_maps_each_dimension():
    layer = HyperConvLayer((4, 8, 32), (6, 5, 12), kernel=3)
    assert layer(torch.randn(2, 4, 8, 32)).shape == (2, 6, 5, 12)  # (B, N', L', C')


def test_explicit_shapes_override_and_are_validated():
    shapes = [(4, 8, 32), (8, 6, 24), (14, 4, 16)]
    config = DnDConfig(n_prompts=4, prompt_tokens=8, embed_dim=32, tokens=14, token_height=4,
                       token_width=16, n_layers=2, shapes=shapes)
    assert feature_shapes(config) == shapes
    assert DnDDecoder(config)(torch.randn(1, 4, 8, 32)).shape == (1, 14, 4, 16)
    with pytest.raises(ValueError, match="shapes must run"):
        feature_shapes(DnDConfig(n_prompts=4, prompt_tokens=8, embed_dim=32, tokens=15, token_height=4,
                                 token_width=16, shapes=shapes))
    with pytest.raises(ValueError, match="odd"):
        DnDConfig(**SMOLLM2_R8, kernel=4)


def test_config_json_round_trip():
    config = DnDConfig(n_prompts=16, prompt_tokens=64, embed_dim=384, tokens=14, token_height=4,
                       token_width=16, shapes=[(16, 64, 384), (14, 4, 16)], n_layers=1,
                       layout_fingerprint="ab" * 32)
    again = DnDConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert feature_shapes(again) == [(16, 64, 384), (14, 4, 16)]


def test_smollm2_r8_seven_module_decoder_is_small():
    """SmolLM2-135M, r=8 on q,k,v,o,gate,up,down, w=192: 30 layers x 53 tokens = 1590 tokens."""
    torch.manual_seed(0)
    config = DnDConfig(**SMOLLM2_R8)
    model = DnDDecoder(config)
    assert model.num_parameters() < 5_000_000
    with torch.no_grad():
        out = model(torch.randn(1, 16, 64, 384))
    assert out.shape == (1, 1590, 8, 192)
