"""The SFT objective (generator.sft) on the tiny llama: gradients reach only the decoder, and the
trained generator is condition-sensitive: each task's prompts give an adapter better on that task."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from generator.dnd import DnDConfig, DnDDecoder
from generator.sft import (FunctionalLora, ResidualHead, SFTGenerator, SFTTask, answer_loss_with, fused_anchor,
                           generate_weights, nearest_pool, pool_centroids,
                           lora_factors, recon_error, train_sft)
from generator.tokenizer import layout_from_state_dict, state_dict_to_tokens

TINY_DECODER = dict(n_prompts=4, prompt_tokens=8, embed_dim=32, n_layers=3, hidden_tokens=8, kernel=5)


def assert_own_beats_other(model, layout, weights: dict, tasks: dict, pad_id: int, margin: float = 0.1) -> None:
    """Condition sensitivity: on each task's items its own generated LoRA's answer loss is lower than
    every other task's LoRA's by more than ``margin`` nats."""
    for own in tasks:
        examples = tasks[own].examples[:12]
        own_loss = answer_loss_with(model, layout, weights[own], examples, 2.0, pad_id)
        for other in tasks:
            if other != own:
                other_loss = answer_loss_with(model, layout, weights[other], examples, 2.0, pad_id)
                assert own_loss < other_loss - margin, (own, other, own_loss, other_loss)


@pytest.fixture
def setting(tiny_base_dir, tiny_adapter_factory):
    """The tiny llama, a q/v rank-4 layout, and two tasks with the same prompts' form but different
    answers ('yes' for task A, 'no' for task B); their conditions are distinct embedding clouds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from registry.lm import encode_example

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    state = load_file(str(tiny_adapter_factory("a", rank=4) / "adapter_model.safetensors"))
    layout = layout_from_state_dict(state)
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    tasks = {}
    for name, answer in (("a", "yes"), ("b", "no")):
        prompts = [f"{rng.randint(0, 99)} plus {rng.randint(0, 9)}" for _ in range(24)]
        centre = torch.randn(8, 32, generator=generator)
        condition = centre + 0.3 * torch.randn(12, 8, 32, generator=generator)  # (P, L, C)
        examples = [encode_example(tokenizer, p, answer, max_length=32) for p in prompts]
        tasks[name] = SFTTask(name, condition, examples)
    return dict(model=model, tokenizer=tokenizer, layout=layout, tasks=tasks, state=state,
                pad_id=tokenizer.pad_token_id or 0)


def test_functional_lora_equals_peft(setting, tiny_base_dir, tiny_adapter_factory):
    """The hooks compute exactly what PEFT's LoRA layers compute for the same weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    directory = tiny_adapter_factory("a", rank=4)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), directory).eval()
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    model, layout = setting["model"], setting["layout"]
    lora = FunctionalLora(model, layout, scaling=2.0)  # make_tiny_adapter_dir: alpha = 2 * rank
    lora.weights = lora_factors(state_dict_to_tokens(setting["state"], layout), layout)
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
        lora.weights = {}
        plain = model(ids).logits
    lora.close()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-3  # the adapter does change the output


def test_sft_trains_only_the_decoder_and_is_condition_sensitive(setting):
    torch.manual_seed(0)
    model, layout, tasks = setting["model"], setting["layout"], setting["tasks"]
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = SFTGenerator(DnDDecoder(DnDConfig.from_layout(layout, **TINY_DECODER)), ResidualHead(layout))
    generator, state = train_sft(generator, model, list(tasks.values()), layout, steps=60, scaling=2.0,
                                 pad_id=setting["pad_id"], lr=1e-2, tasks_per_step=2, items_per_task=6)
    # the random tiny llama barely moves with a rank-4 q/v LoRA: 5.78 -> 5.27 measured
    assert state.step == 60 and state.losses[-1] < state.losses[0] - 0.3, state.losses[::10]
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters())
    assert all(not p.requires_grad for p in model.parameters())
    weights = {name: generate_weights(generator, task.condition) for name, task in tasks.items()}
    assert_own_beats_other(model, layout, weights, tasks, setting["pad_id"])  # measured gaps: 0.15 and 0.33


def test_contrast_hinge_is_zero_past_the_margin():
    from generator.sft import contrast_hinge

    own, other = torch.tensor(1.0), torch.tensor(1.05)
    assert float(contrast_hinge(own, other, 0.1)) == pytest.approx(0.05, abs=1e-6)
    assert float(contrast_hinge(own, torch.tensor(1.2), 0.1)) == 0.0
    assert float(contrast_hinge(own, own, 0.1)) == pytest.approx(0.1, abs=1e-6)  # a collapsed decoder pays the margin


def test_the_contrast_term_widens_the_own_vs_other_gap(setting):
    """Same seed, same steps: with the condition-sensitivity hinge the gap between a task's own generated
    LoRA and the other task's, on its items, is larger than without."""
    model, layout, tasks = setting["model"], setting["layout"], setting["tasks"]

    def gaps(contrast_weight):
        torch.manual_seed(0)
        generator = SFTGenerator(DnDDecoder(DnDConfig.from_layout(layout, **TINY_DECODER)), ResidualHead(layout))
        generator, _ = train_sft(generator, model, list(tasks.values()), layout, steps=40, scaling=2.0,
                                 pad_id=setting["pad_id"], lr=1e-2, tasks_per_step=2, items_per_task=6,
                                 contrast_weight=contrast_weight, contrast_margin=1.0)
        weights = {name: generate_weights(generator, task.condition) for name, task in tasks.items()}
        out = []
        for own, other in (("a", "b"), ("b", "a")):
            examples = tasks[own].examples[:12]
            out.append(answer_loss_with(model, layout, weights[other], examples, 2.0, setting["pad_id"])
                       - answer_loss_with(model, layout, weights[own], examples, 2.0, setting["pad_id"]))
        return out

    plain, contrasted = gaps(0.0), gaps(1.0)
    assert sum(contrasted) > sum(plain) + 0.05, (plain, contrasted)


