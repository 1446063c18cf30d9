"""``registry compose``: retrieve the nearest adapters for a query (or take named ones) and store their
composition as a ``composed`` adapter. Parses, calls one function of ``retrieval.service``, prints."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.app import HomeOption, JsonOption, PrecisionOption, PromptsOption, app, console, open_registry, print_json

STRATEGY_HELP = ("selection, mixture, fusion (LoraRetriever); linear, ties, dare_linear, dare_ties, magnitude_prune, "
                 "cat, svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd (PEFT)")


@app.command()
def compose(
    name: Annotated[str, typer.Option("--name", help="Name of the new composed adapter.")],
    prompts: PromptsOption = None,
    task: Annotated[Optional[str], typer.Option("--task", help="A zoo task name or a task .jsonl file: its first --n-prompts train prompts are the query.")] = None,
    from_refs: Annotated[list[str], typer.Option("--from", help="Compose these adapters instead of retrieving (repeatable REF).")] = [],
    k: Annotated[int, typer.Option("-k", "--k", help="How many adapters to retrieve and compose.")] = 3,
    strategy: Annotated[str, typer.Option("--strategy", help=STRATEGY_HELP)] = "mixture",
    weights: Annotated[str, typer.Option("--weights", help="uniform (1/k) or softmax of the retrieval scores.")] = "uniform",
    weight: Annotated[list[float], typer.Option("--weight", help="With --from: one weight per adapter, in order (default uniform).")] = [],
    temperature: Annotated[float, typer.Option(help="Softmax temperature for --weights softmax.")] = 1.0,
    add: Annotated[list[str], typer.Option("--add", help="When retrieving: add this adapter at full weight to the composition (repeatable REF; e.g. the multitask LoRA under the selected adapter: ΔW summed, ranks stacked).")] = [],
    gate: Annotated[bool, typer.Option("--gate", help="With --add: keep the composition only if the base model answers the query prompts more surely with it (lower first-token entropy) than with the --add adapters alone; else store those alone.")] = False,
    exclude_task: Annotated[list[str], typer.Option("--exclude-task", help="Leave this task's adapters out of the pool (repeatable).")] = [],
    one_per_task: Annotated[bool, typer.Option("--one-per-task/--all-versions", help="k distinct tasks, the best checkpoint of each, so mixture and fusion really mix (default); --all-versions lets checkpoints of one task fill the k slots.")] = True,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Only adapters of this base model (default: the top hit's).")] = None,
    kind: Annotated[list[str], typer.Option("--kind", help="Pool kinds (repeatable; default: all but composed).")] = [],
    density: Annotated[Optional[float], typer.Option(help="Density in [0, 1] for ties / dare / magnitude_prune.")] = None,
    svd_rank: Annotated[Optional[int], typer.Option("--svd-rank", help="Rank of the *svd merges (default: largest input rank).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the dare strategies.")] = None,
    n_prompts: Annotated[int, typer.Option("--n-prompts", help="With --task: how many train prompts form the query.")] = 32,
    precision: PrecisionOption = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """Compose the k adapters nearest to a query (--prompts FILE or --task T), or the adapters named
    with --from, and store the result as a new `composed` adapter with its lineage."""
    import time

    from registry.errors import RegistryError
    from registry.prompts import read_prompts_file
    from retrieval import service

    if sum([prompts is not None, task is not None, bool(from_refs)]) != 1:
        raise RegistryError("give exactly one of --prompts FILE, --task T or --from REF")
    if weight and not from_refs:
        raise RegistryError("--weight goes with --from; use --weights uniform|softmax when retrieving")
    if add and from_refs:
        raise RegistryError("--add goes with retrieval (--prompts or --task); with --from, name every adapter there")
    if gate and not add:
        raise RegistryError("--gate chooses between the composition and the --add adapters: give --add")
    extra = {"density": density, "svd_rank": svd_rank, "seed": seed}
    task_name = None
    if from_refs:
        query = None
    elif task is not None:
        from harvest.service import task_prompt_sample  # the zoo: only when a task is named

        task_name, query = task_prompt_sample(task, n_prompts)
    else:
        query = read_prompts_file(prompts)
    start = time.perf_counter()
    with open_registry(home) as reg:
        if from_refs:
            info = service.compose_refs(reg, from_refs, weight or None, strategy, name, **extra)
        else:
            info = service.compose_adapter(reg, query, k, strategy, name, exclude_tasks=exclude_task,
                                           weights_mode=weights, temperature=temperature, task=task_name,
                                           base_model=base_model, kind=kind or None, one_per_task=one_per_task,
                                           precision=precision, add=add, gate=gate, **extra)
    seconds = time.perf_counter() - start
    timing = dict(info.recipe.get("timing_s", {}))
    # the rest: imports, opening the registry, storing the new version
    timing["other"] = round(max(seconds - sum(timing.values()), 0.0), 4)
    timing["total"] = round(seconds, 4)
    if json_output:
        print_json(info.to_dict() | {"seconds": timing})
        return
    _print_composed(info, timing)


def _print_composed(info, timing: dict) -> None:
    from rich.table import Table

    out = console()
    recipe = info.recipe
    out.print(f"composed [bold]{info.ref}[/bold] sha256:{info.digest}  ({recipe.get('strategy')}, r={info.rank}, "
              f"base {info.base_model})")
    table = Table(title="parents")
    for column in ("parent", "weight", "score", "task"):
        table.add_column(column)
    scores = dict(zip(recipe.get("retrieved", []), recipe.get("scores", [])))
    tasks = dict(zip(recipe.get("retrieved", []), recipe.get("retrieved_tasks", [])))
    for parent in info.parents:
        score = scores.get(parent["ref"])
        weight = parent["weight"]
        table.add_row(parent["ref"], "-" if weight is None else f"{weight:.4f}",
                      "-" if score is None else f"{score:.4f}", tasks.get(parent["ref"]) or "-")
    out.print(table)
    gate = recipe.get("gate")
    if gate:
        out.print(f"entropy gate: kept the {gate['kept']} (first-token entropy {gate['candidate']:.3f} with the "
                  f"composition, {gate['fallback']:.3f} with the --add adapters alone)")
    parts = [f"{key} {value:.3f} s" for key, value in timing.items() if key not in ("total", "other")]
    parts.append(f"imports/open/store {timing['other']:.3f} s")
    out.print(f"took {timing['total']:.3f} s ({', '.join(parts)}; retrieve includes loading the encoder)")
