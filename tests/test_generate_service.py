"""The DnD generator as a registry service: train-generator, generate, generators (tiny llama, real encoder)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from generator.service import (ARTIFACT_TYPE, GeneratorError, GeneratorLayoutError, TrainingStopped,
                               collect_training_set, generate_adapter, generate_state_dict_for,
                               prompts_sha256, train_generator_from_registry)

TASK_PROMPTS = {
    "add": [f"What is {a} plus {b}?" for a, b in [(2, 3), (7, 1), (4, 9), (12, 5), (6, 6), (3, 8), (10, 2), (1, 1)]],
    "reverse": [f"Reverse the word {w}." for w in ["cat", "house", "river", "apple", "stone", "cloud", "green", "table"]],
    "sort": [f"Sort these letters: {s}" for s in ["c a b", "z x y", "m k l", "q p r", "f d e", "j h i", "w u v", "t s r"]],
}
# A decoder small enough to train in well under a second per step on one CPU core.
TINY = dict(n_prompts=4, prompt_tokens=8, n_layers=2, hidden_tokens=8, kernel=3)
TINY_CLI = ["--n-prompts", "4", "--prompt-tokens", "8", "--layers", "2", "--hidden-tokens", "8", "--kernel", "3"]


def adapter_files(directory: Path) -> tuple[dict, dict]:
    return (load_file(str(directory / "adapter_model.safetensors")),
            json.loads((directory / "adapter_config.json").read_text()))


def add_harvested(reg, factory, task: str, seed: int, checkpoints: int = 2, **adapter_kwargs) -> list:
    """Simulate `registry harvest`: a few noisy end-of-training checkpoints of one task's LoRA."""
    state_dict, config = adapter_files(factory(f"{task}-{seed}", seed=seed, **adapter_kwargs))
    generator = torch.Generator().manual_seed(seed)
    infos = []
    for step in range(checkpoints):
        noisy = {k: v + 0.002 * torch.randn(v.shape, generator=generator) for k, v in state_dict.items()}
        infos.append(reg.add_weights(
            f"{task}-ckpt", noisy, config, kind="harvested", task=task, task_description=f"the {task} task",
            prompts=TASK_PROMPTS.get(task, TASK_PROMPTS["add"])[step::2] + [f"{task} example {step}"],
            metrics={"loss": 1.0 / (step + 1)}, recipe={"task": task, "step": 100 + step, "seed": seed}))
    return infos


@pytest.fixture
def harvested(reg, tiny_adapter_factory):
    """Three tasks, two checkpoints each, in the (parametrised) registry."""
    return {task: add_harvested(reg, tiny_adapter_factory, task, seed) for seed, task in enumerate(TASK_PROMPTS)}


def registry_state(home: Path) -> tuple:
    """What a reader could see: adapters, blobs, artifacts, cached fetches."""
    from registry.store import Registry

    with Registry.open(home) as reg:
        adapters = [a.ref for a in reg.list_adapters(include_removed=True)]
        blobs = sorted(reg.blobs.all_digests())
        artifacts = [a.ref for a in reg.list_artifacts()]
    fetched = sorted(p.name for p in (home / "fetched").glob("*")) if (home / "fetched").exists() else []
    return adapters, blobs, artifacts, fetched


# -----------------------------------------------------------------------------
# training


