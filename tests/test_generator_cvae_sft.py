"""The CVAE given the SFT objective (generator.cvae_sft) on the tiny llama: only the decoder side
trains (the basis and the base stay), the fine-tuned CVAE is condition-sensitive, and the CLI stores
an ordinary generator-cvae artifact that `registry generate` uses."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from generator.cvae import CVAEConfig, LoraCVAE, flatten_tokens, unflatten_tokens
from generator.cvae_sft import CVAEPriorDecoder
from generator.sft import SFTTask, train_sft
from generator.tokenizer import TokenNormalizer, layout_from_state_dict, state_dict_to_tokens, token_mask
from registry.store import Registry
from test_generator_sft import assert_own_beats_other

HIDDEN = 32  # the tiny llama's hidden size (tests/conftest.py)
TINY_TASKS = ("add_sub", "letter_count")
TINY_CVAE = dict(strides=[4, 4], channels=[16, 32], flat_channels=16, latent_dim=32, cond_embed=16, basis_dim=2)


def _tiny_setting(tiny_base_dir, tiny_adapter_factory):
    """The tiny llama, a q/v rank-4 layout, a CVAE fitted to two adapters, and two tasks whose
    answers differ ('yes' / 'no') and whose prompt states are distinct clouds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from registry.lm import encode_example

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    states = [load_file(str(tiny_adapter_factory(n, rank=4, seed=i) / "adapter_model.safetensors"))
              for i, n in enumerate(("a", "b"))]
    layout = layout_from_state_dict(states[0])
    grids = torch.stack([state_dict_to_tokens(s, layout) for s in states])    # (2, T, h, w)
    mask = token_mask(layout)
    normalizer = TokenNormalizer.fit([grids], mask)
    cvae = LoraCVAE(CVAEConfig.from_layout(layout, cond_dim=HIDDEN, **TINY_CVAE))
    cvae.fit_basis(flatten_tokens(normalizer.normalize(grids), mask))         # (2, D)
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    tasks = {}
    for name, answer in (("a", "yes"), ("b", "no")):
        prompts = [f"{rng.randint(0, 99)} plus {rng.randint(0, 9)}" for _ in range(24)]
        centre = torch.randn(HIDDEN, generator=generator)
        condition = centre + 0.3 * torch.randn(12, HIDDEN, generator=generator)  # (P, H) prompt states
        tasks[name] = SFTTask(name, condition, [encode_example(tokenizer, p, answer, max_length=32) for p in prompts])
    cvae.fit_condition(torch.stack([t.condition.mean(dim=0) for t in tasks.values()]))
    return model, layout, normalizer, cvae, tasks, tokenizer.pad_token_id or 0


@pytest.mark.parametrize("anchored", [False, True], ids=["whole-adapter", "anchored"])
def test_cvae_sft_trains_the_decoder_side_only_and_is_condition_sensitive(tiny_base_dir, tiny_adapter_factory,
                                                                          anchored):
    torch.manual_seed(0)
    model, layout, normalizer, cvae, tasks, pad_id = _tiny_setting(tiny_base_dir, tiny_adapter_factory)
    basis, encoder = cvae.basis.detach().clone(), {k: v.clone() for k, v in cvae.encoder.state_dict().items()}
    anchor = _generic_anchor(tiny_adapter_factory, layout) if anchored else None
    generator = CVAEPriorDecoder(cvae, normalizer, layout, n_prompts=4, anchor=anchor)
    assert "cvae.basis" not in generator.state_dict()  # frozen and not part of the training state
    start = {name: generator(task.condition[None]).detach()[0] for name, task in tasks.items()}
    generator, state = train_sft(generator, model, list(tasks.values()), layout, steps=60, scaling=2.0,
                                 pad_id=pad_id, lr=1e-2, tasks_per_step=2, items_per_task=6)
    assert state.step == 60 and state.losses[-1] < state.losses[0] - 0.3, state.losses[::10]
    assert torch.equal(cvae.basis, basis)
    assert all(torch.equal(v, encoder[k]) for k, v in cvae.encoder.state_dict().items())
    assert torch.equal(generator.persistent_state()["basis"], basis)
    with torch.no_grad():
        weights = {name: generator(task.condition[None])[0] for name, task in tasks.items()}  # (T, h, w)
    assert all(not torch.allclose(weights[n], start[n]) for n in tasks)
    assert_own_beats_other(model, layout, weights, tasks, pad_id)
    if anchored:  # what the artifact stores: the anchored denormalisation as an ordinary normaliser
        stored = generator.effective_normalizer()
        flat = cvae.decode(torch.zeros(1, cvae.config.latent_dim),
                           cvae.embed_condition(tasks["a"].condition[None].mean(dim=1)))      # (1, D)
        assert torch.allclose(stored.denormalize(unflatten_tokens(flat, token_mask(layout)))[0], weights["a"],
                              atol=1e-6)


