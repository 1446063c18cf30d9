"""The CVAE given the SFT objective (generator.cvae_sft) on the tiny llama: only the decoder side
trains (the basis and the base stay), the fine-tuned CVAE is condition-sensitive, and the CLI stores
an ordinary generator-cvae artifact that `registry generate` uses."""

from __future__ import annotations

import json
import random

import torch
from safetensors.torch import load_file

from generator.cvae import CVAEConfig, LoraCVAE, flatten_tokens
from generator.cvae_sft import CVAEPriorDecoder
from generator.sft import SFTTask, train_sft
from generator.tokenizer import TokenNormalizer, layout_from_state_dict, state_dict_to_tokens, token_mask
from test_generator_sft import assert_own_beats_other

HIDDEN = 32  # the tiny llama's hidden size (tests/conftest.py)
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


def test_cvae_sft_trains_the_decoder_side_only_and_is_condition_sensitive(tiny_base_dir, tiny_adapter_factory):
    torch.manual_seed(0)
    model, layout, normalizer, cvae, tasks, pad_id = _tiny_setting(tiny_base_dir, tiny_adapter_factory)
    basis, encoder = cvae.basis.detach().clone(), {k: v.clone() for k, v in cvae.encoder.state_dict().items()}
    generator = CVAEPriorDecoder(cvae, normalizer, layout, n_prompts=4)
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


def test_train_generator_cvae_sft_end_to_end(cli, registry_home, tiny_base_dir):
    """`train-generator --arch cvae --objective sft`: a reconstruction CVAE first (stored as
    `<name>-recon`), then the fine-tuned one, an ordinary generator-cvae artifact that `generate` uses;
    a rerun finds it; flags that belong to the DnD heads are refused in one line."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harvest.service import harvest_task, resolve_task
    from harvest.train import HarvestConfig
    from registry.store import Registry

    config = HarvestConfig(steps=2, n_checkpoints=1, batch_size=2, rank=4, target_modules=("q_proj", "v_proj"))
    names = ("add_sub", "letter_count")
    with Registry.open(registry_home) as reg:
        for n in names:
            harvest_task(reg, resolve_task(n), base=str(tiny_base_dir), config=config)
    tiny = ["--arch", "cvae", "--objective", "sft", "--positions", "16", "--flat-channels", "4", "--latent-dim", "8",
            "--cond-embed", "8", "--n-prompts", "4", "--items-per-task", "2", "--recon-steps", "2", "--steps", "3",
            "--save-every", "2", "--device", "cpu", *[a for n in names for a in ("--tasks", n)]]
    code, out, err = cli("train-generator", *tiny, "--json")
    assert code == 0, err
    info = json.loads(out)
    meta = info["meta"]
    assert info["artifact_type"] == "generator-cvae" and info["name"] == "cvae-sft"
    assert meta["objective"] == "sft" and meta["sft"]["steps"] == 3 and meta["sft_tasks"] == list(names)
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
