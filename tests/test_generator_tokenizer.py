"""The LoRA tokenizer: layouts from state-dict shapes, exact round trips, normalisation."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from generator.tokenizer import (LoraLayout, TokenNormalizer, layout_from_state_dict,
                                 natural_sort_key, stack_token_grids, state_dict_to_tokens,
                                 suggest_chunk_width, token_mask, tokens_to_state_dict)

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_SHAPES = {  # (in, out) in the tiny llama: hidden 32, GQA k/v out 16, intermediate 48
    "q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
    "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32),
}


def adapter_state_dict(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_round_trip(state_dict, layout):
    tokens = state_dict_to_tokens(state_dict, layout)
    assert tuple(tokens.shape) == layout.shape
    back = tokens_to_state_dict(tokens, layout)
    assert sorted(back) == sorted(state_dict)
    for key, value in state_dict.items():
        assert back[key].shape == value.shape, key
        torch.testing.assert_close(back[key], value.float(), rtol=0, atol=0)
    # padding really is padding: only real weights are non-zero
    assert int(token_mask(layout).sum()) == layout.num_parameters
    assert torch.all(tokens[~token_mask(layout)] == 0)


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_round_trip_all_modules_tiny_llama(tiny_adapter_factory, rank):
    directory = tiny_adapter_factory(f"r{rank}", rank=rank, seed=rank, targets=ALL_MODULES)
    state_dict = adapter_state_dict(directory)
    layout = layout_from_state_dict(state_dict)
    assert layout.chunk_width == 16  # gcd(32, 16, 48)
    assert layout.token_height == rank
    per_layer = sum(in_ // 16 + out // 16 for in_, out in TINY_SHAPES.values())
    assert layout.num_tokens == 2 * per_layer
    by_name = {m.module_name: m for m in layout.modules if ".layers.0." in m.prefix}
    for name, (in_features, out_features) in TINY_SHAPES.items():
        assert (by_name[name].in_features, by_name[name].out_features) == (in_features, out_features)
    assert layout.target_modules == sorted(ALL_MODULES)
    assert_round_trip(state_dict, layout)


@pytest.mark.parametrize("chunk_width", [5, 12, 64])
def test_round_trip_with_padded_chunks(tiny_adapter_factory, chunk_width):
    directory = tiny_adapter_factory("padded", rank=4, targets=ALL_MODULES)
    state_dict = adapter_state_dict(directory)
    layout = layout_from_state_dict(state_dict, chunk_width=chunk_width)
    assert layout.chunk_width == chunk_width
    assert layout.num_tokens > layout.num_parameters // (4 * chunk_width)  # padding adds tokens
    assert_round_trip(state_dict, layout)


def test_round_trip_subset_of_modules(tiny_adapter_factory):
    state_dict = adapter_state_dict(tiny_adapter_factory("qv", rank=8, targets=("q_proj", "v_proj")))
    layout = layout_from_state_dict(state_dict)
    assert layout.target_modules == ["q_proj", "v_proj"]
    assert [m.module_name for m in layout.modules] == ["q_proj", "v_proj", "q_proj", "v_proj"]
    assert_round_trip(state_dict, layout)


def test_round_trip_mixed_ranks(tiny_base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(ALL_MODULES), task_type="CAUSAL_LM",
                        rank_pattern={"q_proj": 4, "down_proj": 16})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "mixed", safe_serialization=True)
    state_dict = adapter_state_dict(tmp_path / "mixed")
    layout = layout_from_state_dict(state_dict)
    assert layout.token_height == 16
    assert {m.module_name: m.rank for m in layout.modules} == {
        "q_proj": 4, "k_proj": 8, "v_proj": 8, "o_proj": 8, "gate_proj": 8, "up_proj": 8, "down_proj": 16}
    assert_round_trip(state_dict, layout)


def synthetic_state_dict(seed: int = 0, adapter: str = "") -> dict[str, torch.Tensor]:
    """A non-llama key pattern with layers 0..11, odd dims and two ranks."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(12):
        for module, rank, in_features, out_features in (("mixer.in_proj", 6, 40, 72), ("mlp.fc2", 3, 100, 40)):
            prefix = f"backbone.blocks.{layer}.{module}"
            state[f"{prefix}.lora_A{adapter}.weight"] = torch.randn(rank, in_features, generator=generator)
            state[f"{prefix}.lora_B{adapter}.weight"] = torch.randn(out_features, rank, generator=generator)
    return state


