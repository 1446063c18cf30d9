"""Commands for tasks, harvesting LoRAs and evaluating adapters."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import HomeOption, JsonOption, PrecisionOption, app, console, open_registry, print_json, progress

tasks_app = typer.Typer(help="The task zoo and user task files.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")

TaskOption = Annotated[Optional[str], typer.Option("--task", help="A zoo task name or a .jsonl task file.")]


FamilyOption = Annotated[Optional[str], typer.Option("--family", help="Only this task family (see `registry tasks families`).")]


@tasks_app.command("list")
def tasks_list(family: FamilyOption = None, json_output: JsonOption = False):
    """List the built-in zoo tasks (with their family)."""
    from harvest.zoo import list_zoo

    infos = list_zoo(family)
    if json_output:
        print_json([i.to_dict() for i in infos])
        return
    from rich.table import Table

    table = Table(title=f"{len(infos)} zoo tasks" + (f" in family {family}" if family else ""))
    for column in ("name", "family", "metric", "language", "description"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.name, info.family or "", info.metric, info.language, info.description)
    console().print(table)


@tasks_app.command("families")
def tasks_families(json_output: JsonOption = False):
    """List the zoo's task families and how many tasks each has."""
    from harvest.zoo import FAMILIES, zoo_names

    rows = [{"family": f.name, "tasks": len(zoo_names(f.name)), "description": f.description} for f in FAMILIES.values()]
    if json_output:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} task families, {sum(r['tasks'] for r in rows)} tasks")
    for column in ("family", "tasks", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["family"], str(row["tasks"]), row["description"])
    console().print(table)


@tasks_app.command("show")
def tasks_show(task: Annotated[str, typer.Argument(help="A zoo task name or a .jsonl file.")],
               json_output: JsonOption = False):
    """Show a task's metadata, split sizes and a few examples."""
    from harvest.service import resolve_task

    loaded = resolve_task(task)
    data = loaded.info.to_dict() | {"train": len(loaded.split("train")), "test": len(loaded.split("test")),
                                    "examples": [e.__dict__ for e in loaded.split("train")[:3]]}
    if json_output:
        print_json(data)
    else:
        for key, value in data.items():
            console().print(f"[bold]{key}[/bold]: {value}")


@tasks_app.command("export")
def tasks_export(task: Annotated[str, typer.Argument(help="A zoo task name.")],
                 path: Annotated[Path, typer.Argument(help="Output .jsonl (metadata goes to <path>.meta.json).")]):
    """Export a zoo task as a JSONL file a user can edit and harvest with --task."""
    from harvest.zoo import export_task

    print(export_task(task, path))


@app.command("harvest")
def harvest_command(
    task: TaskOption = None,
    zoo: Annotated[bool, typer.Option("--zoo", help="Harvest every zoo task, skipping finished ones.")] = False,
    family: Annotated[Optional[str], typer.Option("--family", help="With --zoo: only this family's tasks (comma-separated for several).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model folder (default: embedded SmolLM2-135M-Instruct).")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 16.0,
    targets: Annotated[str, typer.Option(help="Comma-separated module names.")] = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: the recipe's).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per step.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    keep: Annotated[Optional[int], typer.Option("--keep", help="Checkpoints kept near the end of training.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    precision: PrecisionOption = None,
    ray: Annotated[bool, typer.Option("--ray", help="With --zoo: one Ray task per zoo task (a GPU each where the "
                                      "cluster has them), all writing to this registry.")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", metavar="ADDRESS", help=(
        "The Ray cluster for --ray (implies it); default: ray.init()'s ($RAY_ADDRESS, this machine's "
        "cluster, else a new local one)."))] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """Fine-tune LoRAs and store their last checkpoints as harvested adapters (resumable)."""
    from harvest.service import check_settings, harvest_task, resolve_task
    from harvest.train import HarvestConfig
    from harvest.zoo import zoo_names
    from registry.errors import RegistryError

    if zoo == (task is not None):
        raise RegistryError("give either --task T or --zoo")
    if family and not zoo:
        raise RegistryError("--family goes with --zoo")
    ray = ray or ray_address is not None
    if ray and not zoo:
        raise RegistryError("--ray goes with --zoo")
    names = [task] if not zoo else (zoo_names() if not family else
                                    [n for f in family.split(",") for n in zoo_names(f.strip())])
    config = HarvestConfig(rank=rank, alpha=alpha, seed=seed,
                           target_modules=tuple(t.strip() for t in targets.split(",") if t.strip()))
    for field_name, value in (("steps", steps), ("lr", lr), ("batch_size", batch_size), ("n_checkpoints", keep)):
        if value is not None:
            setattr(config, field_name, value)
    check_settings(config, base)
    from registry.precision import resolve

    resolve(precision)  # an unknown name fails here, before any work
    tasks = [resolve_task(name) for name in names]
    if ray:
        _harvest_on_ray(names, ray_address, home, base, config, device, precision, json_output)
        return
    summaries = []
    with open_registry(home) as reg, progress() as bar:
        overall = bar.add_task("tasks", total=len(tasks), status="")
        for loaded in tasks:
            steps_bar = bar.add_task(loaded.name, total=config.steps, status="")

            def on_step(step, loss, _bar=steps_bar):
                bar.update(_bar, completed=step, status=f"loss {loss:.3f}")

            summary = harvest_task(reg, loaded, base=base, config=config, on_step=on_step, device=device,
                                   precision=precision)
            bar.update(steps_bar, completed=config.steps,
                       status="already harvested" if summary.skipped else f"{len(summary.refs)} checkpoints")
            bar.advance(overall)
            summaries.append(summary)
    _print_summaries(summaries, json_output)


