"""Accuracy of retrieval and of per-item routing, measured on task data: the evaluation layer,
which may use the harvest's tasks and metrics and the retrieval services alike."""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Sequence

from harvest.evaluate import DEFAULT_EVAL_BATCH
from retrieval.pool import PoolCache, RetrievalError, check_k, check_match, pool_kinds, query_texts, retrieve_vector
from retrieval.routing_service import generate_routed, model_base_id, plan_pool, route_plan

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from registry.store import Registry


def _interleave(tasks, n_per_task: int) -> list[tuple[Any, Any]]:
    """(task, example) pairs, round-robin over the tasks so every batch mixes tasks."""
    columns = [[(task, example) for example in task.split("test")[:n_per_task]] for task in tasks]
    items = []
    for row in range(max((len(column) for column in columns), default=0)):
        items += [column[row] for column in columns if row < len(column)]
    return items


def routed_accuracy(reg: "Registry", tasks: Sequence[Any], n_per_task: int = 10, k: int = 1, *,
                    base: str | None = None, model=None, tokenizer=None, batch_size: int = DEFAULT_EVAL_BATCH,
                    exclude_own: bool = False, weights_mode: str = "uniform", temperature: float = 1.0,
                    kind: str | Sequence[str] | None = None, one_per_task: bool = False,
                    max_new_tokens: int | None = None, one_by_one: bool = True, with_base: bool = False,
                    device: str | None = None) -> dict:
    """Accuracy of per-item routing on a mixed batch of several tasks' test items, and its throughput.

    Items (the first ``n_per_task`` test examples of each task, interleaved) are routed through their
    own k retrieved adapters (mixture; ``exclude_own`` removes each item's own task from its pool,
    the out-of-distribution setting) and scored with their task's metric. Reports accuracy per task
    and overall, the retrieval top-1 hit rate (top adapter of the item's own task), and items/s of
    the routed batches vs the same items one by one (same adapters; pool stacked once; retrieval
    timed apart). ``with_base`` adds the base model's accuracy on the same items.
    """
    from registry import base_models

    from harvest.evaluate import default_max_new_tokens, generate
    from harvest.metrics import score as score_of
    check_k(k)
    if not tasks:
        raise RetrievalError("no tasks to evaluate")
    if n_per_task < 1:
        raise RetrievalError(f"n_per_task must be at least 1, got {n_per_task}")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise RetrievalError(f"tasks are given twice: {sorted(n for n, c in Counter(names).items() if c > 1)}")
    items = _interleave(tasks, n_per_task)
    if not items:
        raise RetrievalError("the tasks have no test items")
    if model is None:
        model, tokenizer = base_models.load_base(base, device=device)
    elif tokenizer is None:
        raise RetrievalError("pass the tokenizer together with the model")
    if max_new_tokens is None:
        max_new_tokens = max(task.info.max_new_tokens
                             or default_max_new_tokens(tokenizer, task.split("test")[:n_per_task])
                             for task in tasks)

    start = time.perf_counter()
    plan = route_plan(reg, [example.prompt for _, example in items], k, base_model=model_base_id(model),
                      exclude_tasks_per_item=[[task.name] if exclude_own else [] for task, _ in items],
                      weights_mode=weights_mode, temperature=temperature, kind=kind, one_per_task=one_per_task)
    retrieve_s = time.perf_counter() - start
    pool = plan_pool(reg, plan)

    start = time.perf_counter()
    outputs = generate_routed(model, tokenizer, pool, plan, max_new_tokens, batch_size)
    batched_s = time.perf_counter() - start
    result_items = []
    per_task: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0.0, "top1_own_task": 0})
    for (task, example), item, output in zip(items, plan, outputs):
        score = score_of(task.metric, output, example.answer)
        own = item.hits[0].adapter.task == task.name
        stats = per_task[task.name]
        stats["n"] += 1
        stats["correct"] += score
        stats["top1_own_task"] += int(own)
        result_items.append({"task": task.name, "prompt": example.prompt, "answer": example.answer,
                             "prediction": output, "score": score, "route": item.route,
                             "retrieved_tasks": [hit.adapter.task for hit in item.hits]})

    throughput = {"items": len(items), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                  "retrieve_seconds": retrieve_s, "batched_seconds": batched_s,
                  "batched_items_per_s": len(items) / batched_s}
    if one_by_one:
        start = time.perf_counter()
        singles = [generate_routed(model, tokenizer, pool, [item], max_new_tokens, 1)[0] for item in plan]
        single_s = time.perf_counter() - start
        throughput |= {"one_by_one_seconds": single_s, "one_by_one_items_per_s": len(items) / single_s,
                       "speedup": single_s / batched_s,
                       "one_by_one_agreement": sum(a == b for a, b in zip(singles, outputs)) / len(items)}

    total = len(items)
    report = {
        "k": k, "exclude_own": exclude_own, "weights_mode": weights_mode, "n_per_task": n_per_task,
        "items": total,
        "accuracy": sum(item["score"] for item in result_items) / total,
        "retrieval_top1": sum(s["top1_own_task"] for s in per_task.values()) / total,
        "per_task": {name: {"n": s["n"], "accuracy": s["correct"] / s["n"],
                            "retrieval_top1": s["top1_own_task"] / s["n"]} for name, s in per_task.items()},
        "throughput": throughput,
        "predictions": result_items,
    }
    if with_base:
        prompts = [example.prompt for _, example in items]
        base_outputs, _ = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size)
        base_scores = [score_of(task.metric, output, example.answer)
                       for (task, example), output in zip(items, base_outputs)]
        report["base_accuracy"] = sum(base_scores) / total
        for name in report["per_task"]:
            scores = [s for (task, _), s in zip(items, base_scores) if task.name == name]
            report["per_task"][name]["base_accuracy"] = sum(scores) / len(scores)
    return report


