"""Retrieval + composition benchmark: compose latency for k=3 and end-to-end ``compose_adapter`` latency.

    python benchmarks/bench_retrieval.py                       # both parts, on a scratch registry
    python benchmarks/bench_retrieval.py --home ~/zoo-home     # end to end on an existing registry
    python benchmarks/bench_retrieval.py --no-e2e --repeats 50 # only the pure composition timing

Timings are for this CPU at the given torch thread count (default 1; see --threads).

1. Pure composition (float32 weight arithmetic) (``retrieval.compose.compose_adapters``) of k=3 synthetic adapters with the shapes of
   a SmolLM2-135M LoRA: r=8, alpha=16, seven modules (q, k, v, o, gate, up, down) in 30 layers
   (2.44 M parameters per adapter). No base model is needed.
2. End to end ``retrieval.service.compose_adapter``: embed the query (MiniLM), retrieve k=3 from the
   registry, load the three adapters (digest-checked), compose, store the new version. Without
   ``--home`` it runs on a scratch registry of SmolLM2-shaped adapters (a config-only SmolLM2-shaped
   base folder, 20 prompts per adapter); with ``--home`` on that registry, with queries made of its
   adapters' own stored prompts, and the composed versions it stored are removed afterwards
   (``--keep`` keeps them). The first call (which loads the encoder) is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3)
MODULES = {  # leaf -> (in, out) for SmolLM2-135M (head_dim 64, 3 KV heads)
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
STRATEGY_ARGS = {"ties": {"density": 0.5}, "dare_linear": {"density": 0.5, "seed": 0},
                 "dare_ties": {"density": 0.5, "seed": 0}, "magnitude_prune": {"density": 0.5},
                 "ties_svd": {"density": 0.5}}
TOPICS = ["arithmetic", "cooking", "geography", "astronomy", "music", "law"]
TEMPLATES = {
    "arithmetic": "What is {a} plus {b}?",
    "cooking": "How long should I cook {a} grams of rice with {b} cups of water?",
    "geography": "Which country lies {a} kilometres north of the border near city number {b}?",
    "astronomy": "How far is star number {a} from Earth if its parallax is {b} milliarcseconds?",
    "music": "Which chord follows the progression in bar {a} of a song in {b}/4 time?",
    "law": "Does clause {a} of a contract still apply after {b} days of notice?",
}


def percentiles(samples_s: list[float]) -> str:
    ms = np.array(samples_s) * 1000
    return f"p50 {np.percentile(ms, 50):8.1f} ms   p95 {np.percentile(ms, 95):8.1f} ms   (n={len(ms)})"


def synthetic_state_dict(seed: int, rank: int = 8, layers: int = 30) -> dict:
    """A PEFT state dict with SmolLM2 LoRA shapes and random small weights."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in MODULES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            state[prefix + ".lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.02
            state[prefix + ".lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.02
    return state


def bench_compose(strategies: list[str], repeats: int, k: int = 3) -> None:
    from retrieval.compose import LoraAdapter, compose_adapters

    adapters = [LoraAdapter(synthetic_state_dict(seed), rank=8, alpha=16.0, base_model="smollm2-shaped",
                            name=f"a{seed}") for seed in range(k)]
    params = sum(t.numel() for t in adapters[0].state_dict.values())
    print(f"\n== compose_adapters, k={k} SmolLM2-shaped adapters (r=8, 7 modules x 30 layers, "
          f"{params / 1e6:.2f} M params each, fp32) ==")
    for strategy in strategies:
        kwargs = STRATEGY_ARGS.get(strategy, {})
        slow = "svd" in strategy  # 210 full SVDs of ΔW (up to 1536 x 576): seconds per call, no warm-up needed
        if not slow:
            compose_adapters(adapters, None, strategy, **kwargs)  # warm-up
        samples = []
        for _ in range(max(3, repeats // 5) if slow else repeats):
            start = time.perf_counter()
            compose_adapters(adapters, None, strategy, **kwargs)
            samples.append(time.perf_counter() - start)
        print(f"{strategy:>16}: {percentiles(samples)}")


def build_scratch_registry(work: Path, per_topic: int, prompts_per_adapter: int = 20):
    """A registry of SmolLM2-shaped harvested adapters over a config-only SmolLM2-shaped base."""
    from transformers import LlamaConfig

    from registry.store import Registry

    base = work / "smollm2-shaped"
    LlamaConfig(**SMOLLM2, architectures=["LlamaForCausalLM"]).save_pretrained(base)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [m.split(".")[-1] for m in MODULES],
              "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}
    reg = Registry.open(work / "home")
    rng = random.Random(0)
    start = time.perf_counter()
    with reg.bulk():
        for index, topic in enumerate(TOPICS):
            prompts = [TEMPLATES[topic].format(a=rng.randint(2, 999), b=rng.randint(2, 99))
                       for _ in range(prompts_per_adapter)]
            for checkpoint in range(per_topic):
                reg.add_weights(f"{topic}-ckpt{checkpoint}", synthetic_state_dict(100 * index + checkpoint), config,
                                kind="harvested", task=topic, prompts=prompts)
    print(f"scratch registry: {len(TOPICS) * per_topic} adapters ({per_topic} per task, {prompts_per_adapter} prompts "
          f"each) built in {time.perf_counter() - start:.1f} s")
    queries = [[TEMPLATES[topic].format(a=rng.randint(2, 999), b=rng.randint(2, 99)) for _ in range(8)]
               for topic in TOPICS]
    return reg, queries, [[] for _ in TOPICS]


def home_queries(reg, count: int, exclude_own: bool, prompts_per_query: int = 16):
    """Queries made of stored prompts of the registry's adapters with a task, one task after another."""
    by_task = {}
    for info in reg.list_adapters():
        if info.task and info.kind != "composed" and info.task not in by_task and info.encoder == reg.encoder_id:
            by_task[info.task] = info
    if not by_task:
        raise SystemExit("the registry holds no adapters with a task and prompts")
    infos = list(by_task.values())
    chosen = [infos[i % len(infos)] for i in range(count)]
    queries = [reg.prompts(info.ref)[:prompts_per_query] for info in chosen]
    excludes = [[info.task] if exclude_own else [] for info in chosen]
    return queries, excludes


def bench_end_to_end(reg, queries, excludes, strategies: list[str], repeats: int, k: int, keep: bool,
                     precisions: list[str]) -> None:
    from retrieval.service import compose_adapter

    print(f"\n== compose_adapter end to end, k={k} (embed query, retrieve, load, compose, store) on {reg.home}; "
          f"precision = the query embedding's ({' vs '.join(precisions)}) ==")
    created = []
    try:
        for precision in precisions:  # warm-up: loads the encoder (and its bf16 copy)
            info = compose_adapter(reg, queries[0], k, strategies[0], "bench-compose", exclude_tasks=excludes[0],
                                   precision=precision, **STRATEGY_ARGS.get(strategies[0], {}))
            created.append(info.ref)
        for strategy, precision in [(s, p) for s in strategies for p in precisions]:
            totals, parts = [], {"retrieve": [], "compose": [], "store": []}
            for index in range(repeats):
                query, exclude = queries[index % len(queries)], excludes[index % len(excludes)]
                start = time.perf_counter()
                info = compose_adapter(reg, query, k, strategy, "bench-compose", exclude_tasks=exclude,
                                       precision=precision, **STRATEGY_ARGS.get(strategy, {}))
                total = time.perf_counter() - start
                created.append(info.ref)
                totals.append(total)
                timing = info.recipe["timing_s"]
                parts["retrieve"].append(timing["retrieve"])
                parts["compose"].append(timing["compose"])
                parts["store"].append(total - timing["retrieve"] - timing["compose"])
            medians = ", ".join(f"{name} {1000 * statistics.median(values):.1f}" for name, values in parts.items())
            print(f"{strategy + ' ' + precision:>16}: {percentiles(totals)}   median ms: {medians}")
    finally:
        if not keep:
            for ref in created:
                reg.remove(ref)
            if created:
                print(f"(removed the {len(created)} composed versions the benchmark stored)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="Run the end-to-end part on this registry home.")
    parser.add_argument("--strategies", default="mixture,fusion,ties,svd", help="Comma-separated strategies.")
    parser.add_argument("--e2e-strategies", default="mixture", help="Strategies for the end-to-end part.")
    parser.add_argument("--repeats", type=int, default=20, help="Timed repeats of pure composition (svd: a fifth).")
    parser.add_argument("--e2e-repeats", type=int, default=10, help="Timed repeats of compose_adapter.")
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=2, help="Scratch registry: checkpoints per task.")
    parser.add_argument("--exclude-own", action="store_true", help="--home: exclude the query's own task.")
    parser.add_argument("--keep", action="store_true", help="--home: keep the composed versions.")
    parser.add_argument("--no-e2e", action="store_true", help="Only the pure composition timing.")
    parser.add_argument("--precisions", default="fp32,bf16", help="End to end: precisions of the query embedding.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: more oversubscribe a busy 2-core machine; 0: torch's choice).")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    bench_compose(args.strategies.split(","), args.repeats, args.k)
    if args.no_e2e:
        return
    strategies = args.e2e_strategies.split(",")
    from registry.precision import resolve

    precisions = [resolve(p) for p in args.precisions.split(",")]
    if args.home:
        from registry.store import Registry

        with Registry.open(args.home) as reg:
            queries, excludes = home_queries(reg, max(args.e2e_repeats, 1), args.exclude_own)
            bench_end_to_end(reg, queries, excludes, strategies, args.e2e_repeats, args.k, args.keep, precisions)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    try:
        reg, queries, excludes = build_scratch_registry(work, args.per_task)
        with reg:
            bench_end_to_end(reg, queries, excludes, strategies, args.e2e_repeats, args.k, keep=True,
                             precisions=precisions)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