def test_synthetic_keys_sorted_numerically_and_round_trip():
    state_dict = synthetic_state_dict()
    layout = layout_from_state_dict(state_dict)
    layers = [int(m.prefix.split(".")[2]) for m in layout.modules]
    assert layers == sorted(layers) and layers[-1] == 11
    assert [m.module_name for m in layout.modules[:2]] == ["in_proj", "fc2"]
    assert layout.chunk_width == 64  # gcd(40, 72, 100) = 4 is too narrow: falls back to 64
    assert layout.token_height == 6
    assert_round_trip(state_dict, layout)


def test_in_memory_adapter_names_are_supported():
    state_dict = synthetic_state_dict(adapter=".default")
    layout = layout_from_state_dict(state_dict, chunk_width=8)
    assert layout.modules[0].a_key.endswith(".lora_A.default.weight")
    assert_round_trip(state_dict, layout)


def test_layout_is_independent_of_key_order():
    state_dict = synthetic_state_dict()
    items = list(state_dict.items())
    random.Random(1).shuffle(items)
    assert layout_from_state_dict(dict(items)) == layout_from_state_dict(state_dict)
    assert layout_from_state_dict(dict(items)).fingerprint == layout_from_state_dict(state_dict).fingerprint


def test_natural_sort_key_orders_numbers():
    keys = ["a.layers.10.q", "a.layers.2.q", "a.layers.1.v", "a.layers.1.q"]
    assert sorted(keys, key=natural_sort_key) == ["a.layers.1.q", "a.layers.1.v", "a.layers.2.q", "a.layers.10.q"]


def test_layout_json_round_trip_and_fingerprint():
    layout = layout_from_state_dict(synthetic_state_dict())
    data = json.loads(json.dumps(layout.to_dict()))
    again = LoraLayout.from_dict(data)
    assert again == layout and again.fingerprint == layout.fingerprint
    assert len(layout.fingerprint) == 64
    assert LoraLayout.from_json(layout.to_json()).fingerprint == layout.fingerprint
    # a different chunk width is a different layout
    assert layout_from_state_dict(synthetic_state_dict(), chunk_width=32).fingerprint != layout.fingerprint
    # a tampered layout is refused
    data["modules"][0]["rank"] = 5
    with pytest.raises(ValueError, match="fingerprint"):
        LoraLayout.from_dict(data)


def test_shape_mismatch_and_unsupported_keys_raise():
    state_dict = synthetic_state_dict()
    layout = layout_from_state_dict(state_dict)
    key = layout.modules[0].a_key
    bad = {**state_dict, key: torch.randn(6, 41)}
    with pytest.raises(ValueError, match="do not match"):
        state_dict_to_tokens(bad, layout)
    with pytest.raises(ValueError, match="not LoRA"):
        layout_from_state_dict({**state_dict, "backbone.blocks.0.mixer.in_proj.lora_magnitude_vector": torch.ones(72)})
    with pytest.raises(ValueError, match="no matching"):
        layout_from_state_dict({key: state_dict[key]})
    with pytest.raises(ValueError, match="do not match layout"):
        tokens_to_state_dict(torch.zeros(1, 2, 3), layout)


def test_suggest_chunk_width_for_smollm2_shapes():
    shapes = {"q_proj": (576, 576), "k_proj": (576, 192), "gate_proj": (576, 1536), "down_proj": (1536, 576)}
    state = {}
    for name, (in_features, out_features) in shapes.items():
        state[f"model.layers.0.{name}.lora_A.weight"] = torch.zeros(8, in_features)
        state[f"model.layers.0.{name}.lora_B.weight"] = torch.zeros(out_features, 8)
    assert suggest_chunk_width(state) == 192
    assert suggest_chunk_width(state, max_width=100) == 96


