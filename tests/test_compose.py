"""Composition of LoRA adapters: exact mixture, fusion formula, parity with PEFT's add_weighted_adapter."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval.compose import (
    CompositionError,
    LoraAdapter,
    compose_adapters,
    composed_delta_weights,
    load_adapter_dir,
    retrieval_weights,
    save_adapter_dir,
)


def random_adapter(rank: int, alpha: float, *, seed: int, modules=("q_proj", "v_proj"), layers=2, hidden=32,
                   kv_dim=16, use_rslora=False, base="tiny", name=None) -> LoraAdapter:
    """An in-memory adapter with PEFT keys for the tiny llama's shapes."""
    generator = torch.Generator().manual_seed(seed)
    out_dims = {"q_proj": hidden, "k_proj": kv_dim, "v_proj": kv_dim, "o_proj": hidden}
    state_dict = {}
    for layer in range(layers):
        for module in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state_dict[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.1
            state_dict[f"{prefix}.lora_B.weight"] = torch.randn(out_dims[module], rank, generator=generator) * 0.1
    return LoraAdapter(state_dict, rank=rank, alpha=alpha, use_rslora=use_rslora, base_model=base,
                       name=name or f"adapter-{seed}")


def exact_weighted_delta(adapters, weights) -> dict[str, torch.Tensor]:
    """Σ_i w_i s_i B_i A_i per module, computed directly."""
    modules = adapters[0].modules
    return {m: sum(w * a.scaling * (a.factors(m)[1] @ a.factors(m)[0]) for a, w in zip(adapters, weights))
            for m in modules}


def assert_deltas_close(ours: dict, reference: dict, atol=1e-5, rtol=1e-4):
    assert set(ours) == set(reference)
    for module in reference:
        torch.testing.assert_close(ours[module], reference[module], atol=atol, rtol=rtol, msg=module)


# --- LoraRetriever strategies ---------------------------------------------------------------------


def test_mixture_is_exact_weighted_delta_for_different_ranks():
    adapters = [random_adapter(2, 4, seed=1), random_adapter(4, 16, seed=2),
                random_adapter(8, 8, seed=3, use_rslora=True)]
    weights = retrieval_weights([0.9, 0.5, 0.1], mode="softmax", temperature=0.5)
    mixed = compose_adapters(adapters, weights, "mixture")
    assert mixed.rank == 14 and mixed.alpha == 14 and not mixed.use_rslora and mixed.scaling == 1.0
    assert mixed.target_modules == ["q_proj", "v_proj"]
    assert_deltas_close(composed_delta_weights(mixed), exact_weighted_delta(adapters, weights.tolist()))


def test_mixture_loads_in_peft_with_the_same_delta(tiny_base_dir, tiny_adapter_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = [load_adapter_dir(tiny_adapter_factory("a", rank=2, seed=1)),
                load_adapter_dir(tiny_adapter_factory("b", rank=6, seed=2, alpha=3))]
    mixed = compose_adapters(adapters, [0.7, 0.3], "mixture")
    directory = save_adapter_dir(mixed, tmp_path / "mixed")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), directory)
    expected = exact_weighted_delta(adapters, [0.7, 0.3])
    for module, delta in expected.items():
        layer = model.get_submodule(module)
        torch.testing.assert_close(layer.get_delta_weight("default"), delta, atol=1e-6, rtol=1e-5)


def test_fusion_averages_parameters():
    adapters = [random_adapter(4, 8, seed=1), random_adapter(4, 2, seed=2)]
    weights = [0.25, 0.75]
    fused = compose_adapters(adapters, weights, "fusion")
    assert fused.rank == 4 and fused.scaling == 1.0
    for module in adapters[0].modules:
        (a1, b1), (a2, b2) = adapters[0].factors(module), adapters[1].factors(module)
        s1, s2 = adapters[0].scaling, adapters[1].scaling
        expected = (0.25 * s1 * b1 + 0.75 * s2 * b2) @ (0.25 * a1 + 0.75 * a2)
        torch.testing.assert_close(fused.delta_weight(module), expected)


def test_fusion_with_equal_scalings_is_scaled_product_of_averages_and_not_a_delta_average():
    adapters = [random_adapter(4, 8, seed=1), random_adapter(4, 8, seed=2)]
    fused = compose_adapters(adapters, None, "fusion")  # uniform weights
    module = adapters[0].modules[0]
    (a1, b1), (a2, b2) = adapters[0].factors(module), adapters[1].factors(module)
    expected = 2.0 * ((b1 + b2) / 2) @ ((a1 + a2) / 2)
    torch.testing.assert_close(fused.delta_weight(module), expected)
    mixture_delta = exact_weighted_delta(adapters, [0.5, 0.5])[module]
    assert not torch.allclose(fused.delta_weight(module), mixture_delta, atol=1e-4)  # cross terms


