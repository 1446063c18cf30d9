"""The entropy gate's signal on the tiny llama: LoRA hooks equal PEFT and leave no trace, the shared
prompt head changes no entropy, and an adapter trained to answer a task's prompts is the one kept."""

from __future__ import annotations

import pytest

PROMPTS = ["What is 2 plus 3?", "Reverse the word cat.", "Sort these letters: c a b.", "What is 7 plus 1?"]


@pytest.fixture
def tiny(tiny_base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval(), AutoTokenizer.from_pretrained(tiny_base_dir)


def _peft_weights(adapter_dir):
    from registry.peft_io import read_adapter_dir

    config, state_dict = read_adapter_dir(adapter_dir)
    return state_dict, config


def test_lora_hooks_equal_peft_and_are_removed(tiny, tiny_base_dir, tiny_adapter_factory):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from registry.confidence import lora_hooks

    model, _ = tiny
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    plain = model(input_ids=ids).logits
    adapter = tiny_adapter_factory("a", rank=4, targets=("q_proj", "v_proj", "down_proj"), alpha=4)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), adapter).eval()
    with torch.no_grad(), lora_hooks(model, *_peft_weights(adapter)):
        hooked = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(hooked, plain)
    torch.testing.assert_close(model(input_ids=ids).logits, plain)  # the hooks are gone


def test_next_token_entropy_is_that_of_each_prompt_run_alone(tiny):
    import torch

    from registry.chat import render_prompt
    from registry.confidence import next_token_entropy

    model, tokenizer = tiny
    batched = next_token_entropy(model, tokenizer, PROMPTS, batch_size=3)  # a shared head, left-padded tails
    alone = []
    for prompt in PROMPTS:
        ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        logp = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        alone.append(float(-(logp.exp() * logp).sum()))
    assert batched.shape == (len(PROMPTS),)
    torch.testing.assert_close(batched, torch.tensor(alone), rtol=1e-4, atol=1e-4)


def _trained_adapter(model, tokenizer, prompts, answer_token: int, steps: int = 60):
    """A rank-2 LoRA on q/v projections and the LM head (the tiny llama's 0.02-scale tied embeddings
    alone cap its logits near 0.6) trained to open every answer to ``prompts`` with one token."""
    import torch

    from registry.chat import render_prompt
    from registry.confidence import lora_hooks

    torch.manual_seed(0)
    config = {"r": 2, "lora_alpha": 4, "base_model_name_or_path": "tiny"}
    state_dict = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj", "lm_head")):
            key = f"base_model.model.{name}"
            state_dict[f"{key}.lora_A.weight"] = (torch.randn(2, module.in_features) * 0.1).requires_grad_()
            state_dict[f"{key}.lora_B.weight"] = torch.zeros(module.out_features, 2, requires_grad=True)
    optimizer = torch.optim.Adam(state_dict.values(), lr=0.05)
    encoded = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    for _ in range(steps):
        loss = 0.0
        with lora_hooks(model, state_dict, config):
            for ids in encoded:
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                loss = loss + torch.nn.functional.cross_entropy(logits[None], torch.tensor([answer_token]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach() for k, v in state_dict.items()}, config


def test_the_gate_keeps_the_adapter_that_answers_the_prompts_surely(tiny, tiny_base_dir, monkeypatch):
    import torch

    from registry import confidence

    model, tokenizer = tiny
    trained = _trained_adapter(model, tokenizer, PROMPTS, answer_token=7)
    untrained = ({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in trained[0].items()}, trained[1])
    monkeypatch.setattr(confidence, "_gate_model", lambda base, device: (model, tokenizer))
    entropies = confidence.mean_entropies("tiny", PROMPTS, [untrained, trained])
    assert entropies[1] < entropies[0] - 0.5  # training made the first answer token sure
    keep, record = confidence.entropy_gate("tiny", PROMPTS, untrained, trained)
    assert keep and record == {"fallback": entropies[0], "candidate": entropies[1]}
    keep, _ = confidence.entropy_gate("tiny", PROMPTS, trained, untrained)  # the other way round: fall back
    assert not keep
    keep, _ = confidence.entropy_gate("tiny", PROMPTS, untrained, untrained)  # a tie keeps the fallback
    assert not keep