def _harvest_on_ray(names, address, home, base, config, device, precision, json_output) -> None:
    """``harvest --zoo --ray``: the tasks on a Ray cluster; a one-line error per failed task, exit 1 if any."""
    from harvest.distributed import harvest_on_ray
    from registry.paths import registry_home

    with open_registry(registry_home(home).resolve()) as reg:  # created and migrated once, before the workers
        where = {"home": reg.home, "database_url": reg.url}
    with progress() as bar:
        overall = bar.add_task("tasks", total=len(names), status="")

        def on_done(outcome):
            status = "failed" if outcome.error else ("skipped" if outcome.summary.skipped else "harvested")
            bar.update(overall, advance=1, status=f"{outcome.task} {status}")

        outcomes = harvest_on_ray(names, **where, address=address, base=base, config=config, device=device,
                                  precision=precision, on_done=on_done)
    failed = [o for o in outcomes if o.error]
    if json_output:
        print_json([o.summary.to_dict() if o.summary else {"task": o.task, "error": o.error} for o in outcomes])
    else:
        _print_summaries([o.summary for o in outcomes if o.summary], False)
    for outcome in failed:
        print(f"error: {outcome.task}: {outcome.error}", file=sys.stderr)
    if failed:
        raise typer.Exit(1)


def _print_summaries(summaries, json_output: bool) -> None:
    if json_output:
        print_json([s.to_dict() for s in summaries])
        return
    from rich.table import Table

    table = Table(title="harvest")
    for column in ("task", "checkpoints", "final loss", "seconds", "tokens/s", "status"):
        table.add_column(column)
    for s in summaries:
        table.add_row(s.task, f"{s.refs[0]} .. {s.refs[-1]}" if s.refs else "-",
                      f"{s.final_loss:.3f}" if s.final_loss is not None else "-", f"{s.seconds:.0f}",
                      f"{s.tokens_per_second:.0f}", "skipped (done)" if s.skipped else "harvested")
    console().print(table)


@app.command("eval")
def eval_command(
    task: Annotated[list[str], typer.Option("--task", help="Task name or .jsonl file (repeat with --route).")],
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="The adapter REF to evaluate.")] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Evaluate the base model alone.")] = False,
    route: Annotated[bool, typer.Option("--route", help="Mixed-task batch; each item routed to its retrieved adapters.")] = False,
    k: Annotated[int, typer.Option("-k", help="Adapters per item with --route.")] = 1,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N test items.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    base: Annotated[Optional[str], typer.Option(help="Base model folder for --base-only.")] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    precision: PrecisionOption = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """Score an adapter (or the base model) with the task's metric on its test split."""
    from harvest.service import evaluate_stored, resolve_task
    from registry.errors import RegistryError

    tasks = [resolve_task(t) for t in task]
    if route:
        from evaluation.accuracy import routed_accuracy

        with open_registry(home) as reg:
            report = routed_accuracy(reg, tasks, n_per_task=limit or 20, k=k, batch_size=batch_size)
        if json_output:
            print_json(report)
        else:
            for key, value in report.items():
                console().print(f"[bold]{key}[/bold]: {value}")
        return
    if (adapter is None) == (not base_only):
        raise RegistryError("give either --adapter REF or --base-only")
    if len(tasks) != 1:
        raise RegistryError("--task may be repeated only with --route")
    with open_registry(home) as reg:
        result = evaluate_stored(reg, tasks[0], adapter, base=base, limit=limit, batch_size=batch_size, device=device,
                                 precision=precision)
    summary = {k: v for k, v in result.to_dict().items() if k != "predictions"} | {"adapter": adapter or "base"}
    if json_output:
        print_json(summary | {"predictions": result.to_dict()["predictions"][:5]})
        return
    from rich.table import Table

    table = Table(title=f"{result.task} ({result.metric})")
    for column in ("model", "accuracy", "n", "seconds", "precision"):
        table.add_column(column)
    table.add_row(adapter or "base", f"{result.accuracy:.3f}", str(result.n), f"{result.seconds:.1f}", result.precision)
    console().print(table)