def test_selection_returns_top_adapter_unchanged():
    adapters = [random_adapter(2, 4, seed=1), random_adapter(4, 8, seed=2, modules=("q_proj",))]
    chosen = compose_adapters(adapters, [0.2, 0.8], "selection")
    assert chosen.name == "adapter-2" and chosen.rank == 4 and chosen.alpha == 8
    assert chosen.state_dict.keys() == adapters[1].state_dict.keys()


def test_retrieval_weights():
    torch.testing.assert_close(retrieval_weights([3.0, 1.0, 0.0]), torch.full((3,), 1 / 3))
    soft = retrieval_weights([1.0, 0.0], mode="softmax", temperature=0.5)
    torch.testing.assert_close(soft, torch.tensor([math.exp(2), 1.0]) / (math.exp(2) + 1))
    sharp = retrieval_weights([1.0, 0.0], mode="softmax", temperature=0.01)
    assert sharp[0] > 0.999
    with pytest.raises(ValueError, match="temperature"):
        retrieval_weights([1.0], mode="softmax", temperature=0)
    with pytest.raises(ValueError, match="unknown weight mode"):
        retrieval_weights([1.0], mode="max")


# --- parity with PEFT add_weighted_adapter --------------------------------------------------------


@pytest.fixture
def peft_with_adapters(tiny_base_dir, tiny_adapter_factory):
    """Factory: (specs) -> (PeftModel with adapters a0, a1, ... loaded, [LoraAdapter...])."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def build(specs):
        directories = [tiny_adapter_factory(f"a{i}", **spec) for i, spec in enumerate(specs)]
        base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
        model = PeftModel.from_pretrained(base, directories[0], adapter_name="a0")
        for index, directory in enumerate(directories[1:], start=1):
            model.load_adapter(directory, adapter_name=f"a{index}")
        return model, [load_adapter_dir(directory, name=f"a{i}") for i, directory in enumerate(directories)]

    return build


def peft_deltas(model, adapter_name: str, modules) -> dict[str, torch.Tensor]:
    return {module: model.get_submodule(module).get_delta_weight(adapter_name).detach() for module in modules}


@pytest.mark.parametrize("strategy, specs, options", [
    ("linear", [dict(rank=4, seed=1), dict(rank=4, seed=2, alpha=4), dict(rank=4, seed=3)], {}),
    ("ties", [dict(rank=4, seed=1), dict(rank=4, seed=2, alpha=4), dict(rank=4, seed=3)], {"density": 0.5}),
    ("magnitude_prune", [dict(rank=4, seed=1), dict(rank=4, seed=2)], {"density": 0.3}),
    ("cat", [dict(rank=2, seed=1), dict(rank=4, seed=2, alpha=3), dict(rank=6, seed=3)], {}),
    ("svd", [dict(rank=2, seed=1), dict(rank=4, seed=2, alpha=3), dict(rank=6, seed=3)], {}),
    ("svd", [dict(rank=2, seed=1), dict(rank=4, seed=2)], {"svd_rank": 3}),
    ("ties_svd", [dict(rank=2, seed=1), dict(rank=4, seed=2)], {"density": 0.5, "svd_rank": 4}),
])
def test_matches_peft_add_weighted_adapter(peft_with_adapters, strategy, specs, options):
    model, adapters = peft_with_adapters(specs)
    weights = [0.6, -0.3, 0.9][: len(specs)]
    names = [f"a{i}" for i in range(len(specs))]
    model.add_weighted_adapter(names, weights, "merged", combination_type=strategy, **options)
    ours = compose_adapters(adapters, weights, strategy, **options)
    expected_rank = model.peft_config["merged"].r
    assert ours.rank == expected_rank and ours.scaling == 1.0
    assert_deltas_close(composed_delta_weights(ours), peft_deltas(model, "merged", adapters[0].modules))


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_given_the_same_drop_mask(peft_with_adapters, monkeypatch, strategy):
    # PEFT draws its new adapter's init from the global RNG before pruning, so seeds cannot line the
    # two runs up; a deterministic "random" mask (every other entry, rescaled) makes them comparable.
    import peft.utils.merge_utils as merge_utils

    def every_other(tensor, density, rescale):
        mask = (torch.arange(tensor.numel()) % 2 == 0).reshape(tensor.shape).to(tensor.dtype)
        return tensor * mask / density if rescale else tensor * mask

    monkeypatch.setattr(merge_utils, "random_pruning", every_other)
    model, adapters = peft_with_adapters([dict(rank=4, seed=1), dict(rank=4, seed=2, alpha=2)])
    model.add_weighted_adapter(["a0", "a1"], [0.7, -0.4], "merged", combination_type=strategy, density=0.5)
    ours = compose_adapters(adapters, [0.7, -0.4], strategy, density=0.5)
    assert_deltas_close(composed_delta_weights(ours), peft_deltas(model, "merged", adapters[0].modules))


def test_dare_seed_is_reproducible_and_leaves_global_rng_alone():
    adapters = [random_adapter(4, 8, seed=1), random_adapter(4, 8, seed=2)]
    torch.manual_seed(0)
    first = compose_adapters(adapters, [0.5, 0.5], "dare_linear", density=0.5, seed=123)
    after_first = torch.rand(1)
    torch.manual_seed(0)
    second = compose_adapters(adapters, [0.5, 0.5], "dare_linear", density=0.5, seed=123)
    assert torch.equal(torch.rand(1), after_first)
    assert_deltas_close(composed_delta_weights(first), composed_delta_weights(second), atol=0, rtol=0)


def test_dare_ties_runs_and_full_density_equals_linear():
    adapters = [random_adapter(4, 8, seed=1), random_adapter(4, 8, seed=2)]
    dare = compose_adapters(adapters, [0.5, 0.5], "dare_ties", density=0.4, seed=0)
    assert dare.rank == 4
    with pytest.warns(UserWarning):
        dense = compose_adapters(adapters, [0.5, 0.5], "dare_linear", density=1.0)
    linear = compose_adapters(adapters, [0.5, 0.5], "linear")
    assert_deltas_close(composed_delta_weights(dense), composed_delta_weights(linear))


def test_single_adapter_merges_like_peft_linear():
    adapter = random_adapter(4, 8, seed=1)
    merged = compose_adapters([adapter], [0.5], "ties", density=0.1)
    assert_deltas_close(composed_delta_weights(merged), exact_weighted_delta([adapter], [0.5]))


# --- validation -----------------------------------------------------------------------------------


def test_errors_are_clear_value_errors():
    two, four = random_adapter(2, 4, seed=1), random_adapter(4, 8, seed=2)
    with pytest.raises(ValueError, match=r"k == 0"):
        compose_adapters([], strategy="mixture")
    with pytest.raises(ValueError, match=r"'linear' needs equal ranks, got ranks \[2, 4\]"):
        compose_adapters([two, four], [0.5, 0.5], "linear")
    with pytest.raises(ValueError, match=r"'fusion' needs equal ranks, got ranks \[2, 4\]"):
        compose_adapters([two, four], [0.5, 0.5], "fusion")
    with pytest.raises(ValueError, match="target different modules"):
        compose_adapters([two, random_adapter(2, 4, seed=3, modules=("q_proj", "k_proj"))], strategy="mixture")
    with pytest.raises(ValueError, match="target different modules"):
        compose_adapters([two, random_adapter(2, 4, seed=3, layers=1)], strategy="mixture")
    with pytest.raises(ValueError, match="different base models"):
        compose_adapters([two, random_adapter(2, 4, seed=3, base="other")], strategy="mixture")
    with pytest.raises(ValueError, match="unknown strategy"):
        compose_adapters([two], strategy="average")
    with pytest.raises(ValueError, match="2 adapters"):
        compose_adapters([two, four], [1.0], "mixture")
    with pytest.raises(ValueError, match="needs density"):
        compose_adapters([four, four], [0.5, 0.5], "ties")
    with pytest.raises(ValueError, match="unsupported key"):
        compose_adapters([LoraAdapter({"x.lora_magnitude_vector": torch.ones(2)}, 2, 2)], strategy="mixture")
    # every message is one line
    try:
        compose_adapters([two, four], strategy="linear")
    except CompositionError as error:
        assert "\n" not in str(error)


def test_missing_base_model_is_not_a_conflict():
    a, b = random_adapter(2, 4, seed=1, base=None), random_adapter(2, 4, seed=2)
    assert compose_adapters([a, b], strategy="mixture").base_model == "tiny"


def test_save_and_load_round_trip(tmp_path):
    mixed = compose_adapters([random_adapter(2, 4, seed=1), random_adapter(3, 4, seed=2)], strategy="mixture")
    loaded = load_adapter_dir(save_adapter_dir(mixed, tmp_path / "out"))
    assert (loaded.rank, loaded.alpha, loaded.use_rslora, loaded.base_model) == (5, 5.0, False, "tiny")
    assert_deltas_close(composed_delta_weights(loaded), composed_delta_weights(mixed), atol=0, rtol=0)