# --- retrieval quality -------------------------------------------------------------------------------


def retrieval_accuracy(reg: "Registry", tasks: dict[str, Sequence[str]], k: int = 3, exclude_own: bool = False,
                       *, base_model: str | None = None, kind: str | Sequence[str] | None = "harvested",
                       one_per_task: bool = True, match: str = "base") -> dict:
    """How often retrieval finds each test prompt's own task: top-1 accuracy and recall@k.

    ``tasks`` maps a task name to its test prompts (not the prompts stored with its adapters). Each
    prompt is embedded alone. With ``one_per_task`` (default) the k hits are k distinct tasks (the
    best checkpoint of each), so recall@k asks "is the own task among the k nearest tasks" rather
    than counting several checkpoints of one task. ``exclude_own`` removes the prompt's own task from
    the pool: accuracy and recall are then 0 by construction and are reported as ``None``; the
    ``neighbours`` table (top-1 retrieved task per own task) is the useful output. ``kind`` defaults to
    ``harvested`` (the zoo).
    """
    from registry.embeddings import embed_texts

    check_k(k)
    kinds, match = pool_kinds(kind), check_match(match)
    if not tasks:
        raise RetrievalError("no tasks given")
    pairs = [(task, prompt) for task, prompts in tasks.items() for prompt in prompts]
    if not pairs:
        raise RetrievalError("the tasks hold no test prompts")
    texts = query_texts([prompt for _, prompt in pairs])
    vectors = embed_texts(texts, reg.encoder)  # (n, C): each prompt alone
    pools = PoolCache(reg)
    per_task: dict[str, dict] = {name: {"n": 0, "top1": 0, "recall": 0} for name in tasks}
    neighbours: dict[str, Counter] = {name: Counter() for name in tasks}
    latencies = []
    for (task, _), vector in zip(pairs, vectors):
        start = time.perf_counter()
        hits = retrieve_vector(reg, vector, k, base_model=base_model, exclude_tasks=[task] if exclude_own else [],
                                kinds=kinds, one_per_task=one_per_task, match=match, pools=pools)
        latencies.append(time.perf_counter() - start)
        stats = per_task[task]
        stats["n"] += 1
        stats["top1"] += int(hits[0].adapter.task == task)
        stats["recall"] += int(task in {hit.adapter.task for hit in hits})
        neighbours[task][hits[0].adapter.task] += 1
    total = len(pairs)
    recall_key = f"recall@{k}"
    return {
        "k": k, "n": total, "exclude_own": exclude_own, "one_per_task": one_per_task,
        "top1_accuracy": None if exclude_own else sum(s["top1"] for s in per_task.values()) / total,
        recall_key: None if exclude_own else sum(s["recall"] for s in per_task.values()) / total,
        "per_task": {name: {"n": s["n"],
                            "top1_accuracy": None if exclude_own or not s["n"] else s["top1"] / s["n"],
                            recall_key: None if exclude_own or not s["n"] else s["recall"] / s["n"]}
                     for name, s in per_task.items()},
        "neighbours": {name: dict(counter.most_common()) for name, counter in neighbours.items()},
        "search_ms_p50": 1000 * statistics.median(latencies),
    }
