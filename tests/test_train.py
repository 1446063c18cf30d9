"""Harvesting on the tiny llama: checkpoints, resume after a crash, validation, evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from harvest.evaluate import evaluate
from harvest.tasks import Example, load_task_file, make_task
from harvest.train import (
    HarvestConfig,
    HarvestError,
    checkpoint_steps,
    encode_example,
    epoch_batches,
    harvest,
    save_adapter,
)


def toy_task():
    train = [Example(f"Reverse {w}", w[::-1]) for w in ("cat", "dog", "sun", "abc", "bat", "one", "two", "yes")]
    test = [Example("Reverse tac", "cat"), Example("Reverse net", "ten")]
    return make_task("toy", train, test, metric="exact")


def small_config(**kw):
    base = dict(rank=4, alpha=8, steps=8, batch_size=3, lr=5e-3, warmup_steps=2, n_checkpoints=3,
                checkpoint_every=2, save_every=2, seed=0)
    base.update(kw)
    return HarvestConfig(**base)


class Crash(RuntimeError):
    pass


def test_checkpoints_have_peft_keys_and_shapes(tiny_base_dir):
    seen = []
    result = harvest(toy_task(), base=tiny_base_dir, config=small_config(), threads=1,
                     on_checkpoint=lambda step, loss, sd: seen.append((step, loss, sd)))
    assert [s for s, _, _ in seen] == [4, 6, 8] == checkpoint_steps(small_config())
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # tiny llama: hidden 32, 2 KV heads of 8 -> k/v out 16, intermediate 48, 2 layers
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32),
              "gate_proj": (48, 32), "up_proj": (48, 32), "down_proj": (32, 48)}
    for _, loss, sd in seen:
        assert loss > 0
        assert len(sd) == 2 * len(targets) * 2  # A and B, 7 targets, 2 layers
        for layer in range(2):
            for t in targets:
                mod = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{mod}.{t}"
                out_f, in_f = shapes[t]
                assert sd[f"{prefix}.lora_A.weight"].shape == (4, in_f)
                assert sd[f"{prefix}.lora_B.weight"].shape == (out_f, 4)
    assert not torch.equal(seen[0][2][next(k for k in seen[0][2] if "lora_B" in k)], seen[-1][2][next(k for k in seen[-1][2] if "lora_B" in k)])
    assert result.checkpoints == [(s, l) for s, l, _ in seen]
    assert len(result.losses) == 8 and result.steps == 8
    assert result.peft_config["r"] == 4 and result.peft_config["peft_type"] == "LORA"


def test_resume_after_crash_matches_uninterrupted(tiny_base_dir, tmp_path):
    config = small_config(steps=9, save_every=2)
    straight = harvest(toy_task(), base=tiny_base_dir, config=config, work_dir=tmp_path / "a", threads=1)

    def crash_at_7(step, loss):
        if step == 7:
            raise Crash("simulated crash")

    emitted = []
    with pytest.raises(Crash):
        harvest(toy_task(), base=tiny_base_dir, config=config, work_dir=tmp_path / "b", threads=1,
                on_step=crash_at_7, on_checkpoint=lambda s, l, sd: emitted.append(s))
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["step"] == 7  # saved at the checkpoint of step 7, before on_step raised
    resumed = harvest(toy_task(), base=tiny_base_dir, config=config, work_dir=tmp_path / "b", threads=1,
                      on_checkpoint=lambda s, l, sd: emitted.append(s))
    assert resumed.resumed_from == 7
    assert emitted == checkpoint_steps(config)  # every checkpoint once, none lost
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    assert straight.state_dict.keys() == resumed.state_dict.keys()
    for key in straight.state_dict:
        assert torch.allclose(straight.state_dict[key], resumed.state_dict[key], atol=1e-6), key
    assert not (tmp_path / "b" / "state.json").exists()  # cleared after success


def test_resume_refuses_a_different_harvest(tiny_base_dir, tmp_path):
    with pytest.raises(Crash):
        harvest(toy_task(), base=tiny_base_dir, config=small_config(), work_dir=tmp_path, threads=1,
                on_step=lambda s, l: (_ for _ in ()).throw(Crash()) if s == 3 else None)
    with pytest.raises(HarvestError, match="different harvest"):
        harvest(toy_task(), base=tiny_base_dir, config=small_config(lr=1e-3), work_dir=tmp_path, threads=1)


@pytest.mark.parametrize("kw, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -2}, "rank must be a positive integer"),
    ({"target_modules": ("q_proj", "c_attn")}, "target modules not in the model: c_attn"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"n_checkpoints": 20}, "exceeds steps"),
    ({"lr": 0.0}, "lr must be positive"),
])
def test_validation(tiny_base_dir, kw, message):
    with pytest.raises(HarvestError, match=message):
        harvest(toy_task(), base=tiny_base_dir, config=small_config(**kw), threads=1)


def test_loss_only_on_answer_tokens(tiny_base_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    ids, n_prompt = encode_example(tokenizer, "Reverse cat", "tac", max_length=64)
    answer = tokenizer.decode(ids[n_prompt:])
    assert answer == "tac<|im_end|>"
    assert tokenizer.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    ids, n_prompt = encode_example(tokenizer, "Reverse " + "cat " * 50, "tac", max_length=16)
    assert len(ids) == 16 and tokenizer.decode(ids[n_prompt:]) == "tac<|im_end|>"


def test_batches_are_deterministic_and_cover_the_data():
    lengths = [5, 9, 3, 7, 7, 2, 8, 1, 6, 4]
    a = epoch_batches(lengths, 3, seed=0, epoch=1)
    assert a == epoch_batches(lengths, 3, seed=0, epoch=1)
    assert a != epoch_batches(lengths, 3, seed=0, epoch=2)
    assert sorted(i for batch in a for i in batch) == list(range(10))


def test_training_lowers_the_loss(tiny_base_dir):
    # the tiny llama's tied embeddings are small and frozen, so its loss cannot fall far below
    # ln(vocab) = 5.77; a clear, deterministic drop still shows that the answer tokens are learnt
    config = small_config(steps=30, lr=5e-2, batch_size=8, n_checkpoints=1, warmup_steps=0)
    result = harvest(toy_task(), base=tiny_base_dir, config=config, threads=1)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.15


def test_user_task_harvest_and_evaluate(tiny_base_dir, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Reverse {w}", "answer": w[::-1]})
                              for w in ("cat", "dog", "sun", "abc", "bat", "one", "two", "yes", "no", "hi")))
    (tmp_path / "mine.jsonl.meta.json").write_text(json.dumps({"name": "mine", "metric": "exact"}))
    task = load_task_file(path)
    config = small_config(steps=4, n_checkpoints=1)
    result = harvest(task, base=tiny_base_dir, config=config, threads=1)

    base_eval = evaluate(task, base=tiny_base_dir, split="test", max_new_tokens=4, threads=1)
    lora_eval = evaluate(task, base=tiny_base_dir, adapter=result.state_dict, lora=config, max_new_tokens=4, threads=1)
    assert base_eval.n == lora_eval.n == len(task.test)
    assert 0.0 <= lora_eval.accuracy <= 1.0
    assert all(isinstance(p.prediction, str) for p in lora_eval.predictions)

    # the same adapter written as a PEFT folder gives the same predictions
    out = save_adapter(tmp_path / "adapter", result.state_dict, config, result.base_model_id)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    from_dir = evaluate(task, base=tiny_base_dir, adapter=out, max_new_tokens=4, threads=1)
    assert [p.prediction for p in from_dir.predictions] == [p.prediction for p in lora_eval.predictions]


def test_evaluate_scores_with_the_task_metric(tiny_base_dir):
    from registry.base_models import load_base

    model, tokenizer = load_base(tiny_base_dir)
    task = make_task("c", [Example("x", "y")], [Example("a", "zzzz-never"), Example("b", "")], metric="contains")
    result = evaluate(task, model, tokenizer, max_new_tokens=3, threads=1)
    # "zzzz-never" is never generated in 3 tokens; an empty reference never counts as contained
    assert result.accuracy == 0.0 and result.n == 2


def test_shared_prefix_length_leaves_every_prompt_a_tail():
    from registry.lm import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 8], [7, 8]]) == 1  # identical prompts still keep one token each
    assert shared_prefix_length([[1], [2, 3]]) == 0 and shared_prefix_length([]) == 0


def test_generation_with_the_shared_prompt_head_cached_matches_plain_generation(tiny_base_dir, tiny_adapter_factory):
    """Reusing the chat head's keys/values (padding between head and tail) changes no completion."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harvest.evaluate import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    model = PeftModel.from_pretrained(base, tiny_adapter_factory("lora", targets=("q_proj", "k_proj", "v_proj")))
    model.eval()
    prompts = [f"What is {i} plus {i * 7}?" + " please" * (i % 4) for i in range(11)]
    shared, n_shared = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4, share_prefix=True)
    plain, n_plain = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4, share_prefix=False)
    assert shared == plain and n_shared == n_plain > 0


