"""Retrieval + composition through the registry (retrieval.service) and `registry compose`.

Tiny llama adapters with random weights, each stored with prompts of one distinct topic and embedded
by the real (offline) MiniLM encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_adapter_dir

TOPICS = {
    "arithmetic": [
        "What is 12 plus 30?", "Add 7 and 15.", "Compute 81 minus 27.", "What is 6 times 9?",
        "Subtract 45 from 100.", "What is the sum of 23 and 19?", "Multiply 11 by 12.", "Divide 84 by 4.",
    ],
    "cooking": [
        "How long should I boil pasta?", "What spices go well in a tomato soup?", "How do I bake sourdough bread?",
        "Give me a recipe for pancakes.", "How do I caramelize onions?", "What temperature to roast a chicken?",
        "How can I make a creamy risotto?", "How do I season a cast iron pan?",
    ],
    "geography": [
        "What is the capital of France?", "Which river flows through Egypt?", "Name the highest mountain in Africa.",
        "What is the largest country in South America?", "Which ocean lies west of Portugal?",
        "What is the capital city of Japan?", "Which desert covers much of northern Africa?",
        "What country has the city of Toronto?",
    ],
}
QUERIES = {
    "arithmetic": ["What is 14 plus 28?", "Compute 9 times 7.", "What is 100 minus 58?"],
    "cooking": ["How do I make a vegetable stew?", "What herbs should I add to a roast?",
                "How long do I bake cookies?"],
    "geography": ["What is the capital of Italy?", "Which mountains separate France and Spain?",
                  "Which river runs through Paris?"],
}
ASTRONOMY = ["How far is the Moon from Earth?", "What is a black hole?", "Why do stars twinkle at night?",
             "How many planets orbit the Sun?", "What is a galaxy made of?"]


@pytest.fixture(scope="session")
def wide_base_dir(tmp_path_factory) -> Path:
    """A second tiny llama with a different shape (hidden 48): adapters for it fit no other base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY_VOCAB

    directory = tmp_path_factory.mktemp("wide-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def adapter_dirs(tiny_base_dir, wide_base_dir, tmp_path_factory) -> dict[str, Path]:
    """PEFT directories, built once: four q,v rank-4 adapters of the tiny llama, and three misfits."""
    root = tmp_path_factory.mktemp("retrieval-adapters")
    specs = {"math": dict(seed=1), "math-b": dict(seed=4), "cook": dict(seed=2), "geo": dict(seed=3),
             "qkvo": dict(seed=6, targets=("q_proj", "k_proj", "v_proj", "o_proj")), "r2": dict(seed=7, rank=2)}
    dirs = {name: make_tiny_adapter_dir(tiny_base_dir, root / name, **spec) for name, spec in specs.items()}
    dirs["wide"] = make_tiny_adapter_dir(wide_base_dir, root / "wide", seed=5)
    return dirs


@pytest.fixture
def zoo(reg, adapter_dirs):
    """Four harvested adapters (two checkpoints of arithmetic), each with its topic's prompts."""
    dirs = {name: adapter_dirs[name] for name in ("math", "math-b", "cook", "geo")}
    tasks = {"math": "arithmetic", "math-b": "arithmetic", "cook": "cooking", "geo": "geography"}
    with reg.bulk():
        for name, directory in dirs.items():
            reg.add_directory(directory, name=name, kind="harvested", task=tasks[name], prompts=TOPICS[tasks[name]])
    return dirs


def registry_state(home: Path) -> tuple:
    """What a reader could see: adapter versions (removed ones too) and blobs."""
    from registry.store import Registry

    with Registry.open(home) as registry:
        adapters = [a.ref for a in registry.list_adapters(include_removed=True)]
        blobs = sorted(registry.blobs.all_digests())
    return adapters, blobs


# --- retrieve ------------------------------------------------------------------------------------------


def test_retrieve_ranks_the_right_task_first(reg, zoo):
    from retrieval.service import retrieve

    for task, queries in QUERIES.items():
        for query in queries:
            assert retrieve(reg, query, k=1)[0].adapter.task == task, query
        hits = retrieve(reg, queries, k=3)  # the mean of the task's prompts
        assert hits[0].adapter.task == task
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # several checkpoints per task: one_per_task returns distinct tasks
    hits = retrieve(reg, QUERIES["arithmetic"], k=3, one_per_task=True)
    assert [h.adapter.task for h in hits][0] == "arithmetic"
    assert len({h.adapter.task for h in hits}) == 3
    assert {h.adapter.name for h in retrieve(reg, QUERIES["arithmetic"], k=2)} == {"math", "math-b"}


def test_exclude_tasks_removes_the_own_task(reg, zoo):
    from registry.errors import RegistryError
    from retrieval.service import retrieve

    hits = retrieve(reg, QUERIES["arithmetic"], k=2, exclude_tasks=["arithmetic"])
    assert {h.adapter.task for h in hits} == {"cooking", "geography"}
    pool_of_two = r"k=3 is larger than the compatible pool: 2 adapters .*excluding task\(s\) arithmetic"
    with pytest.raises(RegistryError, match=pool_of_two):
        retrieve(reg, QUERIES["arithmetic"], k=3, exclude_tasks=["arithmetic"])


def test_retrieve_refuses_bad_k_and_empty_queries(reg, zoo):
    from registry.errors import RegistryError
    from retrieval.service import retrieve

    with pytest.raises(RegistryError, match="k must be at least 1"):
        retrieve(reg, "What is 2 plus 2?", k=0)
    with pytest.raises(RegistryError, match="k=5 is larger than the compatible pool: 4 adapters"):
        retrieve(reg, "What is 2 plus 2?", k=5)
    with pytest.raises(RegistryError, match="k=4 is larger than the compatible pool: 3 tasks"):
        retrieve(reg, "What is 2 plus 2?", k=4, one_per_task=True)
    with pytest.raises(RegistryError, match="no prompts"):
        retrieve(reg, [], k=1)
    with pytest.raises(RegistryError, match="empty prompt"):
        retrieve(reg, ["  "], k=1)


def test_pool_follows_the_top_hits_base_model_and_layout(reg, zoo, adapter_dirs, tiny_base_dir):
    from registry.errors import RegistryError
    from retrieval.service import retrieve

    reg.add_directory(adapter_dirs["wide"], name="stars", kind="harvested", task="astronomy", prompts=ASTRONOMY)
    reg.add_directory(adapter_dirs["qkvo"], name="qkvo", kind="harvested", task="cooking-2",
                      prompts=TOPICS["cooking"][:4])
    query = "How many moons does Jupiter have?"
    assert retrieve(reg, query, k=1)[0].adapter.name == "stars"
    with pytest.raises(RegistryError, match=r"compatible pool: 1 adapter \(base .*wide"):
        retrieve(reg, query, k=2)  # the wide base holds one adapter
    hits = retrieve(reg, query, k=4, base_model=str(tiny_base_dir))  # the four q,v adapters of the tiny base
    assert {h.adapter.name for h in hits} == {"math", "math-b", "cook", "geo"}
    hits = retrieve(reg, query, k=5, base_model=str(tiny_base_dir), match="base")
    assert "qkvo" in {h.adapter.name for h in hits}


# --- compose --------------------------------------------------------------------------------------------


def expected_mixture(directories, weights) -> dict[str, torch.Tensor]:
    """Σ w_i s_i B_i A_i per module, from the original PEFT directories."""
    from retrieval.compose import load_adapter_dir

    adapters = [load_adapter_dir(d) for d in directories]
    return {module: sum(w * a.delta_weight(module) for a, w in zip(adapters, weights))
            for module in adapters[0].modules}


def peft_delta_weights(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    return {name: module.get_delta_weight("default") for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def test_compose_adapter_stores_a_peft_loadable_mixture_with_lineage(reg, zoo, tiny_base_dir):
    from retrieval.service import compose_adapter, prompts_sha256

    query = QUERIES["cooking"]
    info = compose_adapter(reg, query, k=2, strategy="mixture", name="cook-mix", exclude_tasks=["arithmetic"])
    assert info.ref == "cook-mix@1" and info.kind == "composed"
    assert info.rank == 8  # two rank-4 adapters side by side
    assert [p["ref"] for p in info.parents] == ["cook@1", "geo@1"]
    assert [p["weight"] for p in info.parents] == [0.5, 0.5]
    recipe = info.recipe
    assert recipe["strategy"] == "mixture" and recipe["k"] == 2 and recipe["weights_mode"] == "uniform"
    assert recipe["query_prompts_sha256"] == prompts_sha256(query) and recipe["query_prompts"] == query
    assert recipe["exclude_tasks"] == ["arithmetic"] and len(recipe["scores"]) == 2
    assert recipe["scores"][0] >= recipe["scores"][1]
    assert reg.prompts(info.ref) == query
    assert reg.search(query, k=1, kind="composed")[0].adapter.ref == "cook-mix@1"  # searchable
    from registry.precision import resolve
    assert recipe["precision"] == resolve("auto")  # the query's embedding precision, resolved

    deltas = peft_delta_weights(tiny_base_dir, reg.fetch(info.ref))
    expected = expected_mixture([zoo["cook"], zoo["geo"]], [0.5, 0.5])
    assert len(deltas) == len(expected) == 4
    for module, delta in expected.items():
        name = module.removeprefix("base_model.model.")
        peft_name = next(n for n in deltas if n.endswith(name))
        torch.testing.assert_close(deltas[peft_name], delta, atol=1e-6, rtol=1e-5)


def test_softmax_weights_and_composed_adapters_stay_out_of_the_default_pool(reg, zoo):
    from retrieval.service import compose_adapter, retrieve

    query = QUERIES["geography"]
    info = compose_adapter(reg, query, k=3, strategy="fusion", name="geo-fused", weights_mode="softmax",
                           temperature=0.05, one_per_task=True)
    scores = torch.tensor(info.recipe["scores"])
    weights = torch.softmax(scores / 0.05, dim=0)
    assert [p["weight"] for p in info.parents] == pytest.approx(weights.tolist(), abs=1e-5)
    assert info.recipe["match"] == "layout" and info.rank == 4
    # the composed adapter holds the very same prompts, yet the default pool leaves it out
    assert all(h.adapter.kind == "harvested" for h in retrieve(reg, query, k=4))
    assert retrieve(reg, query, k=1, kind="composed")[0].adapter.ref == "geo-fused@1"


def test_selection_keeps_the_top_adapter(reg, zoo):
    from retrieval.service import compose_adapter

    info = compose_adapter(reg, QUERIES["arithmetic"], k=2, strategy="selection", name="pick")
    top = info.recipe["retrieved"][0]
    assert info.parents == [{"ref": top, "weight": 1.0}]
    original, _ = reg.load_weights(top)
    chosen, _ = reg.load_weights(info.ref)
    assert all(torch.equal(original[key], chosen[key]) for key in original)


def test_selection_plus_an_added_adapter_sums_their_weight_deltas(reg, zoo):
    """``add``: the composition plus a fixed adapter at full weight, ΔW = ΔW_selected + ΔW_added."""
    from retrieval.service import compose_adapter, load_lora

    info = compose_adapter(reg, QUERIES["arithmetic"], k=1, strategy="selection", name="pick-plus", add=["cook@1"])
    top = info.recipe["retrieved"][0]
    assert info.parents == [{"ref": top, "weight": 1.0}, {"ref": "cook@1", "weight": 1.0}]
    assert info.recipe["added"] == ["cook@1"] and info.rank == 8  # two rank-4 adapters, ranks stacked
    summed, selected, added = load_lora(reg, info.ref), load_lora(reg, top), load_lora(reg, "cook@1")
    for module in selected.modules:
        torch.testing.assert_close(summed.delta_weight(module),
                                   selected.delta_weight(module) + added.delta_weight(module))


def test_the_entropy_gate_keeps_the_composition_or_the_added_adapter_alone(reg, zoo, monkeypatch):
    """``gate``: measured on the real tiny base, the recipe records both entropies and the kept side;
    whichever side is surer decides what is stored (parents, weights)."""
    from registry import confidence
    from retrieval.service import compose_adapter, load_lora

    info = compose_adapter(reg, QUERIES["arithmetic"], k=1, strategy="selection", name="gated", add=["cook@1"], gate=True)
    gate = info.recipe["gate"]
    assert gate["kept"] == ("composition" if gate["candidate"] < gate["fallback"] else "added") and gate["seconds"] > 0
    for entropies, kept in (([1.0, 0.5], "composition"), ([0.5, 1.0], "added"), ([0.5, 0.5], "added")):
        monkeypatch.setattr(confidence, "mean_entropies", lambda *args, e=entropies, **kw: e)
        info = compose_adapter(reg, QUERIES["arithmetic"], k=1, strategy="selection", name=f"gated-{kept}",
                               add=["cook@1"], gate=True)
        top = info.recipe["retrieved"][0]
        assert info.recipe["gate"]["kept"] == kept
        if kept == "composition":
            assert info.parents == [{"ref": top, "weight": 1.0}, {"ref": "cook@1", "weight": 1.0}] and info.rank == 8
        else:  # the added adapter alone, its weights unchanged
            assert info.parents == [{"ref": "cook@1", "weight": 1.0}] and info.rank == 4
            stored, added = load_lora(reg, info.ref), load_lora(reg, "cook@1")
            assert all(torch.equal(stored.state_dict[k], added.state_dict[k]) for k in added.state_dict)


# --- the CLI --------------------------------------------------------------------------------------------


@pytest.fixture
def bad_pool(reg, zoo, adapter_dirs):
    """The zoo plus adapters that cannot be composed with it (no prompts: outside the retrieval pool)."""
    for name in ("wide", "qkvo", "r2"):
        reg.add_directory(adapter_dirs[name], name=name)
    return zoo


@pytest.mark.parametrize("args, message", [
    (["--from", "math@1", "--from", "wide@1"], "different base models"),
    (["--from", "math@1", "--from", "qkvo@1"], "target different modules"),
    (["--from", "math@1", "--from", "r2@1", "--strategy", "linear"], "needs equal ranks"),
    (["--from", "math@1", "--from", "r2@1", "--strategy", "fusion"], "needs equal ranks"),
    (["--from", "math@1", "--from", "nope@1"], "no adapter matches nope@1"),
    (["--prompts", "QUERY", "-k", "0"], "k must be at least 1"),
    (["--prompts", "QUERY", "-k", "9", "--all-versions"], "k=9 is larger than the compatible pool: 4 adapters"),
    (["--prompts", "QUERY", "-k", "3", "--exclude-task", "arithmetic", "--all-versions"], "compatible pool: 2 adapters"),
    (["--prompts", "QUERY", "-k", "9"], "k=9 is larger than the compatible pool: 3 tasks"),  # one per task by default
    (["--prompts", "QUERY", "--strategy", "ties"], "needs density"),
    (["--prompts", "QUERY", "--strategy", "blend"], "unknown strategy 'blend'"),
    (["--prompts", "QUERY", "--weights", "argmax"], "unknown weights mode"),
    (["--prompts", "QUERY", "--from", "math@1"], "exactly one of"),
    (["--prompts", "QUERY", "--add", "nope@1"], "no adapter matches nope@1"),
    (["--prompts", "QUERY", "--add", "wide@1"], "different base models"),
    (["--from", "math@1", "--add", "cook@1"], "--add goes with retrieval"),
    (["--prompts", "QUERY", "--gate"], "--gate chooses between the composition and the --add adapters"),
    ([], "exactly one of"),
    (["--prompts", "EMPTY"], "holds no prompts"),
    (["--prompts", "QUERY", "--name", "../evil"], "invalid name"),
    (["--task", "no-such-task.jsonl"], "task file not found"),
    (["--prompts", "QUERY", "--precision", "int8"], "unknown precision 'int8'"),
])
def test_cli_compose_refuses_bad_input_without_writing(cli, bad_pool, registry_home, tmp_path, args, message):
    query = tmp_path / "query.txt"
    query.write_text("\n".join(QUERIES["arithmetic"]) + "\n")
    (tmp_path / "empty.txt").write_text("\n")
    args = [{"QUERY": query, "EMPTY": tmp_path / "empty.txt"}.get(a, a) for a in args]
    if "--name" not in args:
        args += ["--name", "new"]
    before = registry_state(registry_home)
    code, out, err = cli("compose", *args)
    assert code == 1, out
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert registry_state(registry_home) == before


@pytest.mark.parametrize("strategy", ["mixture", "cat", "svd"])
def test_cli_compose_from_different_ranks(cli, bad_pool, strategy):
    code, out, err = cli("compose", "--from", "math@1", "--from", "r2@1", "--weight", "0.7", "--weight", "0.3",
                         "--strategy", strategy, "--name", f"mixed-{strategy}", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["parents"] == [{"ref": "math@1", "weight": 0.7}, {"ref": "r2@1", "weight": 0.3}]
    assert data["rank"] == (6 if strategy in ("mixture", "cat") else 4)
    assert data["recipe"]["refs"] == ["math@1", "r2@1"] and "total" in data["seconds"]


def test_cli_compose_from_prompts_and_task_file(cli, zoo, tmp_path, reg):
    query = tmp_path / "query.txt"
    query.write_text("\n".join(QUERIES["geography"]) + "\n")
    code, out, err = cli("compose", "--prompts", query, "-k", "2", "--name", "geo-mix")
    assert code == 0, err
    assert "geo-mix@1" in out and "geo@1" in out and "took" in out
    pytest.importorskip("harvest.tasks")
    task_file = tmp_path / "kitchen.jsonl"
    task_file.write_text("".join(json.dumps({"prompt": p, "answer": "ok", "split": "train"}) + "\n"
                                 for p in QUERIES["cooking"] + TOPICS["cooking"][:2]))
    code, out, err = cli("compose", "--task", task_file, "-k", "2", "--one-per-task", "--weights", "softmax",
                         "--name", "kitchen-mix", "--precision", "fp32", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["task"] == "kitchen" and data["recipe"]["n_query_prompts"] == 5
    assert data["recipe"]["precision"] == "fp32"
    from registry.embeddings import embed_texts  # fp32: the stored query vectors are the registry's own
    np.testing.assert_allclose(reg.prompt_embeddings(data["ref"]), embed_texts(reg.prompts(data["ref"])), atol=1e-6, rtol=0)
    assert data["parents"][0]["ref"] == "cook@1" and len(data["parents"]) == 2


# --- routing and evaluation ------------------------------------------------------------------------------


def test_route_items_matches_per_item_peft_generation(reg, zoo, tiny_base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrieval.service import route_items, route_plan

    prompts = [QUERIES["arithmetic"][0], QUERIES["cooking"][0], QUERIES["arithmetic"][1], QUERIES["cooking"][1]]
    reg.remove("math-b@1")
    reg.remove("geo@1")  # two adapters left: math and cook
    plan = route_plan(reg, prompts, k=1)
    assert [item.refs for item in plan] == [["math@1"], ["cook@1"], ["math@1"], ["cook@1"]]

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    outputs = route_items(reg, model, tokenizer, prompts, k=1, max_new_tokens=6)
    assert len(outputs) == len(prompts)
    for prompt, item, output in zip(prompts, plan, outputs):
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir),
                                               reg.fetch(item.refs[0])).eval()
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            new = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                      do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        assert output == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_routed_accuracy_reports_accuracy_hit_rate_and_throughput(reg, zoo, tiny_base_dir):
    pytest.importorskip("harvest.tasks")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harvest.tasks import Example, make_task
    from evaluation.accuracy import routed_accuracy

    tasks = [make_task(name, [Example(p, "x") for p in TOPICS[name][:2]],
                       [Example(p, "5") for p in QUERIES[name][:2]], metric="contains", max_new_tokens=3)
             for name in ("arithmetic", "cooking")]
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    report = routed_accuracy(reg, tasks, n_per_task=2, k=2, model=model, tokenizer=tokenizer, batch_size=4,
                             one_per_task=True, with_base=True)
    assert report["items"] == 4 and set(report["per_task"]) == {"arithmetic", "cooking"}
    assert [p["task"] for p in report["predictions"]] == ["arithmetic", "cooking"] * 2  # a mixed batch
    assert report["retrieval_top1"] == 1.0
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["base_accuracy"] <= 1.0
    throughput = report["throughput"]
    assert throughput["batched_items_per_s"] > 0 and throughput["one_by_one_items_per_s"] > 0
    assert throughput["one_by_one_agreement"] == 1.0  # batching changes nothing
    ood = routed_accuracy(reg, tasks, n_per_task=1, k=1, model=model, tokenizer=tokenizer, exclude_own=True,
                          one_by_one=False)
    assert ood["retrieval_top1"] == 0.0
    assert all("arithmetic" not in p["retrieved_tasks"] for p in ood["predictions"] if p["task"] == "arithmetic")


def test_retrieval_accuracy_counts_distinct_tasks(reg, zoo):
    from evaluation.accuracy import retrieval_accuracy

    report = retrieval_accuracy(reg, QUERIES, k=2)
    assert report["n"] == 9 and report["top1_accuracy"] == 1.0 and report["recall@2"] == 1.0
    assert report["per_task"]["cooking"] == {"n": 3, "top1_accuracy": 1.0, "recall@2": 1.0}
    ood = retrieval_accuracy(reg, QUERIES, k=2, exclude_own=True)
    assert ood["top1_accuracy"] is None
    assert "arithmetic" not in ood["neighbours"]["arithmetic"]
    assert sum(ood["neighbours"]["cooking"].values()) == 3
