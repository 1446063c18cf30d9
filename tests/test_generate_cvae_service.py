"""The ICM-LoRA CVAE as a registry generator: train-generator --arch cvae, generate, regenerate (tiny llama)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from generator.cvae_service import regenerate_task, train_cvae_from_registry
from generator.service import (CVAE_ARTIFACT_TYPE, GeneratorError, GeneratorLayoutError, TrainingStopped,
                               collect_training_set, generate_adapter, generate_state_dict_for,
                               generator_peft_config, prompts_sha256, train_generator_from_registry)
from test_generate_service import TASK_PROMPTS, add_harvested, registry_state

HIDDEN = 32  # the tiny llama's hidden size (tests/conftest.py)
# D = 896 real weights (r=4 on q_proj, v_proj, 2 layers); F = P * F_c = 56 * 16 = 896 can memorise them.
TINY = dict(strides=[4, 4], channels=[16, 32], flat_channels=16, latent_dim=32, cond_embed=16)
TINY_CLI = ["--arch", "cvae", "--positions", "16", "--flat-channels", "4", "--latent-dim", "8", "--cond-embed", "8",
            "--device", "cpu"]


@pytest.fixture
def harvested(reg, tiny_adapter_factory):
    """Three tasks, two checkpoints each, in the (parametrised) registry."""
    return {task: add_harvested(reg, tiny_adapter_factory, task, seed) for seed, task in enumerate(TASK_PROMPTS)}


# -----------------------------------------------------------------------------
# training


def test_train_cvae_records_exactly_what_it_trained_on(reg, harvested, tiny_base_dir, registry_home):
    from generator.task_vector import task_vector
    from registry import base_models

    artifact = train_generator_from_registry(reg, arch="cvae", steps=5, lr=1e-2, batch_size=2, device="cpu", **TINY)
    meta = artifact.meta
    expected = [{"ref": i.ref, "digest": i.digest, "task": i.task} for t in ("add", "reverse", "sort")
                for i in harvested[t]]
    assert artifact.artifact_type == CVAE_ARTIFACT_TYPE and artifact.ref == "cvae@1"
    assert meta["arch"] == "cvae" and meta["format"].startswith("cvae-generator-artifact/")
    assert meta["adapters"] == expected and meta["tasks"] == ["add", "reverse", "sort"]
    assert meta["excluded_tasks"] == [] and meta["checkpoints_per_task"] == {"add": 2, "reverse": 2, "sort": 2}
    first = harvested["add"][0]
    assert meta["base_model"] == first.base_model == artifact.base_model
    assert meta["base_fingerprint"] == first.base_fingerprint
    assert meta["peft_config"] == {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": False}
    assert meta["layout_fingerprint"] == meta["layout"]["fingerprint"] == meta["config"]["layout_fingerprint"]
    assert meta["config"]["input_dim"] == 896 and meta["config"]["cond_dim"] == HIDDEN
    assert meta["config"]["latent_dim"] == 32 and meta["config"]["strides"] == [4, 4]
    assert meta["condition"]["hidden_size"] == HIDDEN and meta["condition"]["format"].startswith("icm-task-vector/")
    assert meta["steps"] == 5 and [s for s, _ in meta["loss_curve"]] == [1, 2, 3, 4, 5]
    assert meta["final_loss"] == meta["loss_curve"][-1][1] and meta["wall_time_s"] > 0
    assert meta["code_version"].startswith("cvae-service/") and meta["training"]["kl_weight"] == 1e-3

    tensors, _ = reg.load_artifact(artifact.ref)
    assert {k.split(".")[0] for k in tensors} == {"cvae", "normalizer", "task_vector"}
    assert sorted(k for k in tensors if k.startswith("task_vector.")) == [f"task_vector.{t}" for t in meta["tasks"]]
    assert set(k for k in tensors if k.startswith("normalizer.")) == {"normalizer.mean", "normalizer.std"}
    assert "cvae.cond_mean" in tensors and "cvae.cond_scale" in tensors  # the fitted standardisation travels
    # one basis direction per task by default, stored in float16 and widened to float32 on load
    assert meta["config"]["basis_dim"] == 3 and tensors["cvae.basis"].shape == (3, 896)
    assert tensors["cvae.basis"].dtype == torch.float16 and tensors["cvae.cond_proj.weight"].dtype == torch.float32
    # each stored vector is the base model's task vector of the task's stored prompts
    base, tokenizer = base_models.load_base(tiny_base_dir, device="cpu")
    prompts = collect_training_set(reg).prompts
    for task in meta["tasks"]:
        assert tensors[f"task_vector.{task}"].shape == (HIDDEN,)
        torch.testing.assert_close(tensors[f"task_vector.{task}"], task_vector(base, tokenizer, prompts[task]))
    # ... and cached on disk for the next run
    assert len(list((registry_home / "work" / "task-vectors").glob("*.safetensors"))) == 3

    # rerunning the finished command returns what it stored instead of a duplicate version
    again = train_generator_from_registry(reg, arch="cvae", steps=5, lr=1e-2, batch_size=2, device="cpu", **TINY)
    assert again.ref == artifact.ref and len(reg.list_artifacts(CVAE_ARTIFACT_TYPE)) == 1

    # regenerating a training task from its stored vector == generating from the task's prompts
    regenerated = regenerate_task(reg, artifact.ref, "reverse")
    stored, config = reg.load_weights(harvested["reverse"][0].ref)
    assert {k: v.shape for k, v in regenerated.items()} == {k: v.shape for k, v in stored.items()}
    generated, peft_config, timings = generate_state_dict_for(reg, prompts["reverse"], generator_ref="cvae")
    assert timings["arch"] == "cvae" and timings["generator"] == "cvae@1"
    assert peft_config == generator_peft_config(meta) and peft_config["lora_alpha"] == config["lora_alpha"]
    for key, value in regenerated.items():
        torch.testing.assert_close(generated[key], value, atol=1e-5, rtol=1e-4)


def test_trained_cvae_regenerates_each_task_closest_to_its_own_adapters(reg, harvested):
    # decoding z = 0 is only in distribution when the KL term pulls the posterior to the prior: the
    # default kl_weight (1e-3) does; at 1e-4 the training loss is lower but z = 0 decodes worse
    artifact = train_cvae_from_registry(reg, steps=600, lr=3e-3, batch_size=6, device="cpu", **TINY)
    assert artifact.meta["final_loss"] < artifact.meta["loss_curve"][0][1] / 4
    means = {}
    for task, infos in harvested.items():
        weights = [reg.load_weights(i.ref)[0] for i in infos]
        means[task] = {k: torch.stack([w[k] for w in weights]).mean(0) for k in weights[0]}

    def distance(a, b):
        return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5

    for task in harvested:
        regenerated = regenerate_task(reg, artifact.ref, task)
        distances = {other: distance(regenerated, mean) for other, mean in means.items()}
        assert min(distances, key=distances.get) == task, (task, distances)
        others = min(d for t, d in distances.items() if t != task)
        assert distances[task] < 0.5 * others, (task, distances)


def test_interrupted_cvae_training_resumes_to_the_same_weights(reg, harvested):
    options = dict(steps=7, lr=1e-2, batch_size=2, device="cpu", save_every=3, **TINY)
    straight = train_cvae_from_registry(reg, resume=False, **options)

    def stop_at_four(step, total, loss):
        return step < 4

    with pytest.raises(TrainingStopped, match="stopped at step 4/7"):
        train_cvae_from_registry(reg, resume=False, on_step=stop_at_four, **options)
    assert [a.ref for a in reg.list_artifacts(CVAE_ARTIFACT_TYPE)] == [straight.ref]  # nothing stored when stopped
    seen = []
    resumed = train_cvae_from_registry(reg, on_step=lambda s, t, loss: seen.append((s, t)), **options)
    assert seen == [(5, 7), (6, 7), (7, 7)] and resumed.meta["training"]["resumed_from"] == 4
    assert resumed.ref == "cvae@2" and resumed.sha256 == straight.sha256  # bit-identical tensors
    assert resumed.meta["loss_curve"] == straight.meta["loss_curve"]
    # more steps continue from the finished state
    longer = train_cvae_from_registry(reg, **{**options, "steps": 9})
    assert longer.meta["training"]["resumed_from"] == 7 and longer.meta["steps"] == 9


# -----------------------------------------------------------------------------
# generating


def test_generate_with_a_cvae_ref_end_to_end_and_peft_loads_it(cli, harvested, tiny_base_dir, registry_home,
                                                              tmp_path, reg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, out, err = cli("train-generator", *TINY_CLI, "--steps", "4", "--lr", "0.01", "--batch-size", "2",
                         "--exclude-tasks", "sort", "--basis-dim", "1", "--json")
    assert code == 0, err
    artifact = json.loads(out)
    assert artifact["meta"]["config"]["basis_dim"] == 1  # --basis-dim reaches the model
    assert artifact["ref"] == "cvae@1" and artifact["artifact_type"] == CVAE_ARTIFACT_TYPE
    assert artifact["meta"]["tasks"] == ["add", "reverse"] and artifact["meta"]["excluded_tasks"] == ["sort"]
    assert artifact["meta"]["config"]["latent_dim"] == 8 and artifact["meta"]["config"]["cond_embed"] == 8
    code, out, _ = cli("generators", "--json")
    assert [(g["ref"], g["artifact_type"]) for g in json.loads(out)] == [("cvae@1", CVAE_ARTIFACT_TYPE)]

    prompts_file = tmp_path / "sort.txt"
    prompts_file.write_text("\n".join(TASK_PROMPTS["sort"]) + "\n")
    code, out, err = cli("generate", "--prompts", prompts_file, "--name", "sort-cvae", "--generator", "cvae@1",
                         "--json")
    assert code == 0, err
    generated = json.loads(out)
    assert generated["ref"] == "sort-cvae@1" and generated["kind"] == "generated"
    assert generated["timings"]["arch"] == "cvae" and generated["timings"]["store_s"] > 0
    info = reg.resolve("sort-cvae")
    assert info.parents == [] and info.base_model == harvested["add"][0].base_model
    assert info.recipe["generator"] == "cvae@1" and info.recipe["generator_digest"] == artifact["sha256"]
    assert info.recipe["arch"] == "cvae" and info.recipe["generator_type"] == CVAE_ARTIFACT_TYPE
    assert info.recipe["prompts_sha256"] == prompts_sha256(TASK_PROMPTS["sort"])
    assert reg.prompts(info.ref) == TASK_PROMPTS["sort"]

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
    state_dict, _, timings = generate_state_dict_for(reg, TASK_PROMPTS["sort"], generator_ref="cvae@1")
    assert timings["cached"] and timings["load_s"] == 0.0
    for key, value in stored.items():
        torch.testing.assert_close(state_dict[key], value)

    # human output names the CVAE's steps
    code, out, err = cli("generate", "--prompts", prompts_file, "--name", "sort-cvae", "--generator", "cvae")
    assert code == 0 and out.startswith("generated sort-cvae@2") and "task vector" in err

    # regenerate: a training task's adapter from the stored vector, stored as a generated adapter
    code, out, err = cli("regenerate", "add", "--name", "add-again", "--generator", "cvae@1", "--json")
    assert code == 0, err
    again = json.loads(out)
    assert again["task"] == "add" and again["recipe"]["regenerated_task"] == "add"
    assert again["recipe"]["generator_digest"] == artifact["sha256"]
    regenerated, _ = reg.load_weights(again["ref"])
    for key, value in regenerate_task(reg, "cvae@1", "add").items():
        torch.testing.assert_close(regenerated[key], value)
    from registry.precision import resolve
    assert again["recipe"]["precision"] == resolve("auto")

    # bf16 decoding (frozen weights in bf16, autocast) stays close to fp32
    fp32 = regenerate_task(reg, "cvae@1", "add", precision="fp32")
    bf16 = regenerate_task(reg, "cvae@1", "add", precision="bf16")
    difference = (sum(float((bf16[k] - v).pow(2).sum()) for k, v in fp32.items())
                  / sum(float(v.pow(2).sum()) for v in fp32.values())) ** 0.5
    assert 0 < difference < 1e-2, difference  # measured 2.0e-3 on this tiny CVAE


def test_bad_cvae_inputs_are_refused_without_writing(cli, harvested, reg, registry_home, tmp_path):
    from conftest import build_tiny_llama
    from generator.tokenizer import layout_from_state_dict

    artifact = train_cvae_from_registry(reg, steps=2, batch_size=2, device="cpu", **TINY)
    tensors, info = reg.load_artifact(artifact.ref)
    # a stored layout that was edited after the fact: its fingerprint no longer matches
    edited = copy.deepcopy(info.meta)
    edited["layout"]["modules"][0]["in_features"] += 1
    reg.add_artifact("edited", CVAE_ARTIFACT_TYPE, tensors, edited, base_model=info.base_model)
    # a self-consistent layout of another adapter shape, paired with this CVAE
    other = {k: v for k, v in reg.load_weights(harvested["add"][0].ref)[0].items() if "q_proj" in k}
    swapped = copy.deepcopy(info.meta)
    swapped["layout"] = layout_from_state_dict(other).to_dict()
    swapped["layout_fingerprint"] = swapped["layout"]["fingerprint"]
    reg.add_artifact("swapped", CVAE_ARTIFACT_TYPE, tensors, swapped, base_model=info.base_model)
    # CVAE weights of the wrong shape for the recorded config
    resized = dict(tensors)
    resized["cvae.heads.weight"] = torch.zeros(tensors["cvae.heads.weight"].shape[0] + 2,
                                               tensors["cvae.heads.weight"].shape[1])
    reg.add_artifact("resized", CVAE_ARTIFACT_TYPE, resized, info.meta, base_model=info.base_model)
    # a base model that is gone
    gone = copy.deepcopy(info.meta)
    gone["base_model"] = str(tmp_path / "deleted-llama")
    reg.add_artifact("gone", CVAE_ARTIFACT_TYPE, tensors, gone, base_model=gone["base_model"])
    # a generator type this version does not know
    reg.add_artifact("future", "generator-future", tensors, info.meta, base_model=info.base_model)

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("What is 1 plus 1?\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    other_base = tmp_path / "other-llama"
    build_tiny_llama(other_base, seed=1)
    cases = {
        "empty prompts file": (["--prompts", empty], "holds no prompts"),
        "another base model": (["--prompts", prompts_file, "--generator", "cvae", "--base-model", other_base],
                               "was trained for base model"),
        "unknown generator": (["--prompts", prompts_file, "--generator", "nope"], "no generator matches nope"),
        "no DnD default": (["--prompts", prompts_file], "no trained DnD generator in this registry: pass --generator"),
        "edited layout": (["--prompts", prompts_file, "--generator", "edited"], "layout"),
        "swapped layout": (["--prompts", prompts_file, "--generator", "swapped"], "built for layout"),
        "resized weights": (["--prompts", prompts_file, "--generator", "resized"], "do not fit its config"),
        "base model gone": (["--prompts", prompts_file, "--generator", "gone"], "is not available"),
        "unknown type": (["--prompts", prompts_file, "--generator", "future"], "cannot use"),
    }
    before = registry_state(registry_home)
    for label, (args, message) in cases.items():
        code, out, err = cli("generate", "--name", "bad", *args)
        assert code == 1, (label, out, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (label, err)
        assert registry_state(registry_home) == before, label

    for args, message in ((["nope", "--generator", "cvae"], "not trained on task 'nope'"),
                          (["add", "--generator", "swapped"], "built for layout"),
                          (["add", "--generator", "nope"], "no generator matches nope")):
        code, _, err = cli("regenerate", "--name", "bad", *args)
        assert code == 1 and err.count("\n") == 1 and message in err, (args, err)
    # train-generator refuses too few tasks, unknown held-out tasks, bad arches and misplaced options
    for args, message in ((["--arch", "cvae", "--tasks", "add"], "at least 2 tasks"),
                          (["--arch", "cvae", "--exclude-tasks", "nope"], "no harvested adapters"),
                          (["--arch", "vae"], "--arch must be one of"),
                          (["--latent-dim", "8"], "only apply to --arch cvae")):
        code, _, err = cli("train-generator", *args, "--steps", "1", "--device", "cpu")
        assert code == 1 and message in err.splitlines()[-1], (args, err)
    assert registry_state(registry_home) == before

    # the library raises the same errors (for the HTTP server)
    with pytest.raises(GeneratorError, match="no prompts"):
        generate_adapter(reg, [], name="bad", generator_ref="cvae")
    with pytest.raises(GeneratorLayoutError):
        generate_state_dict_for(reg, ["hi"], generator_ref="swapped")
    with pytest.raises(GeneratorError, match="unknown CVAE option"):
        train_cvae_from_registry(reg, steps=1, n_layers=2)
    assert registry_state(registry_home) == before


def test_adapter_variance_benchmark_splits_the_norm(reg, harvested, registry_home):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from adapter_variance import main

    record = main(["--home", str(registry_home)])
    assert (record["tasks"], record["adapters"], record["parameters"]) == (3, 6, 896)
    assert record["between_task_share"] + record["within_task_share"] == pytest.approx(1.0)
    assert 0 < record["within_task_share"] < 1
    shares = list(record["top_k_share"].values())
    assert list(record["top_k_share"]) == [1, 2, 4] and shares == sorted(shares) and shares[-1] <= 1 + 1e-9
