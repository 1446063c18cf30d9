"""Per-sample routing: one batched forward equals each item run alone through its own composed adapter."""

from __future__ import annotations

import pytest
import torch

from retrieval.compose import compose_adapters, load_adapter_dir, save_adapter_dir
from retrieval.routing import (
    RoutingError,
    build_lora_pool,
    position_ids_from_mask,
    route_forward,
    route_generate,
    route_generate_ids,
    routed_lora,
    routing_matrix,
    routing_throughput,
    tokenize_left_padded,
)

PROMPTS = [
    "What is 2 plus 3?",
    "Reverse the word cat: tac. Sort these letters: a b c.",
    "yes no",
    "Sort these letters: c b a. The answer is",
]
# k = 1 and k = 2 items in one batch; pool adapters differ in rank, alpha and target modules
ROUTING = [
    [("a", 1.0)],
    [("a", 0.6), ("c", 0.4)],
    [("b", 1.0)],
    [("c", 0.3), ("a", 0.7)],
]


@pytest.fixture
def setup(tiny_base_dir, tiny_adapter_factory, tmp_path):
    """Base model, tokenizer, a pool of three adapters, and a PeftModel holding each item's composed adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, root = tiny_base_dir, tmp_path
    directories = {
        "a": tiny_adapter_factory("a", rank=2, seed=1),
        "b": tiny_adapter_factory("b", rank=4, seed=2, alpha=3, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        "c": tiny_adapter_factory("c", rank=3, seed=3),
    }
    adapters = {name: load_adapter_dir(directory, name=name) for name, directory in directories.items()}
    # the reference: each item's adapters composed by `mixture`, loaded into PEFT as one named adapter
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), directories["a"],
                                          adapter_name="unused")
    for index, route in enumerate(ROUTING):
        composed = compose_adapters([adapters[name] for name, _ in route], [w for _, w in route], "mixture")
        reference.load_adapter(save_adapter_dir(composed, root / f"item{index}"), adapter_name=f"item{index}")
    for name in ("a", "b"):
        reference.load_adapter(directories[name], adapter_name=f"raw_{name}")
    reference.eval()
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return {"model": model, "tokenizer": tokenizer, "adapters": adapters, "directories": directories,
            "reference": reference}


def single_item_logits(reference, adapter_name: str, input_ids: torch.Tensor) -> torch.Tensor:
    reference.set_adapter(adapter_name)
    with torch.no_grad():
        return reference(input_ids=input_ids[None]).logits[0]


def test_routed_forward_matches_each_item_alone_with_its_mixture_adapter(setup):
    encoded = tokenize_left_padded(setup["tokenizer"], PROMPTS)
    input_ids, mask = encoded["input_ids"], encoded["attention_mask"]
    assert (mask[:, 0] == 0).any(), "the batch should need left padding"
    logits = route_forward(setup["model"], setup["adapters"], ROUTING, input_ids, mask)
    for index in range(len(PROMPTS)):
        real = mask[index].bool()
        alone = single_item_logits(setup["reference"], f"item{index}", input_ids[index][real])
        torch.testing.assert_close(logits[index][real], alone, atol=1e-5, rtol=1e-4)


def test_routed_forward_matches_peft_mixed_adapter_batch(setup):
    encoded = tokenize_left_padded(setup["tokenizer"], PROMPTS)
    input_ids, mask = encoded["input_ids"], encoded["attention_mask"]
    pool = build_lora_pool(setup["directories"])  # PEFT directories work as pool entries too
    logits = route_forward(setup["model"], pool, ROUTING, input_ids, mask)
    with torch.no_grad():
        peft_logits = setup["reference"](input_ids=input_ids, attention_mask=mask,
                                         position_ids=position_ids_from_mask(mask),
                                         adapter_names=[f"item{i}" for i in range(len(PROMPTS))]).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], peft_logits[real], atol=1e-5, rtol=1e-4)


def test_k2_item_over_adapters_with_different_targets_matches_peft_multi_adapter(setup):
    # a wraps q, v (rank 2); b wraps q, k, v, o (rank 4): one item gets both, with weight 1 each
    reference = setup["reference"]
    ids = setup["tokenizer"](PROMPTS[1], return_tensors="pt")["input_ids"]
    logits = route_forward(setup["model"], setup["adapters"], [[("a", 1.0), ("b", 1.0)]], ids)
    reference.base_model.set_adapter(["raw_a", "raw_b"])
    try:
        with torch.no_grad():
            both = reference(input_ids=ids).logits
    finally:
        reference.set_adapter("unused")
    torch.testing.assert_close(logits, both, atol=1e-5, rtol=1e-4)


def cut_at_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_routed_greedy_generation_matches_items_alone(setup):
    tokenizer, reference = setup["tokenizer"], setup["reference"]
    encoded = tokenize_left_padded(tokenizer, PROMPTS)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    new_tokens = route_generate_ids(setup["model"], setup["adapters"], ROUTING, encoded["input_ids"],
                                    encoded["attention_mask"], max_new_tokens=6, eos_token_id=eos, pad_token_id=pad)
    assert new_tokens.shape[0] == len(PROMPTS) and new_tokens.shape[1] <= 6
    for index, prompt in enumerate(PROMPTS):
        reference.set_adapter(f"item{index}")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                       do_sample=False, eos_token_id=eos, pad_token_id=pad)[0, ids.shape[1]:]
        assert cut_at_eos(new_tokens[index].tolist(), eos)[: len(alone)] == alone.tolist()


def test_route_generate_returns_text_and_leaves_the_model_clean(setup):
    model, tokenizer = setup["model"], setup["tokenizer"]
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    texts = route_generate(model, tokenizer, setup["adapters"], ROUTING[:2], PROMPTS[:2], max_new_tokens=4)
    chat = route_generate(model, tokenizer, setup["adapters"], ROUTING[:2], PROMPTS[:2], max_new_tokens=4, chat=True)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts + chat)
    assert tokenizer.padding_side == "right"  # restored
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)  # hooks removed


def test_routing_matrix_and_weights_scale_the_delta(setup):
    matrix = routing_matrix(ROUTING, ["a", "b", "c"])
    torch.testing.assert_close(matrix, torch.tensor([[1.0, 0, 0], [0.6, 0, 0.4], [0, 1.0, 0], [0.7, 0, 0.3]]))
    model, tokenizer = setup["model"], setup["tokenizer"]
    ids = tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
    half = route_forward(model, setup["adapters"], [[("a", 0.5)]], ids)
    full = route_forward(model, setup["adapters"], [[("a", 1.0)]], ids)
    assert not torch.allclose(half, base) and not torch.allclose(half, full)
    pool = build_lora_pool(setup["adapters"])
    with routed_lora(model, pool, torch.tensor([[1.0, 0.0, 0.0]])), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, full)


def test_routing_errors(setup):
    model, adapters, reference = setup["model"], setup["adapters"], setup["reference"]
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RoutingError, match="unknown adapter 'zzz'"):
        route_forward(model, adapters, [[("zzz", 1.0)]], ids)
    with pytest.raises(ValueError, match="k >= 1"):
        route_forward(model, adapters, [[]], ids)
    with pytest.raises(ValueError, match="1 items but 2 routes"):
        route_forward(model, adapters, ROUTING[:2], ids)
    with pytest.raises(ValueError, match="not a PeftModel"):
        route_forward(reference, adapters, ROUTING[:1], ids)
    with pytest.raises(ValueError, match="scaling is unknown"):
        build_lora_pool({"raw": adapters["a"].state_dict})
    with pytest.raises(ValueError, match="pool is empty"):
        build_lora_pool({})
    with pytest.raises(ValueError, match="left padding"):
        route_generate_ids(model, adapters, ROUTING[:1], ids, torch.tensor([[1, 1, 0]]))


def test_routing_throughput_reports_both_rates(setup):
    report = routing_throughput(setup["model"], setup["tokenizer"], setup["adapters"], ROUTING, PROMPTS,
                                max_new_tokens=2)
    assert report["items"] == len(PROMPTS)
    assert report["batched_items_per_s"] > 0 and report["one_by_one_items_per_s"] > 0
    assert report["speedup"] > 0