def _generic_anchor(tiny_adapter_factory, layout):
    """A third adapter's token grid (T, h, w): the generic adapter an anchored CVAE starts from."""
    state = load_file(str(tiny_adapter_factory("generic", rank=4, seed=7) / "adapter_model.safetensors"))
    return state_dict_to_tokens(state, layout)


def test_anchored_cvae_starts_at_its_anchor_whatever_the_prompts(tiny_base_dir, tiny_adapter_factory):
    """With the gate at 0 the anchored decoder is its anchor for every condition; with the default
    gate (a tenth of the training spread) it stays within a tenth of that spread of it."""
    _, layout, normalizer, cvae, tasks, _ = _tiny_setting(tiny_base_dir, tiny_adapter_factory)
    anchor = _generic_anchor(tiny_adapter_factory, layout)
    mask = token_mask(layout)
    generator = CVAEPriorDecoder(cvae, normalizer, layout, n_prompts=4, anchor=anchor)
    with torch.no_grad():
        default = {n: generator(t.condition[None])[0] for n, t in tasks.items()}              # (T, h, w)
        generator.gate.zero_()
        zeroed = {n: generator(t.condition[None])[0] for n, t in tasks.items()}
    assert all(torch.equal(w, anchor * mask) for w in zeroed.values())
    whole = CVAEPriorDecoder(cvae, normalizer, layout, n_prompts=4)
    with torch.no_grad():
        deviation = {n: whole(t.condition[None])[0] - normalizer.mean for n, t in tasks.items()}
    assert all(torch.allclose(default[n] - anchor * mask, 0.1 * deviation[n] * mask, atol=1e-6) for n in tasks)
    assert not torch.equal(default["a"], default["b"])  # the condition still matters
    with pytest.raises(ValueError, match="does not match layout"):
        CVAEPriorDecoder(cvae, normalizer, layout, n_prompts=4, anchor=anchor[:-1])


def _tiny_cvae_sft_args(registry_home, tiny_base_dir) -> list[str]:
    """Harvest two zoo tasks on the tiny llama; the `train-generator` flags of a tiny CVAE on them
    with the SFT objective (steps not included)."""
    from harvest.service import harvest_task, resolve_task
    from harvest.train import HarvestConfig

    config = HarvestConfig(steps=2, n_checkpoints=1, batch_size=2, rank=4, target_modules=("q_proj", "v_proj"))
    with Registry.open(registry_home) as reg:
        for n in TINY_TASKS:
            harvest_task(reg, resolve_task(n), base=str(tiny_base_dir), config=config)
    return ["--arch", "cvae", "--objective", "sft", "--positions", "16", "--flat-channels", "4", "--latent-dim", "8",
            "--cond-embed", "8", "--n-prompts", "4", "--items-per-task", "2", "--recon-steps", "2", "--device", "cpu",
            *[a for n in TINY_TASKS for a in ("--tasks", n)]]