def test_lr_schedule_is_transformers_cosine_with_min_lr_read_at_the_update_number():
    import torch
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    from harvest.train import HarvestConfig, lr_at

    config = HarvestConfig(steps=120, warmup_steps=10, lr=2e-3, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps,
        min_lr_rate=config.min_lr_ratio)
    factor = scheduler.lr_lambdas[0]
    assert [lr_at(k, config) for k in range(1, config.steps + 1)] == \
        pytest.approx([config.lr * factor(k) for k in range(1, config.steps + 1)], rel=1e-12, abs=0)
    assert optimizer.param_groups[0]["lr"] == 0.0 and lr_at(1, config) == pytest.approx(2e-4)  # why not LambdaLR


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lean_lora_layers_match_peft_forward_and_gradients(tiny_base_dir, dropout):
    """The fused update (registry.lm.lean_lora_layers) computes what PEFT's LoRA forward does, with the
    same gradients on A and B; merged or disabled adapters still go through PEFT's own forward."""
    from peft import LoraConfig, get_peft_model

    from registry.base_models import load_base
    from registry.lm import lean_lora_layers

    def build():
        model, _ = load_base(str(tiny_base_dir), cached=False)
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                      target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
        with torch.no_grad():  # B starts at zero in PEFT: give it values so the update is not trivially 0
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
        return peft_model

    ids = torch.randint(0, 100, (3, 9))
    outputs, grads = [], []
    for lean in (False, True):
        peft_model = build()
        if lean:
            assert lean_lora_layers(peft_model) is peft_model
            assert sum("forward" in vars(m) for m in peft_model.modules()) == 2 * 4  # 2 layers x 4 targets
        torch.manual_seed(1)  # same dropout masks
        peft_model.train()
        logits = peft_model(input_ids=ids).logits
        logits.square().mean().backward()
        outputs.append(logits.detach())
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    assert sorted(grads[1]) == sorted(grads[0]) and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
        assert not torch.allclose(plain, before)
        peft_model.merge_adapter()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)


def test_contiguous_head_input_keeps_logits_and_is_idempotent(tiny_base_dir):
    """The LM head's pre-hook (registry.lm.contiguous_head_input) changes no number, registers once."""
    from registry.base_models import load_base
    from registry.lm import contiguous_head_input

    model, _ = load_base(str(tiny_base_dir), cached=False)
    hidden = torch.randn(4, 7, model.config.hidden_size)[:, -1:, :]  # strided, as generation slices it
    head = model.get_output_embeddings()
    before = head(hidden)
    assert contiguous_head_input(contiguous_head_input(model)) is model
    assert len(head._forward_pre_hooks) == 1
    torch.testing.assert_close(head(hidden), before)