def test_the_reconstruction_regulariser_pulls_the_generated_grid_to_the_harvest(setting):
    """Objective "both": with a reconstruction weight, training ends closer to the task's harvested
    grid than the same training without it."""
    model, layout = setting["model"], setting["layout"]
    target = state_dict_to_tokens(setting["state"], layout)                       # (T, h, w)
    tasks = [SFTTask(t.name, t.condition, t.examples, target[None]) for t in setting["tasks"].values()]
    errors = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        generator = SFTGenerator(DnDDecoder(DnDConfig.from_layout(layout, **TINY_DECODER)), ResidualHead(layout))
        generator, _ = train_sft(generator, model, tasks, layout, steps=30, scaling=2.0, pad_id=setting["pad_id"],
                                 lr=1e-2, tasks_per_step=2, items_per_task=4, recon_weight=weight)
        generated = generate_weights(generator, tasks[0].condition)
        errors[weight] = float(recon_error(generated, target, generator.head.scale, generator.head.mask))
    assert errors[1.0] < 0.8 * errors[0.0], errors


def test_residual_head_starts_at_the_anchor_and_masks_padding(setting):
    layout = setting["layout"]
    anchor = state_dict_to_tokens(setting["state"], layout)
    head = ResidualHead(layout, anchor=anchor, gate=0.0)
    torch.testing.assert_close(head(torch.randn(layout.shape)), anchor)
    head = ResidualHead(layout, anchor=anchor)
    out = head(torch.ones(layout.shape))
    assert torch.all(out[head.mask == 0] == 0) and not torch.allclose(out, anchor)