def test_train_generator_cvae_sft_end_to_end(cli, registry_home, tiny_base_dir):
    """`train-generator --arch cvae --objective sft`: a reconstruction CVAE first (stored as
    `<name>-recon`), then the fine-tuned one, an ordinary generator-cvae artifact that `generate` uses;
    a rerun finds it; flags that belong to the DnD heads are refused in one line."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny = [*_tiny_cvae_sft_args(registry_home, tiny_base_dir), "--steps", "3", "--save-every", "2"]
    code, out, err = cli("train-generator", *tiny, "--json")
    assert code == 0, err
    info = json.loads(out)
    meta = info["meta"]
    assert info["artifact_type"] == "generator-cvae" and info["name"] == "cvae-sft"
    assert meta["objective"] == "sft" and meta["sft"]["steps"] == 3 and meta["sft_tasks"] == list(TINY_TASKS)
    assert meta["fine_tuned_from"].startswith("cvae-sft-recon@") and meta["steps"] == 2
    code, out, err = cli("generate", "--task", "add_sub", "--name", "cvae-sft-gen", "--generator", info["ref"], "--json")
    assert code == 0, err
    generated = json.loads(out)
    assert generated["recipe"]["arch"] == "cvae" and generated["recipe"]["generator"] == info["ref"]
    with Registry.open(registry_home) as reg:
        path = reg.fetch(generated["ref"])
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), path)  # loads
    code, out, err = cli("train-generator", *tiny, "--json")
    assert code == 0 and json.loads(out)["ref"] == info["ref"], err
    code, out, err = cli("train-generator", *tiny, "--steps", "4", "--json")  # more steps: continues from 3
    assert code == 0, err
    longer = json.loads(out)
    assert longer["ref"] != info["ref"] and longer["meta"]["sft"]["resumed_from"] == 3
    assert longer["meta"]["fine_tuned_from"] == meta["fine_tuned_from"]  # stage 1 is not trained again
    for extra, message in ((["--head", "gated"], "--arch cvae takes --objective recon or sft"),
                           (["--contrast-weight", "0.5"], "--arch cvae takes --objective recon or sft")):
        code, _, err = cli("train-generator", *tiny, *extra)
        assert code != 0 and message in err and "Traceback" not in err
    code, _, err = cli("train-generator", "--arch", "cvae", "--recon-steps", "5")
    assert code != 0 and "--recon-steps applies to --arch cvae --objective sft only" in err and "Traceback" not in err


def test_train_generator_cvae_sft_anchored_on_the_multitask_lora(cli, registry_home, tiny_base_dir):
    """`--arch cvae --objective sft --anchor multitask`: the multitask LoRA is trained first, and the
    stored artifact's normaliser is the anchored one (mean = that LoRA, std = gate * the stage-1 std),
    so `generate` needs nothing new; a retrieved anchor, or an anchor without SFT, is refused."""
    tiny = [*_tiny_cvae_sft_args(registry_home, tiny_base_dir), "--steps", "2"]
    code, out, err = cli("train-generator", *tiny, "--anchor", "multitask", "--name", "anchored", "--json")
    assert code == 0, err
    info = json.loads(out)
    meta = info["meta"]
    assert meta["anchor"] and meta["parametrisation"].startswith("anchor + gate") and 0 < meta["anchor_gate"] < 1
    with Registry.open(registry_home) as reg:
        tensors, _ = reg.load_artifact(info["ref"], "generator-cvae")
        recon, _ = reg.load_artifact(meta["fine_tuned_from"], "generator-cvae")
        anchor = load_file(str(reg.fetch(meta["anchor"]) / "adapter_model.safetensors"))
    layout = layout_from_state_dict(anchor)
    mask = token_mask(layout)
    assert torch.allclose(tensors["normalizer.mean"].float(), state_dict_to_tokens(anchor, layout) * mask, atol=1e-3)
    assert torch.allclose(tensors["normalizer.std"].float(), meta["anchor_gate"] * recon["normalizer.std"].float(),
                          rtol=1e-3)
    code, out, err = cli("generate", "--task", "add_sub", "--name", "anchored-gen", "--generator", info["ref"], "--json")
    assert code == 0 and json.loads(out)["recipe"]["generator"] == info["ref"], err
    for args, message in ((["--anchor", "retrieved"], "retrieved --anchor"),):
        code, _, err = cli("train-generator", *tiny, *args)
        assert code != 0 and message in err and "Traceback" not in err
    code, _, err = cli("train-generator", "--arch", "cvae", "--anchor", "multitask")
    assert code != 0 and "--anchor applies to --objective sft or both only" in err and "Traceback" not in err