def test_normalizer_fits_training_grids_and_inverts(tmp_path):
    layout = layout_from_state_dict(synthetic_state_dict(), chunk_width=16)
    grids = stack_token_grids([synthetic_state_dict(seed) for seed in range(4)], layout)  # (4, T, h, w)
    grids = grids * torch.linspace(0.01, 3.0, layout.num_tokens)[None, :, None, None] + 0.5 * token_mask(layout)
    mask = token_mask(layout)
    normalizer = TokenNormalizer.fit(grids, mask)
    normalised = normalizer.normalize(grids)
    assert torch.all(normalised[:, ~mask] == 0)
    counts = mask.sum(dim=(1, 2)) * 4
    means = normalised.sum(dim=(0, 2, 3)) / counts
    stds = (normalised.pow(2).sum(dim=(0, 2, 3)) / counts).sqrt()
    torch.testing.assert_close(means, torch.zeros_like(means), atol=1e-5, rtol=0)
    torch.testing.assert_close(stds, torch.ones_like(stds), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalizer.denormalize(normalised), grids, atol=1e-5, rtol=1e-5)

    save_file(normalizer.state_dict(), str(tmp_path / "normalizer.safetensors"))
    loaded = TokenNormalizer.from_state_dict(load_file(str(tmp_path / "normalizer.safetensors")))
    torch.testing.assert_close(loaded.denormalize(normalised[0]), grids[0], atol=1e-5, rtol=1e-5)
    # and back to weights through the layout
    back = tokens_to_state_dict(loaded.denormalize(normalised[1]), layout)
    torch.testing.assert_close(state_dict_to_tokens(back, layout), grids[1], atol=1e-5, rtol=1e-5)


def test_normalizer_accepts_a_list_without_mask():
    grids = [torch.full((3, 2, 4), float(value)) for value in (1.0, 3.0)]
    grids[1][0, 0, 0] = 5.0  # one element differs: element centring tracks it, token centring does not
    by_element = TokenNormalizer.fit(grids)
    assert by_element.mean.shape == (3, 2, 4) and by_element.mask is None
    assert by_element.mean[0, 0, 0] == 3.0 and by_element.mean[2, 1, 3] == 2.0
    torch.testing.assert_close(by_element.std, torch.tensor([(22 / 16) ** 0.5, 1.0, 1.0]))
    torch.testing.assert_close(by_element.denormalize(torch.zeros(3, 2, 4)), by_element.mean)

    by_token = TokenNormalizer.fit(grids, center="token")
    assert by_token.mean.shape == (3,)
    torch.testing.assert_close(by_token.mean, torch.tensor([2.0 + 2.0 / 16, 2.0, 2.0]))
    torch.testing.assert_close(by_token.normalize(grids[1])[1], torch.ones(2, 4))
    torch.testing.assert_close(by_token.denormalize(by_token.normalize(grids[1])), grids[1])
    with pytest.raises(ValueError, match="center"):
        TokenNormalizer.fit(grids, center="row")


@pytest.mark.parametrize("center", ["element", "token"])
def test_normalizer_fit_over_per_task_stacks_equals_the_fit_over_their_concatenation(center):
    # the generators fit task by task (K_i, T, h, w) stacks so the training set is never copied whole
    generator = torch.Generator().manual_seed(0)
    stacks = [torch.randn(k, 3, 2, 4, generator=generator) * (i + 1) for i, k in enumerate((3, 1, 2))]
    mask = torch.ones(3, 2, 4, dtype=torch.bool)
    mask[2, 1, 2:] = False
    chunked = TokenNormalizer.fit(stacks, mask, center=center)
    whole = TokenNormalizer.fit(torch.cat(stacks), mask, center=center)
    torch.testing.assert_close(chunked.mean, whole.mean)
    torch.testing.assert_close(chunked.std, whole.std)
    # and against the definition: per-token std of the masked, centred entries
    flat = torch.cat(stacks)
    centred = flat - (flat.mean(0) if center == "element" else
                      (flat * mask).sum((0, 2, 3))[:, None, None] / (mask.sum((1, 2)) * 6)[:, None, None])
    expected = ((centred * mask) ** 2).sum((0, 2, 3)) / (mask.sum((1, 2)) * 6)
    torch.testing.assert_close(chunked.std, expected.sqrt())
    with pytest.raises(ValueError, match="one \\(T, h, w\\) shape"):
        TokenNormalizer.fit([stacks[0], torch.zeros(1, 3, 2, 5)])
