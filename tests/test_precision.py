"""The precision policy: detection and fallback, bf16 harvest / evaluation / generator training on tiny models."""

from __future__ import annotations

import pytest
import torch

from harvest.evaluate import evaluate
from harvest.train import HarvestError, harvest
from registry import precision
from tests.test_train import Crash, small_config, toy_task


def test_resolve_names_and_refuses_unknown(monkeypatch):
    monkeypatch.delenv(precision.ENV_VAR, raising=False)
    assert precision.resolve("fp32") == "fp32"
    assert precision.resolve("BF16") == "bf16"
    with pytest.raises(precision.PrecisionError, match="unknown precision 'fp16'"):
        precision.resolve("fp16")


def test_auto_follows_the_hardware_and_the_environment(monkeypatch):
    monkeypatch.delenv(precision.ENV_VAR, raising=False)
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": False)
    assert precision.resolve(None) == "fp32"
    assert precision.resolve("auto") == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": True)
    assert precision.resolve("auto") == "bf16"
    monkeypatch.setenv(precision.ENV_VAR, "fp32")
    assert precision.resolve(None) == "fp32"  # the environment overrides auto...
    assert precision.resolve("bf16") == "bf16"  # ...but not an explicit choice


def test_native_bf16_matches_what_torch_reports():
    cpu = torch.cpu
    expected = bool(cpu._is_amx_tile_supported())  # AVX-512 BF16 alone measured slower than fp32
    assert precision.native_bf16("cpu") is expected
    assert precision.native_bf16("cuda") is bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_autocast_only_in_bf16():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with precision.autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32


def test_bf16_harvest_keeps_fp32_lora_and_learns(tiny_base_dir):
    from registry.base_models import load_base

    model, tokenizer = load_base(tiny_base_dir, cached=False)
    config = small_config(steps=30, lr=5e-2, batch_size=8, n_checkpoints=1, warmup_steps=0)  # as test_train's
    result = harvest(toy_task(), model=model, tokenizer=tokenizer, config=config, threads=1, precision="bf16")
    assert result.precision == "bf16"
    assert all(t.dtype == torch.float32 for t in result.state_dict.values())  # master weights
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # the frozen base is stored in bf16
    # the tiny llama cannot go far below ln(vocab) = 5.77 (see test_training_lowers_the_loss)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.15


def test_bf16_and_fp32_harvests_are_close(tiny_base_dir):
    config = small_config(steps=6)
    fp32 = harvest(toy_task(), base=tiny_base_dir, config=config, threads=1, precision="fp32")
    bf16 = harvest(toy_task(), base=tiny_base_dir, config=config, threads=1, precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=0.02)  # same model, same batch, bf16 matmuls
    assert bf16.losses != fp32.losses  # it really ran in another precision


def test_an_fp32_work_dir_is_not_resumed_in_bf16(tiny_base_dir, tmp_path):
    with pytest.raises(Crash):
        harvest(toy_task(), base=tiny_base_dir, config=small_config(), work_dir=tmp_path, threads=1,
                precision="fp32", on_step=lambda s, l: (_ for _ in ()).throw(Crash()) if s == 3 else None)
    with pytest.raises(HarvestError, match="different harvest"):
        harvest(toy_task(), base=tiny_base_dir, config=small_config(), work_dir=tmp_path, threads=1,
                precision="bf16")


def test_evaluate_records_its_precision(tiny_base_dir, tiny_adapter_factory):
    adapter = tiny_adapter_factory("lora")
    results = {p: evaluate(toy_task(), base=tiny_base_dir, adapter=str(adapter), max_new_tokens=4, precision=p)
               for p in ("fp32", "bf16")}
    assert {p: r.precision for p, r in results.items()} == {"fp32": "fp32", "bf16": "bf16"}
    assert all(r.n == 2 for r in results.values())


def test_harvest_task_records_the_precision_and_keeps_fp32_ids(reg, tiny_base_dir):
    from harvest.service import harvest_id, harvest_task

    task, config = toy_task(), small_config(steps=4, n_checkpoints=2, checkpoint_every=1)
    summary = harvest_task(reg, task, base=str(tiny_base_dir), config=config, precision="bf16")
    stored = reg.resolve(summary.refs[-1])
    assert stored.recipe["precision"] == "bf16"
    base_id = stored.recipe["base"]
    assert summary.harvest_id == harvest_id(task, config, base_id, "bf16") != harvest_id(task, config, base_id)
    assert harvest_id(task, config, base_id, "fp32") == harvest_id(task, config, base_id)


def test_generator_training_in_bf16_keeps_fp32_parameters():
    from generator.training import TrainState, run_steps

    torch.manual_seed(0)
    target = torch.randn(2, 3, 4, 5)
    losses = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.GELU(), torch.nn.Linear(32, 60))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randn(2, 6)
        state = TrainState()

        def batch_loss():
            out = model(x).reshape(2, 3, 4, 5)
            assert out.dtype == (torch.bfloat16 if name == "bf16" else torch.float32)
            return (out.float() - target).pow(2).mean()

        run_steps(model, optimizer, state, 60, torch.Generator(), batch_loss, 1.0, None, precision=name)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        losses[name] = state.losses
    assert losses["bf16"][-1] < 0.5 * losses["bf16"][0]
    assert losses["bf16"][-1] == pytest.approx(losses["fp32"][-1], rel=0.3, abs=0.02)


def test_train_generator_records_its_precision_and_refuses_unknown(reg, tiny_adapter_factory):
    from generator.service import GeneratorError, train_generator_from_registry
    from tests.test_generate_service import TINY, add_harvested

    for i, task in enumerate(("add", "reverse")):
        add_harvested(reg, tiny_adapter_factory, task, seed=i)
    options = dict(steps=3, lr=1e-2, batch_size=2, device="cpu", **TINY)
    with pytest.raises(GeneratorError, match="unknown precision 'half'"):
        train_generator_from_registry(reg, precision="half", **options)
    assert reg.list_artifacts() == []
    fp32 = train_generator_from_registry(reg, precision="fp32", **options)
    bf16 = train_generator_from_registry(reg, precision="bf16", **options)
    assert fp32.meta["training"]["precision"] == "fp32" and bf16.meta["training"]["precision"] == "bf16"
    assert fp32.ref != bf16.ref  # another precision is another training, not the stored one
    tensors, _ = reg.load_artifact(bf16.ref)
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if k.startswith("decoder."))