def test_train_generator_records_exactly_what_it_trained_on(reg, harvested):
    artifact = train_generator_from_registry(reg, exclude_tasks=["sort"], steps=5, lr=1e-2, batch_size=2,
                                             device="cpu", **TINY)
    meta = artifact.meta
    expected = [{"ref": i.ref, "digest": i.digest, "task": i.task} for t in ("add", "reverse") for i in harvested[t]]
    assert artifact.artifact_type == ARTIFACT_TYPE and artifact.ref == "dnd@1"
    assert meta["adapters"] == expected
    assert meta["tasks"] == ["add", "reverse"] and meta["excluded_tasks"] == ["sort"]
    assert meta["checkpoints_per_task"] == {"add": 2, "reverse": 2}
    first = harvested["add"][0]
    assert meta["base_model"] == first.base_model == artifact.base_model
    assert meta["base_fingerprint"] == first.base_fingerprint
    assert meta["peft_config"] == {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": False}
    assert meta["layout_fingerprint"] == meta["layout"]["fingerprint"] == meta["config"]["layout_fingerprint"]
    assert meta["encoder"] == reg.encoder_id and meta["prompt_tokens"] == 8 and meta["n_prompts"] == 4
    assert meta["steps"] == 5 and [s for s, _ in meta["loss_curve"]] == [1, 2, 3, 4, 5]
    assert meta["final_loss"] == meta["loss_curve"][-1][1] and meta["wall_time_s"] > 0
    assert meta["code_version"].startswith("dnd-service/")
    tensors, _ = reg.load_artifact(artifact.ref)
    assert {k.split(".")[0] for k in tensors} == {"decoder", "normalizer"}
    assert tensors["normalizer.std"].shape[0] == meta["config"]["tokens"]

    # rerunning the finished command returns what it stored instead of a duplicate version
    again = train_generator_from_registry(reg, exclude_tasks=["sort"], steps=5, lr=1e-2, batch_size=2,
                                          device="cpu", **TINY)
    assert again.ref == artifact.ref and len(reg.list_artifacts(ARTIFACT_TYPE)) == 1


def test_collect_training_set_filters_and_refuses_mixed_sets(reg, harvested, tiny_adapter_factory):
    checkpoints, prompts, adapters = collect_training_set(reg, tasks=["add", "sort"])
    assert sorted(checkpoints) == ["add", "sort"] and len(checkpoints["add"]) == 2
    assert {a["task"] for a in adapters} == {"add", "sort"}
    # prompts per task: the union of its checkpoints' stored prompts
    assert set(prompts["add"]) == set(TASK_PROMPTS["add"]) | {"add example 0", "add example 1"}
    with pytest.raises(GeneratorError, match="at least 2 tasks"):
        collect_training_set(reg, exclude_tasks=["add", "reverse"])
    with pytest.raises(GeneratorError, match="no harvested adapters for task"):
        collect_training_set(reg, exclude_tasks=["addd"])
    add_harvested(reg, tiny_adapter_factory, "wide", seed=9, checkpoints=1, rank=8)
    with pytest.raises(GeneratorError, match="do not share one base model and layout"):
        collect_training_set(reg)
    assert sorted(collect_training_set(reg, exclude_tasks=["wide"]).checkpoints) == ["add", "reverse", "sort"]


def test_interrupted_training_resumes_to_the_same_weights(reg, harvested):
    options = dict(steps=7, lr=1e-2, batch_size=2, device="cpu", save_every=3, **TINY)
    straight = train_generator_from_registry(reg, resume=False, **options)

    def stop_at_four(step, total, loss):
        return step < 4

    with pytest.raises(TrainingStopped, match="stopped at step 4/7"):
        train_generator_from_registry(reg, resume=False, on_step=stop_at_four, **options)
    assert [a.ref for a in reg.list_artifacts(ARTIFACT_TYPE)] == [straight.ref]  # nothing stored when stopped
    seen = []
    resumed = train_generator_from_registry(reg, on_step=lambda s, t, loss: seen.append((s, t)), **options)
    assert seen == [(5, 7), (6, 7), (7, 7)] and resumed.meta["training"]["resumed_from"] == 4
    assert resumed.ref == "dnd@2" and resumed.sha256 == straight.sha256  # bit-identical tensors
    assert resumed.meta["loss_curve"] == straight.meta["loss_curve"]


# -----------------------------------------------------------------------------
# generating


def test_generate_end_to_end_and_peft_loads_it(cli, harvested, tiny_base_dir, registry_home, tmp_path, reg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, out, err = cli("train-generator", "--steps", "4", "--lr", "0.01", "--batch-size", "2",
                         "--exclude-tasks", "sort", "--device", "cpu", *TINY_CLI, "--json")
    assert code == 0, err
    artifact = json.loads(out)
    assert {a["task"] for a in artifact["meta"]["adapters"]} == {"add", "reverse"}  # sort held out
    code, out, _ = cli("generators", "--json")
    assert [g["ref"] for g in json.loads(out)] == ["dnd@1"]

    prompts_file = tmp_path / "sort.txt"
    prompts_file.write_text("\n".join(TASK_PROMPTS["sort"]) + "\n")
    code, out, err = cli("generate", "--prompts", prompts_file, "--name", "sort-dnd", "--precision", "fp32", "--json")
    assert code == 0, err
    generated = json.loads(out)
    assert generated["ref"] == "sort-dnd@1" and generated["kind"] == "generated"
    assert generated["timings"]["store_s"] > 0 and generated["timings"]["decode_s"] > 0
    info = reg.resolve("sort-dnd")
    assert info.parents == [] and info.base_model == harvested["add"][0].base_model
    assert info.recipe["generator"] == "dnd@1" and info.recipe["generator_digest"] == artifact["sha256"]
    assert info.recipe["precision"] == "fp32" and generated["timings"]["precision"] == "fp32"
    assert info.recipe["prompts_sha256"] == prompts_sha256(TASK_PROMPTS["sort"])
    assert reg.prompts(info.ref) == TASK_PROMPTS["sort"]
    # the stored prompt vectors (from the generator's own encoder pass) are the registry's embeddings
    from registry.embeddings import embed_texts
    torch.testing.assert_close(torch.from_numpy(reg.prompt_embeddings(info.ref)),
                               torch.from_numpy(embed_texts(TASK_PROMPTS["sort"])), atol=1e-5, rtol=0)
    from registry.store import Registry
    with Registry.open() as fresh:  # (``reg``'s in-memory index predates the CLI's add)
        assert fresh.search(TASK_PROMPTS["sort"][0], k=1, kind="generated")[0].adapter.ref == info.ref

    path = reg.fetch(info.ref)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)  # fresh copy: PEFT injects layers into it
    model = PeftModel.from_pretrained(base, path)
    stored, _ = reg.load_weights(info.ref)
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(lora) == len(stored) == 8
    for key, value in stored.items():
        torch.testing.assert_close(lora[key.replace(".weight", ".default.weight")], value)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

    # the warm path: the decoded generator is cached per process, same prompts give the same weights
    state_dict, peft_config, timings = generate_state_dict_for(reg, TASK_PROMPTS["sort"], precision="fp32")
    assert timings["cached"] and timings["load_s"] == 0.0
    assert peft_config["base_model_name_or_path"] == info.base_model
    for key, value in stored.items():
        torch.testing.assert_close(state_dict[key], value)

    # --task: a task JSONL file's train-split prompts (a fixed sample); the adapter records the task
    task_file = tmp_path / "letters.jsonl"
    task_file.write_text("".join(json.dumps({"prompt": f"Sort these letters: {a} {b} {c}", "answer": "".join(sorted(a + b + c))}) + "\n"
                                 for a, b, c in ["cab", "zxy", "mkl", "qpr", "fde", "jhi", "wuv", "tsr", "onm", "gfe"]))
    code, out, err = cli("generate", "--task", task_file, "--name", "letters-dnd", "--generator", "dnd@1", "--json")
    assert code == 0, err
    assert json.loads(out)["task"] == "letters" and len(reg.prompts("letters-dnd")) >= 5
    code, out, err = cli("generate", "--task", task_file, "--name", "letters-dnd")
    assert code == 0 and out.startswith("generated letters-dnd@2") and "decode" in err
    from registry.precision import resolve
    assert reg.resolve("letters-dnd@2").recipe["precision"] == resolve("auto")  # the default, resolved


def test_bad_inputs_are_refused_without_writing(cli, harvested, reg, registry_home, tmp_path, tiny_adapter_factory):
    from conftest import build_tiny_llama
    from generator.tokenizer import layout_from_state_dict

    artifact = train_generator_from_registry(reg, steps=2, batch_size=2, device="cpu", **TINY)
    tensors, info = reg.load_artifact(artifact.ref)
    # a stored layout that was edited after the fact: its fingerprint no longer matches
    edited = copy.deepcopy(info.meta)
    edited["layout"]["modules"][0]["in_features"] += 1
    reg.add_artifact("edited", ARTIFACT_TYPE, tensors, edited, base_model=info.base_model)
    # a self-consistent layout of another adapter shape, paired with this decoder
    other, _ = adapter_files(tiny_adapter_factory("qkv", targets=("q_proj", "k_proj", "v_proj")))
    swapped = copy.deepcopy(info.meta)
    swapped["layout"] = layout_from_state_dict(other).to_dict()
    swapped["layout_fingerprint"] = swapped["layout"]["fingerprint"]
    reg.add_artifact("swapped", ARTIFACT_TYPE, tensors, swapped, base_model=info.base_model)
    # decoder weights of the wrong shape for the recorded config
    resized = dict(tensors)
    key = next(k for k in tensors if k.startswith("decoder.") and k.endswith("conv.weight"))
    resized[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    reg.add_artifact("resized", ARTIFACT_TYPE, resized, info.meta, base_model=info.base_model)

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("What is 1 plus 1?\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    other_base = tmp_path / "other-llama"
    build_tiny_llama(other_base, seed=1)
    cases = {
        "empty prompts file": (["--prompts", empty], "holds no prompts"),
        "another base model": (["--prompts", prompts_file, "--base-model", other_base], "was trained for base model"),
        "unknown generator": (["--prompts", prompts_file, "--generator", "nope"], "no generator matches nope"),
        "edited layout": (["--prompts", prompts_file, "--generator", "edited"], "layout"),
        "swapped layout": (["--prompts", prompts_file, "--generator", "swapped"], "built for layout"),
        "resized decoder": (["--prompts", prompts_file, "--generator", "resized"], "do not fit its config"),
        "prompts and task": (["--prompts", prompts_file, "--task", "add"], "either --prompts FILE or --task"),
        "unknown task": (["--task", "no-such-task"], "unknown task"),
        "unknown precision": (["--prompts", prompts_file, "--precision", "fp16"], "unknown precision 'fp16'"),
    }
    before = registry_state(registry_home)
    for label, (args, message) in cases.items():
        code, out, err = cli("generate", "--name", "bad", *args)
        assert code == 1, (label, out, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (label, err)
        assert registry_state(registry_home) == before, label

    # no generator at all, in an empty registry
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REGISTRY_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
        code, _, err = cli("generate", "--name", "bad", "--prompts", prompts_file, "--home", tmp_path / "empty-home")
    assert code == 1 and "no trained generator" in err and err.count("\n") == 1
    # train-generator refuses too few tasks and unknown held-out tasks, writing nothing
    for args, message in ((["--tasks", "add"], "at least 2 tasks"), (["--exclude-tasks", "nope"], "no harvested adapters")):
        code, _, err = cli("train-generator", *args, *TINY_CLI, "--steps", "1")
        assert code == 1 and message in err.splitlines()[-1], err
    assert registry_state(registry_home) == before

    # the library raises the same errors (for the HTTP server)
    with pytest.raises(GeneratorError, match="no prompts"):
        generate_adapter(reg, [], name="bad")
    with pytest.raises(GeneratorLayoutError):
        generate_state_dict_for(reg, ["hi"], generator_ref="swapped")


# -----------------------------------------------------------------------------
# the warm path: precision, the de-tokenising plan, the group mean before the last ConvL


def _relative_difference(a: dict, b: dict) -> float:
    return (sum(float((a[k] - b[k]).pow(2).sum()) for k in b) / sum(float(v.pow(2).sum()) for v in b.values())) ** 0.5


def test_bf16_generation_is_close_to_fp32_and_records_its_precision(reg, harvested):
    from registry.embeddings import embed_texts

    train_generator_from_registry(reg, steps=3, lr=1e-2, batch_size=2, device="cpu", **TINY)
    prompts = TASK_PROMPTS["sort"] + TASK_PROMPTS["add"][:3]  # 11 prompts: 3 groups of N = 4
    fp32, config32, timings32 = generate_state_dict_for(reg, prompts, precision="fp32")
    bf16, config16, timings16 = generate_state_dict_for(reg, prompts, precision="bf16")
    assert timings32["precision"] == "fp32" and timings16["precision"] == "bf16" and config32 == config16
    assert sorted(bf16) == sorted(fp32) and all(v.dtype == torch.float32 for v in bf16.values())
    difference = _relative_difference(bf16, fp32)
    assert 0 < difference < 1e-2, difference  # bf16 really ran; measured 2.3e-4 on this tiny generator
    again, _, _ = generate_state_dict_for(reg, prompts, precision="bf16")
    assert _relative_difference(again, bf16) == 0  # deterministic

    info = generate_adapter(reg, prompts, name="sort-bf16", precision="bf16")
    assert info.recipe["precision"] == "bf16"
    vectors = reg.prompt_embeddings(info.ref)  # from the bf16 encoder pass: within 1e-4 in cosine
    assert (vectors * embed_texts(prompts)).sum(axis=1).min() > 0.9999
    with pytest.MonkeyPatch.context() as patch:  # the default (None) is $REGISTRY_PRECISION, else auto
        patch.setenv("REGISTRY_PRECISION", "fp32")
        assert generate_adapter(reg, prompts, name="sort-env").recipe["precision"] == "fp32"
    with pytest.raises(GeneratorError, match="unknown precision 'half'"):
        generate_state_dict_for(reg, prompts, precision="half")


def test_decode_plan_equals_denormalize_then_tokens_to_state_dict():
    from generator.decode import DecodePlan
    from generator.tokenizer import TokenNormalizer, layout_from_state_dict, stack_token_grids, token_mask, tokens_to_state_dict

    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers"
    # ranks 4 and 2 (h = 4: padded rows) and widths that 16 does not divide (padded columns)
    shapes = {f"{prefix}.0.self_attn.q_proj": (4, 40, 24), f"{prefix}.0.mlp.down_proj": (2, 56, 40),
              f"{prefix}.1.self_attn.q_proj": (4, 40, 24)}
    adapters = [{**{f"{m}.lora_A.weight": torch.randn(r, i, generator=g) for m, (r, i, o) in shapes.items()},
                 **{f"{m}.lora_B.weight": torch.randn(o, r, generator=g) for m, (r, i, o) in shapes.items()}}
                for _ in range(3)]
    layout = layout_from_state_dict(adapters[0], chunk_width=16)
    grids = stack_token_grids(adapters, layout)
    tokens = torch.randn(layout.shape, generator=g)
    for center in ("element", "token"):
        for mask in (token_mask(layout), None):
            normalizer = TokenNormalizer.fit(grids, mask, center=center)
            expected = tokens_to_state_dict(normalizer.denormalize(tokens), layout)
            got = DecodePlan.build(layout, normalizer).state_dict(tokens)
            assert list(got) == list(expected)
            for key, value in expected.items():
                assert got[key].shape == value.shape
                torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-6)
    # the round trip: an adapter's own normalised tokens decode back to it
    normalizer = TokenNormalizer.fit(grids, token_mask(layout))
    back = DecodePlan.build(layout, normalizer).state_dict(normalizer.normalize(grids[1]))
    for key, value in adapters[1].items():
        torch.testing.assert_close(back[key], value, atol=1e-5, rtol=1e-5)
    half = DecodePlan.build(layout, normalizer).state_dict(tokens, torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values())


@pytest.mark.parametrize("shapes", [
    None,                                                     # the computed cascade: last layer N -> T
    [(4, 8, 16), (6, 8, 12), (6, 8, 12)],                     # a residual last layer (same shape in and out)
])
def test_mean_decode_equals_the_mean_of_the_forward(shapes):
    from generator.dnd import DnDConfig, DnDDecoder
    from generator.dnd_service import _mean_decode

    torch.manual_seed(0)
    if shapes is None:
        config = DnDConfig(n_prompts=4, prompt_tokens=8, embed_dim=16, tokens=30, token_height=4, token_width=12,
                           n_layers=3, kernel=3, hidden_tokens=8)
    else:
        config = DnDConfig(n_prompts=4, prompt_tokens=8, embed_dim=16, tokens=6, token_height=8, token_width=12,
                           n_layers=2, kernel=3, shapes=shapes)
    model = DnDDecoder(config).eval()
    for param in model.parameters():  # not the near-zero initial last layer: make every term matter
        param.data.normal_(0, 0.3)
    groups = torch.randn(3, *config.input_shape)  # (G, N, L, C)
    with torch.no_grad():
        expected = model(groups).mean(dim=0)
        got = _mean_decode(model, groups)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_mean_decode(model, groups[:1]), model(groups[:1])[0])
        with pytest.raises(ValueError, match="expected"):
            _mean_decode(model, groups[:, :, :5])
