"""ICM-LoRA's CVAE generator: task vectors, shapes, overfitting three adapters, exact resumption, PEFT loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from generator.cvae import (CVAEConfig, LoraCVAE, PatchConv, PatchConvTranspose, auto_strides, cvae_loss,
                            flat_to_state_dict, flatten_tokens, principal_basis, state_dict_to_flat, unflatten_tokens)
from generator.cvae_training import (CVAEDataset, check_cvae_layout, generate, generate_cvae_state_dict, reconstruct,
                                     train_cvae)
from generator.task_vector import TaskVectorCache, prompt_states, task_vector, task_vector_key
from generator.tokenizer import (TokenNormalizer, layout_from_state_dict, stack_token_grids, state_dict_to_tokens,
                                 token_mask)
from generator.training import LayoutMismatch, load_training_state, save_training_state

HIDDEN = 32  # the tiny llama's hidden size (tests/conftest.py)
# big enough to memorise three tiny adapters: F = P * F_c = 56 * 16 = 896 = D (see the cvae docstring)
TINY_CVAE = dict(strides=[4, 4], channels=[16, 32], flat_channels=16, latent_dim=32, cond_embed=16)
TASK_PROMPTS = {
    "add": ["What is 2 plus 3?", "What is 4 plus 5? Give the answer.", "What is 7 plus 1?"],
    "reverse": ["Reverse the word cat.", "Reverse the word dog, letter by letter.", "Reverse: abc"],
    "sort": ["Sort these letters: c a b", "Sort: 9 3 5 1", "Sort these words: yes no true false"],
}


def adapter_state_dict(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture
def zoo(tiny_adapter_factory, tiny_base, tiny_tokenizer):
    """Three tiny adapters (one per task), their task vectors from the base, a fitted normaliser."""
    dirs = {task: tiny_adapter_factory(task, rank=4, seed=i) for i, task in enumerate(TASK_PROMPTS)}
    state_dicts = {task: adapter_state_dict(d) for task, d in dirs.items()}
    layout = layout_from_state_dict(state_dicts["add"])
    grids = {task: stack_token_grids([sd], layout) for task, sd in state_dicts.items()}  # task -> (1, T, h, w)
    mask = token_mask(layout)
    normalizer = TokenNormalizer.fit(torch.cat(list(grids.values())), mask)
    vectors = {task: task_vector(tiny_base, tiny_tokenizer, prompts) for task, prompts in TASK_PROMPTS.items()}
    dataset = CVAEDataset.from_grids(grids, vectors, normalizer, mask)
    return dict(dirs=dirs, state_dicts=state_dicts, layout=layout, mask=mask, normalizer=normalizer,
                vectors=vectors, dataset=dataset)


# -----------------------------------------------------------------------------
# task vectors


def test_task_vector_left_padding_matches_one_by_one(tiny_base, tiny_tokenizer):
    prompts = TASK_PROMPTS["add"] + TASK_PROMPTS["sort"]
    texts = [tiny_tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True) for p in prompts]
    lengths = {len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts}
    assert len(lengths) > 1  # the batch really is padded
    side = tiny_tokenizer.padding_side
    batched = prompt_states(tiny_base, tiny_tokenizer, prompts, batch_size=len(prompts))  # (P, H)
    alone = torch.cat([prompt_states(tiny_base, tiny_tokenizer, [p]) for p in prompts])  # (P, H)
    assert batched.shape == (len(prompts), HIDDEN) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    assert tiny_tokenizer.padding_side == side  # restored

    vector = task_vector(tiny_base, tiny_tokenizer, prompts, batch_size=2)
    assert vector.shape == (HIDDEN,)
    torch.testing.assert_close(vector, alone.mean(dim=0), atol=1e-5, rtol=1e-4)
    # different tasks give different vectors; the same prompts in another order the same one
    other = task_vector(tiny_base, tiny_tokenizer, TASK_PROMPTS["reverse"])
    assert (vector - other).abs().max() > 1e-3
    torch.testing.assert_close(task_vector(tiny_base, tiny_tokenizer, prompts[::-1]), vector, atol=1e-5, rtol=1e-4)


def test_task_vector_cache(tiny_base, tiny_tokenizer, tmp_path):
    prompts = TASK_PROMPTS["reverse"]
    cache = TaskVectorCache(tmp_path / "vectors")
    first = task_vector(tiny_base, tiny_tokenizer, prompts, cache=cache)
    key = task_vector_key(tiny_base, tiny_tokenizer, prompts)
    assert list(cache) == [key] and len(cache) == 1
    torch.testing.assert_close(cache[key], first)
    # a hit does not run the model: a planted value comes back
    cache[key] = torch.full((HIDDEN,), 7.0)
    assert torch.all(task_vector(tiny_base, tiny_tokenizer, prompts, cache=cache) == 7.0)
    # the key covers prompts and the base identity
    assert task_vector_key(tiny_base, tiny_tokenizer, prompts[:2]) != key
    assert task_vector_key(tiny_base, tiny_tokenizer, prompts, base_id="other-base") != key
    with pytest.raises(ValueError):
        task_vector(tiny_base, tiny_tokenizer, [])


# -----------------------------------------------------------------------------
# shapes and pure functions


def test_shapes_config_and_patch_convs(zoo):
    layout = zoo["layout"]
    config = CVAEConfig.from_layout(layout, cond_dim=HIDDEN, **TINY_CVAE)
    assert config.input_dim == layout.num_parameters == int(zoo["mask"].sum()) == 896
    assert config.layout_fingerprint == layout.fingerprint
    assert (config.downsample, config.num_positions, config.padded_dim, config.flat_features) == (16, 56, 896, 896)
    assert CVAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError):
        CVAEConfig.from_dict({**config.to_dict(), "format": "something-else/9"})

    # an odd D is zero-padded to a multiple of prod(strides) and cropped back
    odd = LoraCVAE(CVAEConfig(input_dim=1000, cond_dim=HIDDEN, **TINY_CVAE))
    assert odd.config.padded_dim == 1008
    x, cond = torch.randn(3, 1000), torch.randn(3, HIDDEN)
    recon, mu, logvar = odd(x, cond)
    assert recon.shape == (3, 1000) and mu.shape == logvar.shape == (3, 32)
    c = odd.embed_condition(cond)
    assert c.shape == (3, 16)
    assert odd.encoder(torch.zeros(3, 1008, 1)).shape == (3, 63, 16)    # (B, P, F_c)
    assert odd.decoder(torch.zeros(3, 63, 16)).shape == (3, 1008, 1)   # (B, D', 1)
    assert generate(odd, cond[0]).shape == (1000,) and generate(odd, cond).shape == (3, 1000)
    with pytest.raises(ValueError):
        odd(torch.randn(3, 999), cond)
    with pytest.raises(ValueError):
        odd(x, torch.randn(3, HIDDEN + 1))

    # the patch layers are exactly a strided Conv1d / ConvTranspose1d with kernel = stride
    conv, patch = torch.nn.Conv1d(3, 5, 4, stride=4), PatchConv(3, 5, 4)
    with torch.no_grad():
        patch.linear.weight.copy_(conv.weight.permute(0, 2, 1).reshape(5, 12))  # (C', s, C) flattened
        patch.linear.bias.copy_(conv.bias)
    signal = torch.randn(2, 3, 20)  # (B, C, L)
    torch.testing.assert_close(patch(signal.transpose(1, 2)), conv(signal).transpose(1, 2))
    deconv, patch_t = torch.nn.ConvTranspose1d(5, 3, 4, stride=4), PatchConvTranspose(5, 3, 4)
    with torch.no_grad():
        patch_t.linear.weight.copy_(deconv.weight.permute(2, 1, 0).reshape(12, 5))  # (s, C') x C
        patch_t.linear.bias.copy_(deconv.bias.repeat(4))
    signal = torch.randn(2, 5, 6)
    torch.testing.assert_close(patch_t(signal.transpose(1, 2)), deconv(signal).transpose(1, 2))

    # strides for the SmolLM2 r=8 size: down to a few hundred positions, 8 at a time
    assert auto_strides(2_442_240, 512) == [8, 8, 8, 8]
    assert auto_strides(500, 512) == [2]


def test_flatten_and_state_dict_round_trip(zoo):
    layout, mask, normalizer = zoo["layout"], zoo["mask"], zoo["normalizer"]
    sd = zoo["state_dicts"]["sort"]
    grid = state_dict_to_tokens(sd, layout)  # (T, h, w)
    flat = flatten_tokens(grid, mask)
    assert flat.shape == (layout.num_parameters,)
    torch.testing.assert_close(unflatten_tokens(flat, mask), grid * mask)
    batch = torch.stack([grid, 2 * grid])
    assert flatten_tokens(batch, mask).shape == (2, layout.num_parameters)
    torch.testing.assert_close(unflatten_tokens(flatten_tokens(batch, mask), mask), batch * mask)

    x = state_dict_to_flat(sd, layout, normalizer)
    back = flat_to_state_dict(x, layout, normalizer)
    assert set(back) == set(sd)
    for key in sd:
        torch.testing.assert_close(back[key], sd[key], atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# training


def distances_to(generated: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.cdist(generated[None], targets[None])[0]  # (K, K)


def test_overfits_three_adapters_from_their_task_vectors(zoo):
    dataset = zoo["dataset"]
    targets = dataset.weights  # (3, D) normalised, sorted by task
    conds = dataset.conditions              # (3, H)
    torch.manual_seed(0)
    model = LoraCVAE(CVAEConfig.from_layout(zoo["layout"], cond_dim=HIDDEN, **TINY_CVAE))
    model.fit_condition(conds)
    before = (generate(model, conds) - targets).pow(2).mean(dim=1)  # (3,)
    seen = []
    model, state = train_cvae(model, dataset, steps=300, lr=1e-2, batch_size=3, device="cpu",
                              on_step=lambda step, total, loss: seen.append((step, total)))
    assert state.step == 300 and len(state.losses) == 300 and seen[-1] == (300, 300)
    # the condition was standardised over the training tasks: mean 0, RMS 1
    standard = (conds - model.cond_mean) / model.cond_scale
    assert standard.mean(dim=0).abs().max() < 1e-5 and standard.pow(2).mean().sqrt().item() == pytest.approx(1.0)

    generated = generate(model, conds)                      # (3, D) from z = 0
    after = (generated - targets).pow(2).mean(dim=1)
    assert torch.all(after * 10 < before), (before, after)
    distances = distances_to(generated, targets)            # row i: generated i vs every adapter
    for i in range(3):
        others = torch.cat([distances[i, :i], distances[i, i + 1:]])
        assert distances[i, i] < 0.25 * others.min(), distances
    # the posterior mean reconstructs as well
    assert torch.all((reconstruct(model, targets, conds) - targets).pow(2).mean(dim=1) * 10 < before)
    # sampling draws around the mean, reproducibly from a seeded generator
    one = generate(model, conds[0], sample=True, generator=torch.Generator().manual_seed(1))
    two = generate(model, conds[0], sample=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(one, two)
    assert not torch.equal(one, generated[0])


def test_principal_basis_spans_the_data_with_unit_variance_coefficients():
    generator = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(400, 3, generator=generator))[0].T  # (3, D) orthonormal
    scales = torch.tensor([5.0, 2.0, 0.5])
    coefficients = torch.randn(20, 3, generator=generator)
    weights = (coefficients * scales) @ directions                             # (N, D), rank 3
    basis = principal_basis(weights, 5)                                        # (5, D)
    assert basis.shape == (5, 400)
    assert torch.all(basis[3:] == 0)                                           # beyond the rank: zero
    norms = basis[:3].norm(dim=1)
    assert torch.all(norms[:-1] >= norms[1:])                                  # largest first
    unit = basis[:3] / norms[:, None]
    torch.testing.assert_close(unit @ unit.T, torch.eye(3), atol=1e-4, rtol=0)  # orthogonal
    # every training row is a combination of the basis with coefficients of RMS 1 per direction
    solved = torch.linalg.lstsq(basis[:3].T, weights.T).solution.T             # (N, 3)
    torch.testing.assert_close(solved @ basis[:3], weights, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(solved.pow(2).mean(dim=0).sqrt(), torch.ones(3), atol=1e-4, rtol=1e-4)


def test_basis_decoder_places_tasks_a_conv_only_decoder_cannot(zoo):
    """The measured failure this guards: a conv-only decoder too small to memorise (F << D) decodes
    one mean-like adapter whatever the task; the basis path puts each task at its own adapter."""
    dataset = zoo["dataset"]
    targets = dataset.weights  # (3, D)
    conds = dataset.conditions              # (3, H)
    small = dict(strides=[4, 4], channels=[8, 8], flat_channels=1, latent_dim=8, cond_embed=8)
    errors = {}
    for basis_dim in (0, 3):
        torch.manual_seed(0)
        model = LoraCVAE(CVAEConfig.from_layout(zoo["layout"], cond_dim=HIDDEN, basis_dim=basis_dim, **small))
        # fp32: this bound is about the decoder's shape, and on a bf16-capable CPU the default (auto =
        # bf16 autocast) leaves the 200-step tiny fit at 0.118 instead of under 0.1
        model, _ = train_cvae(model, dataset, steps=200, lr=1e-2, batch_size=3, device="cpu", precision="fp32")
        generated = generate(model, conds)  # (3, D)
        errors[basis_dim] = ((generated - targets).norm(dim=1) / targets.norm(dim=1)).max().item()
        if basis_dim:
            distances = distances_to(generated, targets)
            assert torch.all(distances.argmin(dim=1) == torch.arange(3)), distances
            # the task's vector picks the adapter: swapping conditions swaps outputs
            swapped = generate(model, conds[[1, 0, 2]])
            torch.testing.assert_close(swapped[0], generated[1])
    assert errors[3] < 0.1 and errors[0] > 0.5, errors


def test_resume_matches_uninterrupted_run(tmp_path):
    generator = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(300, generator=generator), torch.randn(HIDDEN, generator=generator)) for _ in range(4)]
    config = CVAEConfig(input_dim=300, cond_dim=HIDDEN, strides=[4, 4], channels=[4, 8], flat_channels=4,
                        latent_dim=8, cond_embed=8)

    def fresh() -> LoraCVAE:
        torch.manual_seed(0)
        return LoraCVAE(config)

    full, full_state = train_cvae(fresh(), pairs, steps=12, lr=1e-2, batch_size=2, device="cpu", seed=3)

    part, part_state = train_cvae(fresh(), pairs, steps=5, lr=1e-2, batch_size=2, device="cpu", seed=3)
    save_training_state(tmp_path / "state", part_state, part)
    resumed_model = fresh()
    resumed_state = load_training_state(tmp_path / "state", resumed_model)
    assert resumed_state.step == 5
    torch.testing.assert_close(resumed_model.cond_scale, part.cond_scale)  # buffers travel with the weights
    resumed, resumed_state = train_cvae(resumed_model, pairs, steps=12, lr=1e-2, batch_size=2, device="cpu",
                                        state=resumed_state)

    assert resumed_state.step == 12
    assert resumed_state.losses == pytest.approx(full_state.losses, rel=1e-6, abs=1e-7)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # a different seed trains differently (the comparison above can fail)
    _, other = train_cvae(fresh(), pairs, steps=12, lr=1e-2, batch_size=2, device="cpu", seed=4)
    assert other.losses != full_state.losses


def test_loss_and_dataset_validation(zoo):
    mu, logvar = torch.zeros(2, 4), torch.zeros(2, 4)
    loss, mse, kl = cvae_loss(torch.ones(2, 3), torch.zeros(2, 3), mu, logvar, kl_weight=0.5)
    assert (loss.item(), mse.item(), kl.item()) == (1.0, 1.0, 0.0)
    loss, _, kl = cvae_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4), logvar, kl_weight=0.5)
    assert kl.item() == pytest.approx(2.0) and loss.item() == pytest.approx(1.0)  # 0.5 * sum(mu^2) over 4 dims

    model = LoraCVAE(CVAEConfig(input_dim=100, cond_dim=HIDDEN, **TINY_CVAE))
    with pytest.raises(LayoutMismatch):
        train_cvae(model, zoo["dataset"], steps=1, device="cpu")
    with pytest.raises(LayoutMismatch):
        check_cvae_layout(model, zoo["layout"])
    with pytest.raises(ValueError):
        CVAEDataset([])
    with pytest.raises(ValueError):
        CVAEDataset([(torch.zeros(5), torch.zeros(3)), (torch.zeros(6), torch.zeros(3))])
    with pytest.raises(ValueError):
        CVAEDataset.from_grids({"a": torch.zeros(1, *zoo["layout"].shape)}, {}, zoo["normalizer"], zoo["mask"])


# -----------------------------------------------------------------------------
# generation -> PEFT


def test_generated_adapter_loads_into_peft(zoo, tiny_base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    layout = zoo["layout"]
    torch.manual_seed(0)
    model = LoraCVAE(CVAEConfig.from_layout(layout, cond_dim=HIDDEN, **TINY_CVAE))
    model, _ = train_cvae(model, zoo["dataset"], steps=5, lr=1e-2, batch_size=3, device="cpu")
    state_dict = generate_cvae_state_dict(model, zoo["vectors"]["add"], zoo["normalizer"], layout)
    reference = zoo["state_dicts"]["add"]
    assert set(state_dict) == set(reference)
    assert all(state_dict[k].shape == reference[k].shape and state_dict[k].dtype == torch.float32 for k in reference)

    out = tmp_path / "generated"
    out.mkdir()
    (out / "adapter_config.json").write_text((zoo["dirs"]["add"] / "adapter_config.json").read_text())
    save_file(state_dict, str(out / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    peft_model = PeftModel.from_pretrained(base, out)
    loaded = {name: p for name, p in peft_model.named_parameters() if "lora_" in name}
    assert len(loaded) == len(state_dict)
    for key, value in state_dict.items():
        name = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(loaded[name].detach(), value)
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, 320) and torch.isfinite(logits).all()

    other = layout_from_state_dict(reference, chunk_width=8)  # same weights, another grid: refused
    with pytest.raises(LayoutMismatch):
        generate_cvae_state_dict(model, zoo["vectors"]["add"], zoo["normalizer"], other)