def test_train_generator_sft_end_to_end_with_a_multitask_anchor(cli, registry_home, tiny_base_dir, tmp_path):
    """`registry train-generator --objective sft` on two tiny harvests: it trains the multitask anchor
    first, stores a generator-dnd-sft artifact, and `registry generate` writes a PEFT-loadable adapter."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harvest.service import harvest_task, resolve_task
    from harvest.train import HarvestConfig
    from registry.store import Registry

    config = HarvestConfig(steps=2, n_checkpoints=1, batch_size=2, rank=4, target_modules=("q_proj", "v_proj"))
    with Registry.open(registry_home) as reg:
        for name in ("add_sub", "letter_count"):
            harvest_task(reg, resolve_task(name), base=str(tiny_base_dir), config=config)
    tiny = ["--n-prompts", "4", "--prompt-tokens", "8", "--layers", "2", "--hidden-tokens", "8", "--steps", "3",
            "--save-every", "2", "--device", "cpu"]
    code, out, err = cli("train-generator", "--objective", "sft", "--tasks", "add_sub", "--tasks", "letter_count",
                         *tiny, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["artifact_type"] == "generator-dnd-sft" and info["meta"]["objective"] == "sft"
    assert info["meta"]["tasks"] == ["add_sub", "letter_count"] and info["meta"]["steps"] == 3
    with Registry.open(registry_home) as reg:
        anchor = reg.resolve(info["meta"]["anchor"])
        assert "multitask" in anchor.tags and anchor.recipe["multitask_tasks"] == ["add_sub", "letter_count"]
    code, out, err = cli("generate", "--task", "add_sub", "--name", "sft-gen", "--generator", info["ref"], "--json")
    assert code == 0, err
    generated = json.loads(out)
    assert generated["recipe"]["objective"] == "sft" and generated["recipe"]["arch"] == "dnd-sft"
    with Registry.open(registry_home) as reg:
        path = reg.fetch(generated["ref"])
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), path)  # loads
    # a rerun finds the stored artifact; a CVAE with --objective both is refused in one line
    code, out, err = cli("train-generator", "--objective", "sft", "--tasks", "add_sub", "--tasks", "letter_count",
                         *tiny, "--json")
    assert code == 0 and json.loads(out)["ref"] == info["ref"], err
    # the multitask LoRA is a baseline, not a task: a reconstruction generator never trains on it
    code, out, err = cli("train-generator", "--steps", "1", "--n-prompts", "4", "--prompt-tokens", "8", "--layers", "2",
                         "--hidden-tokens", "8", "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["meta"]["tasks"] == ["add_sub", "letter_count"], err
    code, _, err = cli("train-generator", "--arch", "cvae", "--objective", "both")
    assert code != 0 and "--arch cvae takes --objective recon or sft" in err and "Traceback" not in err
    # objective both: sft plus the reconstruction regulariser, recorded as such
    code, out, err = cli("train-generator", "--objective", "both", "--recon-weight", "0.5", "--tasks", "add_sub",
                         "--tasks", "letter_count", *tiny, "--json")
    assert code == 0, err
    both = json.loads(out)
    assert both["meta"]["objective"] == "both" and both["meta"]["training"]["recon_weight"] == 0.5
    assert both["ref"] != info["ref"]
    code, _, err = cli("train-generator", "--recon-weight", "0.5")
    assert code != 0 and "--objective both only" in err
    # the condition-sensitivity hinge: recorded, a new artifact; refused outside sft/both
    code, out, err = cli("train-generator", "--objective", "sft", "--contrast-weight", "0.5", "--tasks", "add_sub",
                         "--tasks", "letter_count", *tiny, "--json")
    assert code == 0, err
    contrasted = json.loads(out)
    assert contrasted["meta"]["training"]["contrast_weight"] == 0.5 and contrasted["ref"] != info["ref"]
    code, _, err = cli("train-generator", "--contrast-weight", "0.5")
    assert code != 0 and "--objective sft or both only" in err and "Traceback" not in err
    code, _, err = cli("train-generator", "--objective", "sft", "--contrast-weight", "-1", "--tasks", "add_sub",
                       "--tasks", "letter_count", *tiny)
    assert code != 0 and "contrast weights >= 0" in err and "Traceback" not in err


def test_nearest_pool_ranks_by_prompt_centroid_and_never_returns_the_excluded_task():
    directions = torch.eye(4)[:3]                                            # 3 pool tasks, C = 4
    vectors = [d + 0.01 * torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i, d in enumerate(directions)]
    centroids = pool_centroids(vectors)                                      # (3, 4), unit rows
    torch.testing.assert_close(centroids.norm(dim=-1), torch.ones(3))
    query = torch.stack([directions[1], 0.5 * directions[1] + 0.4 * directions[2]])  # (P=2, C): mostly task 1, then 2
    assert nearest_pool(query, centroids, 2) == [1, 2]
    assert nearest_pool(query, centroids, 2, exclude=1) == [2, 0]
    assert nearest_pool(query, centroids, 5, exclude=1) == [2, 0]            # k is capped by the pool
    grids = [torch.full((2, 1, 3), float(v)) for v in (1.0, 3.0)]
    torch.testing.assert_close(fused_anchor(grids), torch.full((2, 1, 3), 2.0))


def test_stacked_lora_sums_the_weight_deltas_at_each_scaling(setting):
    from generator.sft import stacked_lora

    layout = setting["layout"]
    first = setting["state"]
    second = {k: torch.randn_like(v) for k, v in first.items()}
    stacked = stacked_lora([(first, 2.0), (second, 0.5)], layout, scaling=1.0)
    for m in layout.modules:
        expected = 2.0 * first[m.b_key] @ first[m.a_key] + 0.5 * second[m.b_key] @ second[m.a_key]
        assert stacked[m.a_key].shape[0] == 2 * m.rank
        torch.testing.assert_close(1.0 * stacked[m.b_key] @ stacked[m.a_key], expected)


def test_residual_head_takes_a_retrieved_anchor_in_place_of_its_fixed_one(setting):
    layout = setting["layout"]
    fixed = state_dict_to_tokens(setting["state"], layout)
    retrieved = 2 * fixed
    head = ResidualHead(layout, anchor=fixed, gate=0.0)
    torch.testing.assert_close(head(torch.randn(layout.shape), retrieved), retrieved)
    torch.testing.assert_close(head(torch.randn(layout.shape)), fixed)


def test_train_generator_sft_with_a_retrieved_anchor(cli, registry_home, tiny_base_dir):
    """`--anchor retrieved`: the artifact keeps its pool (each task's latest harvest) and centroids; a
    generated adapter starts from the pool adapter nearest to its prompts, recorded as its parent."""
    import json

    from harvest.service import harvest_task, resolve_task
    from harvest.train import HarvestConfig
    from registry.store import Registry

    config = HarvestConfig(steps=2, n_checkpoints=1, batch_size=2, rank=4, target_modules=("q_proj", "v_proj"))
    names = ("add_sub", "letter_count", "word_sort")
    with Registry.open(registry_home) as reg:
        refs = {n: harvest_task(reg, resolve_task(n), base=str(tiny_base_dir), config=config).refs[-1] for n in names}
    tiny = ["--n-prompts", "4", "--prompt-tokens", "8", "--layers", "2", "--hidden-tokens", "8", "--steps", "2",
            "--save-every", "2", "--device", "cpu"]
    tasks = [a for n in names for a in ("--tasks", n)]
    code, out, err = cli("train-generator", "--objective", "sft", "--anchor", "retrieved", "--anchor-k", "1",
                         *tasks, *tiny, "--json")
    assert code == 0, err
    trained = json.loads(out)
    meta = trained["meta"]
    assert meta["anchor"] == "retrieved" and meta["anchor_k"] == 1 and meta["anchor_pool"] == refs
    assert meta["training"]["retrieved_anchor_k"] == 1 and meta["parametrisation"].startswith("fusion")
    picked = {}
    for name in ("add_sub", "word_sort"):
        code, out, err = cli("generate", "--task", name, "--name", f"gen-{name}", "--generator", trained["ref"],
                             "--json")
        assert code == 0, err
        generated = json.loads(out)
        picked[name] = generated["recipe"]["anchor_adapters"]
        assert [p["ref"] for p in generated["parents"]] == picked[name]
    assert picked == {"add_sub": [refs["add_sub"]], "word_sort": [refs["word_sort"]]}  # each task's own harvest
    # trained on its own adapters (itself first, as at generation): a new artifact, recorded as such
    code, out, err = cli("train-generator", "--objective", "sft", "--anchor", "retrieved", "--anchor-k", "1",
                         "--anchor-train", "own", *tasks, *tiny, "--json")
    assert code == 0, err
    own = json.loads(out)
    assert own["ref"] != trained["ref"] and own["meta"]["training"]["anchor_training"] == "own"
    assert "anchor_training" not in meta["training"]  # the leave-one-out default keeps earlier fingerprints
    # on top of a fixed adapter (--under): trained with it under the generated LoRA, stacked under each output
    code, out, err = cli("train-generator", "--objective", "sft", "--anchor", "retrieved", "--anchor-k", "1",
                         "--anchor-train", "own", "--under", refs["letter_count"], *tasks, *tiny, "--json")
    assert code == 0, err
    under = json.loads(out)
    assert under["meta"]["under"] == refs["letter_count"] and under["ref"] != own["ref"]
    code, out, err = cli("generate", "--task", "add_sub", "--name", "gen-under", "--generator", under["ref"], "--json")
    assert code == 0, err
    stacked = json.loads(out)
    assert stacked["rank"] == 8 and stacked["parents"] == [{"ref": refs["add_sub"], "weight": 1.0},
                                                           {"ref": refs["letter_count"], "weight": 1.0}]
    with Registry.open(registry_home) as reg:
        weights, config = reg.load_weights(stacked["ref"])
        below, below_config = reg.load_weights(refs["letter_count"])
    assert config["r"] == 8 and config["lora_alpha"] / 8 == below_config["lora_alpha"] / below_config["r"]
    for key, value in below.items():  # the adapter under it: the second half of the rank, unchanged
        key = next(k for k in weights if k.endswith(key.removeprefix("base_model.model.")))
        part = value if "lora_A" in key else value.T
        stacked_part = weights[key][4:] if "lora_A" in key else weights[key][:, 4:].T
        torch.testing.assert_close(stacked_part, part.float())
    # the entropy gate: the generated adapter, or the adapter under it alone, whichever the base is surer with
    code, out, err = cli("generate", "--task", "add_sub", "--name", "gen-gated", "--generator", under["ref"],
                         "--gate", "--json")
    assert code == 0, err
    gated = json.loads(out)
    gate = gated["recipe"]["gate"]
    assert gate["kept"] in ("generated", "under") and (gate["kept"] == "generated") == (gate["generated"] < gate["under"])
    with Registry.open(registry_home) as reg:
        gated_weights, _ = reg.load_weights(gated["ref"])
    if gate["kept"] == "under":  # the adapter under the generator, alone and unchanged
        assert gated["parents"] == [{"ref": refs["letter_count"], "weight": 1.0}] and gated["rank"] == 4
        assert all(torch.equal(gated_weights[k], below[k]) for k in below)
    else:  # the stacked adapter of the plain call, bit for bit
        assert gated["parents"] == stacked["parents"]
        assert all(torch.equal(gated_weights[k], weights[k]) for k in weights)
    with Registry.open(registry_home) as reg:
        before = [a.ref for a in reg.list_adapters()]
    code, _, err = cli("generate", "--task", "add_sub", "--name", "no-gate", "--generator", own["ref"], "--gate")
    assert code != 0 and "has no adapter under it" in err and "Traceback" not in err
    with Registry.open(registry_home) as reg:
        assert [a.ref for a in reg.list_adapters()] == before
    from conftest import make_tiny_adapter_dir

    with Registry.open(registry_home) as reg:  # an adapter of another layout (rank 2) cannot sit under it
        misfit = reg.add_directory(make_tiny_adapter_dir(tiny_base_dir, registry_home.parent / "r2", rank=2),
                                   name="misfit").ref
    code, _, err = cli("train-generator", "--objective", "sft", "--anchor", "retrieved", "--anchor-k", "1",
                       "--under", misfit, *tasks, *tiny)
    assert code != 0 and f"--under adapter {misfit} does not fit" in err and "Traceback" not in err
    code, _, err = cli("train-generator", "--objective", "sft", "--under", "multitask", "--anchor", "multitask",
                       *tasks, *tiny)
    assert code != 0 and "is already the anchor" in err and "Traceback" not in err
    code, _, err = cli("train-generator", "--objective", "sft", "--anchor", "retrieved", "--anchor-train", "self",
                       *tasks, *tiny)
    assert code != 0 and "--anchor-train must be one of others, own" in err and "Traceback" not in err
    code, _, err = cli("train-generator", "--objective", "sft", "--anchor-train", "own", *tasks, *tiny)
    assert code != 0 and "--anchor-train applies to --objective sft with --anchor retrieved only" in err
    code, _, err = cli("train-generator", "--objective", "sft", "--anchor", "retrieved", "--anchor-k", "0", *tasks, *tiny)
    assert code != 0 and "--anchor-k must be >= 1" in err and "Traceback" not in err
    code, _, err = cli("train-generator", "--objective", "sft", "--anchor-k", "2", *tasks, *tiny)
    assert code != 0 and "--anchor-k applies to --objective sft with --anchor retrieved only" in err


def test_rank_gated_head_starts_at_its_anchor_and_gates_rank_components(setting):
    """Untrained, the gated generator is its anchor; a gate scales exactly one rank row of one A."""
    from generator.sft import RankGatedGenerator, rank_gate_index

    layout = setting["layout"]
    anchor = state_dict_to_tokens(setting["state"], layout)                       # (T, h, w)
    config = DnDConfig.from_layout(layout, **TINY_DECODER)
    generator = RankGatedGenerator(layout, config, anchor)
    condition = setting["tasks"]["a"].condition[:4][None]                        # (1, N, L, C)
    torch.testing.assert_close(generator(condition)[0], anchor * generator.mask)
    index = rank_gate_index(layout)
    first = layout.modules[0]
    assert index[first.a_start, 1] == 1 and index[first.b_start, 0] == len(layout.modules) * first.rank
    gates = torch.ones(1, len(layout.modules) * first.rank)
    gates[0, 1] = 0.0                                                            # module 0, rank row 1 off
    grid = generator.apply_gates(gates)[0]
    factors, plain = lora_factors(grid, layout), lora_factors(anchor, layout)
    a, b = factors[first.prefix]
    assert torch.all(a[1] == 0) and torch.equal(a[0], plain[first.prefix][0][0]) and torch.equal(b, plain[first.prefix][1])


def test_rank_gated_generator_is_condition_sensitive(setting):
    """Trained through the tiny llama on two tasks, each task's prompts give a LoRA better on that
    task than the other task's (the gates read the prompts; the shared LoRA alone cannot tell)."""
    from generator.sft import RankGatedGenerator

    torch.manual_seed(0)
    model, layout, tasks = setting["model"], setting["layout"], setting["tasks"]
    config = DnDConfig.from_layout(layout, **TINY_DECODER)
    generator = RankGatedGenerator(layout, config, seed=0)
    generator, state = train_sft(generator, model, list(tasks.values()), layout, steps=60, scaling=2.0,
                                 pad_id=setting["pad_id"], lr=1e-2, tasks_per_step=2, items_per_task=6)
    assert state.losses[-1] < state.losses[0] - 0.3, state.losses[::10]
    weights = {name: generate_weights(generator, task.condition) for name, task in tasks.items()}
    assert_own_beats_other(model, layout, weights, tasks, setting["pad_id"])


def _family_tasks(setting, families: dict[str, str], members: int, seed: int = 0) -> dict[str, SFTTask]:
    """``members`` tasks per family (name -> answer): one answer per family, each task's condition a
    cloud around its family's centre plus a task offset, so family members are each other's nearest."""
    from registry.lm import encode_example

    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    tasks = {}
    for family, answer in families.items():
        centre = torch.randn(8, 32, generator=generator)
        for i in range(members):
            offset = centre + 0.3 * torch.randn(8, 32, generator=generator)
            condition = offset + 0.1 * torch.randn(12, 8, 32, generator=generator)  # (P, L, C)
            prompts = [f"{rng.randint(0, 99)} plus {rng.randint(0, 9)}" for _ in range(24)]
            examples = [encode_example(setting["tokenizer"], p, answer, max_length=32) for p in prompts]
            tasks[f"{family}{i}"] = SFTTask(f"{family}{i}", condition, examples)
    return tasks


def test_retrieval_router_leaves_a_task_out_and_starts_at_its_anchor(setting):
    from generator.sft import RankGatedGenerator, router_keys

    layout = setting["layout"]
    anchor = state_dict_to_tokens(setting["state"], layout)                       # (T, h, w)
    conditions = [t.condition for t in setting["tasks"].values()]
    generator = RankGatedGenerator(layout, DnDConfig.from_layout(layout, **TINY_DECODER), anchor,
                                   keys=router_keys(conditions))
    condition = conditions[0][:4][None]                                          # (1, N, L, C)
    torch.testing.assert_close(generator(condition)[0], anchor * generator.mask)  # values start at 0: gain 1
    standard = (generator.keys[:1] - generator.centre) / generator.spread        # task 0's own key
    assert generator.retrieval_weights(standard)[0, 0] > 0.99                     # nearest to itself...
    left_out = generator.retrieval_weights(standard, exclude=0)[0]
    assert left_out[0] == 0 and torch.isclose(left_out.sum(), torch.tensor(1.0))  # ...unless left out
    with pytest.raises(ValueError, match="tasks >= 2"):
        RankGatedGenerator(layout, generator.config, keys=router_keys(conditions[:1]))


def test_retrieval_router_transfers_to_an_unseen_family_member(setting):
    """Trained leave-one-out on two families of three tasks, the routed head gives an *unseen* member
    of each family an adapter better on that member than the other family's unseen member's adapter."""
    from generator.sft import RankGatedGenerator, router_keys

    torch.manual_seed(0)
    model, layout = setting["model"], setting["layout"]
    tasks = _family_tasks(setting, {"yes": "yes", "no": "no"}, members=4)
    unseen = {"yes": tasks.pop("yes3"), "no": tasks.pop("no3")}
    training = list(tasks.values())
    for index, task in enumerate(training):
        task.key_index = index
    generator = RankGatedGenerator(layout, DnDConfig.from_layout(layout, **TINY_DECODER), seed=0,
                                   keys=router_keys([t.condition for t in training]))
    generator, state = train_sft(generator, model, training, layout, steps=150, scaling=2.0,
                                 pad_id=setting["pad_id"], lr=1e-2, tasks_per_step=2, items_per_task=6)
    assert state.losses[-1] < state.losses[0] - 0.3, state.losses[::10]
    weights = {name: generate_weights(generator, task.condition) for name, task in unseen.items()}
    assert_own_beats_other(model, layout, weights, unseen, setting["pad_id"])


@pytest.mark.parametrize("head", ["gated", "routed"])
def test_train_generator_sft_with_the_gated_head(cli, registry_home, tiny_base_dir, head):
    """`--head gated|routed`: stored as a generator-dnd-sft artifact with that head, and `registry
    generate` writes a PEFT-loadable adapter; a gated head with a retrieved anchor is refused in one line."""
    import json

    from harvest.service import harvest_task, resolve_task
    from harvest.train import HarvestConfig
    from registry.store import Registry

    config = HarvestConfig(steps=2, n_checkpoints=1, batch_size=2, rank=4, target_modules=("q_proj", "v_proj"))
    names = ("add_sub", "letter_count")
    with Registry.open(registry_home) as reg:
        for n in names:
            harvest_task(reg, resolve_task(n), base=str(tiny_base_dir), config=config)
    tiny = ["--n-prompts", "4", "--prompt-tokens", "8", "--steps", "2", "--save-every", "2", "--device", "cpu"]
    tasks = [a for n in names for a in ("--tasks", n)]
    code, out, err = cli("train-generator", "--objective", "sft", "--head", head, *tasks, *tiny, "--json")
    assert code == 0, err
    trained = json.loads(out)
    assert trained["meta"]["head"] == head and trained["meta"]["training"]["head"] == head
    assert trained["meta"].get("router_tasks") == (list(names) if head == "routed" else None)
    assert trained["meta"]["anchor"]  # the multitask LoRA it started from
    code, out, err = cli("generate", "--task", "add_sub", "--name", f"{head}-gen", "--generator", trained["ref"], "--json")
    assert code == 0, err
    generated = json.loads(out)
    assert generated["recipe"]["arch"] == "dnd-sft"
    code, _, err = cli("train-generator", "--objective", "sft", "--head", head, "--anchor", "retrieved", *tasks, *tiny)
    assert code != 0 and f"--head {head} applies to" in err and "Traceback" not in err
    code, _, err = cli("train-generator", "--objective", "sft", "--head", "wide", *tasks, *tiny)
    assert code != 0 and "--head must be one of residual, gated, routed" in err and "Traceback" not in err


def test_embedding_standardiser_puts_task_means_about_one_unit_apart(setting):
    from generator.sft import embedding_standardiser, mean_prompt_embedding

    conditions = [t.condition + 5.0 for t in setting["tasks"].values()]  # a large shared offset
    centre, spread = embedding_standardiser(conditions)
    standard = [(mean_prompt_embedding(c[None]) - centre) / spread for c in conditions]  # each (1, C)
    assert float((standard[0] + standard[1]).abs().max()) < 1e-5  # two tasks: symmetric about the centre
    assert float(standard[0].norm()) == pytest.approx(1.0, rel=1e-4)
