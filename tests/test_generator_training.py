"""Training the DnD generator: overfitting two tasks, exact resumption, saving, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from generator.condition import encode_prompt_tokens, pad_or_cut
from generator.dnd import DnDConfig, DnDDecoder
from generator.tokenizer import (layout_from_state_dict, stack_token_grids, state_dict_to_tokens,
                                 token_mask)
from generator.training import (GeneratorDataset, LayoutMismatch, generate_state_dict,
                                generate_tokens, group_prompts, load_generator,
                                load_training_state, save_generator, save_training_state,
                                spread_weights, train_generator, weighted_mse)

TASKS = ("arithmetic", "words")
TINY_DECODER = dict(n_prompts=4, prompt_tokens=8, embed_dim=32, n_layers=3, hidden_tokens=8, kernel=5)


def adapter_state_dict(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.fixture
def two_tasks(tiny_adapter_factory):
    """Two tiny adapters (one per task), three noisy checkpoints each, task-specific prompt embeddings."""
    state_dicts = [adapter_state_dict(tiny_adapter_factory(task, rank=4, seed=i)) for i, task in enumerate(TASKS)]
    layout = layout_from_state_dict(state_dicts[0])
    grids = stack_token_grids(state_dicts, layout)  # (2, T, h, w)
    mask = token_mask(layout)
    generator = torch.Generator().manual_seed(0)
    checkpoints = {task: [grids[i] + 0.002 * torch.randn(grids[i].shape, generator=generator) * mask
                          for _ in range(3)] for i, task in enumerate(TASKS)}
    centres = {task: torch.randn(8, 32, generator=generator) for task in TASKS}
    prompts = {task: centres[task] + 0.5 * torch.randn(12, 8, 32, generator=generator) for task in TASKS}
    return dict(layout=layout, state_dicts=state_dicts, checkpoints=checkpoints, prompts=prompts, mask=mask)


def fixed_batch_mse(model, dataset, seed: int = 123) -> float:
    condition, target = dataset.sample(32, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return weighted_mse(model(condition), target, dataset.loss_weights).item()


def test_overfits_two_tasks_and_tells_them_apart(two_tasks):
    torch.manual_seed(0)
    layout = two_tasks["layout"]
    dataset = GeneratorDataset(two_tasks["checkpoints"], two_tasks["prompts"], n_prompts=4,
                               mask=two_tasks["mask"], spread_weighting=True)
    model = DnDDecoder(DnDConfig.from_layout(layout, **TINY_DECODER))
    before = fixed_batch_mse(model, dataset)
    seen = []
    model, state = train_generator(model, dataset, steps=150, lr=1e-2, batch_size=4, device="cpu",
                                   on_step=lambda step, total, loss: seen.append((step, total)))
    after = fixed_batch_mse(model, dataset)
    assert after * 10 < before, (before, after)
    assert state.step == 150 and len(state.losses) == 150 and seen[-1] == (150, 150)

    # each task's prompts produce an adapter closer to that task's adapter than to the other one
    for index, task in enumerate(TASKS):
        generated = generate_state_dict(model, two_tasks["prompts"][task][:4], dataset.normalizer, layout)
        distances = [sum((generated[k] - sd[k]).pow(2).sum() for k in sd) for sd in two_tasks["state_dicts"]]
        assert distances[index] < 0.2 * distances[1 - index], (task, distances)


def test_dataset_validation_and_sampling(two_tasks):
    dataset = GeneratorDataset(two_tasks["checkpoints"], two_tasks["prompts"], n_prompts=4,
                               mask=two_tasks["mask"])
    assert len(dataset) == 6 and dataset.tasks == sorted(TASKS)
    assert dataset.condition_shape == (4, 8, 32) and dataset.token_shape == two_tasks["layout"].shape
    condition, target = dataset.sample(5, torch.Generator().manual_seed(0))
    assert condition.shape == (5, 4, 8, 32) and target.shape == (5, *two_tasks["layout"].shape)
    assert torch.all(target[:, ~two_tasks["mask"]] == 0)
    # prompts without replacement when the task has enough: no repeated prompt in a sample
    picks = dataset.draw_prompts(0, torch.Generator().manual_seed(1))
    assert len({tuple(p.flatten()[:4].tolist()) for p in picks}) == 4
    with pytest.raises(ValueError, match="both"):
        GeneratorDataset({"a": two_tasks["checkpoints"]["words"]}, {"b": two_tasks["prompts"]["words"]})
    with pytest.raises(ValueError, match="encoder"):
        GeneratorDataset({"a": two_tasks["checkpoints"]["words"]}, {"a": ["a prompt"]})


def test_spread_weights_favour_stable_tokens():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(4, 3, 2, 2, generator=generator) * torch.tensor([0.01, 1.0, 1.0])[None, :, None, None]
    weights = spread_weights(targets, torch.tensor([0, 0, 1, 1]), torch.ones(3, 2, 2, dtype=torch.bool))
    assert weights.shape == (3,)
    torch.testing.assert_close(weights.mean(), torch.tensor(1.0))
    assert weights[0] > 3 * weights[1] and weights[0] > 3 * weights[2]
    single = spread_weights(targets[:1], torch.tensor([0]), torch.ones(3, 2, 2, dtype=torch.bool))
    assert torch.equal(single, torch.ones(3))


def test_resume_from_saved_state_matches_uninterrupted_training(two_tasks, tmp_path):
    dataset = GeneratorDataset(two_tasks["checkpoints"], two_tasks["prompts"], n_prompts=4,
                               mask=two_tasks["mask"])
    config = DnDConfig.from_layout(two_tasks["layout"], **TINY_DECODER)

    torch.manual_seed(0)
    straight, straight_state = train_generator(DnDDecoder(config), dataset, steps=6, lr=1e-2, seed=7, device="cpu")

    torch.manual_seed(0)
    first, state = train_generator(DnDDecoder(config), dataset, steps=3, lr=1e-2, seed=7, device="cpu")
    save_training_state(tmp_path / "run", state, first)
    assert not list((tmp_path / "run").glob("*.pkl")) and not list((tmp_path / "run").glob("*.pt"))
    json.loads((tmp_path / "run" / "training_state.json").read_text())  # plain JSON
    resumed_model = DnDDecoder(config)
    resumed_state = load_training_state(tmp_path / "run", resumed_model)
    assert resumed_state.step == 3
    resumed, resumed_state = train_generator(resumed_model, dataset, steps=6, lr=1e-2, device="cpu",
                                             state=resumed_state)

    assert resumed_state.step == 6
    torch.testing.assert_close(torch.tensor(resumed_state.losses), torch.tensor(straight_state.losses))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_on_step_can_stop_early(two_tasks):
    dataset = GeneratorDataset(two_tasks["checkpoints"], two_tasks["prompts"], n_prompts=4)
    model = DnDDecoder(DnDConfig.from_layout(two_tasks["layout"], **TINY_DECODER))
    _, state = train_generator(model, dataset, steps=50, device="cpu", on_step=lambda step, *_: step < 2)
    assert state.step == 2 and state.optimizer is not None and state.rng is not None


def test_save_and_load_generator_refuses_other_layouts(two_tasks, tmp_path, tiny_adapter_factory):
    layout = two_tasks["layout"]
    dataset = GeneratorDataset(two_tasks["checkpoints"], two_tasks["prompts"], n_prompts=4, mask=two_tasks["mask"])
    torch.manual_seed(0)
    model = DnDDecoder(DnDConfig.from_layout(layout, **TINY_DECODER))
    save_generator(tmp_path / "gen", model, layout, dataset.normalizer)
    loaded, loaded_layout, normalizer = load_generator(tmp_path / "gen", device="cpu")
    condition = two_tasks["prompts"]["words"][:4]
    assert loaded_layout == layout
    expected = generate_state_dict(model, condition, dataset.normalizer, layout)
    actual = generate_state_dict(loaded, condition, normalizer, loaded_layout)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])

    other = layout_from_state_dict(adapter_state_dict(tiny_adapter_factory("other", rank=4, targets=("q_proj", "k_proj"))))
    assert other.shape == layout.shape and other.fingerprint != layout.fingerprint
    with pytest.raises(LayoutMismatch):
        generate_state_dict(model, condition, normalizer, other)
    with pytest.raises(LayoutMismatch):
        save_generator(tmp_path / "bad", model, other, normalizer)


def test_generation_accepts_any_number_of_prompts(two_tasks):
    assert group_prompts(torch.arange(3.0)[:, None, None], 4).flatten().tolist() == [0, 1, 2, 0]
    assert group_prompts(torch.arange(6.0)[:, None, None], 4).shape == (2, 4, 1, 1)
    torch.manual_seed(0)
    model = DnDDecoder(DnDConfig.from_layout(two_tasks["layout"], **TINY_DECODER))
    prompts = two_tasks["prompts"]["words"]
    for count in (1, 4, 9):
        assert generate_tokens(model, prompts[:count]).shape == two_tasks["layout"].shape
    averaged = generate_tokens(model, prompts[:8])
    halves = (generate_tokens(model, prompts[:4]) + generate_tokens(model, prompts[4:8])) / 2
    torch.testing.assert_close(averaged, halves)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_and_generates_on_cuda(two_tasks):
    dataset = GeneratorDataset(two_tasks["checkpoints"], two_tasks["prompts"], n_prompts=4, mask=two_tasks["mask"])
    torch.manual_seed(0)
    model = DnDDecoder(DnDConfig.from_layout(two_tasks["layout"], **TINY_DECODER))
    model, state = train_generator(model, dataset, steps=3)  # device None -> CUDA
    assert model.device.type == "cuda" and state.step == 3
    generated = generate_state_dict(model, two_tasks["prompts"]["words"][:4].cuda(), dataset.normalizer,
                                    two_tasks["layout"])
    assert all(value.device.type == "cpu" for value in generated.values())


def test_pad_or_cut():
    out = pad_or_cut([torch.ones(2, 3), torch.ones(7, 3) * 2], 4)
    assert out.shape == (2, 4, 3)
    assert out[0, :2].eq(1).all() and out[0, 2:].eq(0).all() and out[1].eq(2).all()


@pytest.mark.slow
def test_encode_prompt_tokens_is_the_last_hidden_state():
    from registry.embeddings import load_encoder

    encoder = load_encoder()
    condition = encode_prompt_tokens(encoder, ["hi there", "count the letters " * 30], max_tokens=16)
    assert condition.shape == (2, 16, 384) and not condition.is_inference()
    transformer = encoder[0]
    batch = transformer.tokenizer(["hi there"], return_tensors="pt")
    with torch.no_grad():
        hidden = transformer.auto_model(**batch).last_hidden_state[0]  # (4, 384): [CLS] hi there [SEP]
    torch.testing.assert_close(condition[0, :hidden.shape[0]], hidden, atol=1e-4, rtol=1e-4)
    assert condition[0, hidden.shape[0]:].eq(0).all()
    assert condition[1].abs().sum(dim=-1).gt(0).all()  # the long prompt is cut, not padded


@pytest.mark.slow
def test_end_to_end_prompts_to_a_loadable_peft_adapter(tiny_base_dir, tiny_adapter_factory, tmp_path):
    from peft import LoraConfig, PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from registry.embeddings import load_encoder

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    state_dicts = {task: adapter_state_dict(tiny_adapter_factory(task, rank=4, seed=i, targets=targets))
                   for i, task in enumerate(TASKS)}
    layout = layout_from_state_dict(state_dicts[TASKS[0]])
    prompts = {
        "arithmetic": [f"What is {a} plus {b}?" for a, b in zip(range(2, 10), range(11, 19))],
        "words": [f"Reverse the word {w}." for w in ("cat", "tree", "house", "river", "apple", "stone", "cloud", "lamp")],
    }
    encoder = load_encoder()
    dataset = GeneratorDataset({t: [state_dict_to_tokens(sd, layout)] for t, sd in state_dicts.items()}, prompts,
                               n_prompts=4, mask=token_mask(layout), encoder=encoder, prompt_tokens=16)
    torch.manual_seed(0)
    model = DnDDecoder(DnDConfig.from_layout(layout, n_prompts=4, prompt_tokens=16, embed_dim=384, n_layers=2,
                                             hidden_tokens=8, kernel=3))
    model, _ = train_generator(model, dataset, steps=5, lr=1e-3, batch_size=2)

    condition = encode_prompt_tokens(encoder, ["What is 4 plus 4?", "What is 7 plus 1?"], max_tokens=16)
    generated = generate_state_dict(model, condition, dataset.normalizer, layout)
    assert sorted(generated) == sorted(state_dicts[TASKS[0]])

    adapter_dir = tmp_path / "generated"
    LoraConfig(r=layout.token_height, lora_alpha=2 * layout.token_height, target_modules=layout.target_modules,
               task_type="CAUSAL_LM", base_model_name_or_path=str(tiny_base_dir)).save_pretrained(adapter_dir)
    save_file(generated, str(adapter_dir / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    loaded = get_peft_model_state_dict(peft_model)
    assert sorted(loaded) == sorted(generated)
    for key, value in generated.items():
        torch.testing.assert_close(loaded[key], value)
    input_ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        adapted = peft_model(input_ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids).logits
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, plain)
