"""Commands that store, find and fetch adapters. Each parses, calls one library function, prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import HomeOption, JsonOption, PromptsOption, app, console, open_registry, print_json


def adapters_table(adapters, title: str | None = None, scores: list[float] | None = None, wide: bool = False):
    """A rich table of adapters: compact by default, every column with ``wide``."""
    from rich.table import Table

    table = Table(title=title)
    columns = ["ref", "kind", "task", "r", "aliases", "digest"]
    if wide:
        columns += ["base model", "modules", "created"]
    if scores is not None:
        table.add_column("score", justify="right")
    for column in columns:
        table.add_column(column, no_wrap=column in ("ref", "digest"), overflow="fold")
    for i, info in enumerate(adapters):
        row = [info.ref, info.kind, info.task or "-", str(info.rank), ",".join(info.aliases) or "-", info.digest[:12]]
        if wide:
            row += [info.base_model, ",".join(info.target_modules), info.created_at.strftime("%Y-%m-%d %H:%M")]
        if scores is not None:
            row.insert(0, f"{scores[i]:.3f}")
        table.add_row(*row)
    return table


WideOption = Annotated[bool, typer.Option("--wide", help="Also show base model, modules and creation time.")]


@app.command()
def add(
    path: Annotated[Path, typer.Argument(help="A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).")],
    name: Annotated[Optional[str], typer.Option(help="Adapter name (default: the directory name).")] = None,
    task: Annotated[Optional[str], typer.Option(help="The task the adapter was trained for.")] = None,
    description: Annotated[Optional[str], typer.Option(help="One sentence describing the task.")] = None,
    prompts: PromptsOption = None,
    tag: Annotated[list[str], typer.Option("--tag", help="A tag (repeatable).")] = [],
    base: Annotated[Optional[str], typer.Option(help="Base model folder, if the config names a hub id.")] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """Import a PEFT LoRA directory as a new version."""
    from registry.prompts import read_prompts_file

    prompt_list = read_prompts_file(prompts) if prompts else []
    with open_registry(home) as reg:
        info = reg.add_directory(path, name=name, task=task, task_description=description,
                                 prompts=prompt_list, tags=tag, base=base)
    if json_output:
        print_json(info.to_dict())
    else:
        console().print(f"added [bold]{info.ref}[/bold] sha256:{info.digest}")


@app.command("list")
def list_(
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Only adapters of this base model.")] = None,
    kind: Annotated[Optional[str], typer.Option(help="harvested, imported, generated or composed.")] = None,
    task: Annotated[Optional[str], typer.Option(help="Only adapters of this task.")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Only adapters with this tag.")] = None,
    wide: WideOption = False,
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """List adapter versions."""
    with open_registry(home) as reg:
        adapters = reg.list_adapters(base_model=base_model, kind=kind, task=task, tag=tag)
    if json_output:
        print_json([a.to_dict() for a in adapters])
    else:
        console().print(adapters_table(adapters, title=f"{len(adapters)} adapters", wide=wide))


@app.command()
def show(ref: Annotated[str, typer.Argument(help="name, name@3, name@prod or sha256:<digest>")],
         home: HomeOption = None, json_output: JsonOption = False):
    """Show one adapter: config, digests, task, metrics, lineage and prompts."""
    with open_registry(home) as reg:
        info = reg.resolve(ref)
        prompts = reg.prompts(info.ref)
    data = info.to_dict() | {"prompts": prompts}
    if json_output:
        print_json(data)
        return
    out = console()
    for key in ("ref", "kind", "base_model", "base_fingerprint", "rank", "alpha", "use_rslora",
                "target_modules", "task", "task_description", "digest", "weights_sha256",
                "config_sha256", "size_bytes", "created_at", "tags", "aliases", "metrics", "recipe", "parents"):
        out.print(f"[bold]{key}[/bold]: {data[key]}")
    out.print(f"[bold]prompts[/bold] ({len(prompts)}): " + "; ".join(p[:60] for p in prompts[:5])
              + (" ..." if len(prompts) > 5 else ""))


@app.command()
def fetch(ref: Annotated[str, typer.Argument(help="name, name@3, name@prod or sha256:<digest>")],
          to: Annotated[Optional[Path], typer.Option("--to", help="Copy the PEFT directory here.")] = None,
          verify: Annotated[bool, typer.Option(help="Re-hash the weights even if cached.")] = False,
          home: HomeOption = None, json_output: JsonOption = False):
    """Materialise a PEFT directory (digest-checked) and print its path."""
    with open_registry(home) as reg:
        info = reg.resolve(ref)
        path = reg.fetch(info.ref, to=to, verify=verify)
    if json_output:
        print_json({"ref": info.ref, "digest": info.digest, "path": str(path)})
    else:
        print(path)


@app.command()
def search(
    text: Annotated[Optional[str], typer.Argument(help="A prompt to search with.")] = None,
    prompts: PromptsOption = None,
    k: Annotated[int, typer.Option("-k", "--k", help="How many adapters to return.")] = 5,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Only adapters of this base model.")] = None,
    kind: Annotated[Optional[str], typer.Option(help="Only adapters of this kind.")] = None,
    exclude_task: Annotated[list[str], typer.Option("--exclude-task", help="Leave this task's adapters out (repeatable).")] = [],
    all_versions: Annotated[bool, typer.Option("--all-versions", help="List every matching version (checkpoints of one adapter too), not one per adapter.")] = False,
    wide: WideOption = False,
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """Find the adapters whose sample prompts are nearest to a text or a prompts file: one row per
    adapter (its best-scoring version, the newest among equals) unless --all-versions."""
    from registry.errors import RegistryError
    from registry.prompts import read_prompts_file

    if (text is None) == (prompts is None):
        raise RegistryError("give either a TEXT or --prompts FILE")
    query = text if text is not None else read_prompts_file(prompts)
    with open_registry(home) as reg:
        hits = _search(reg, query, k, all_versions, base_model=base_model, kind=kind, exclude_tasks=exclude_task)
    if json_output:
        print_json([{"score": h.score, **h.adapter.to_dict()} for h in hits])
    else:
        console().print(adapters_table([h.adapter for h in hits], title=f"top {len(hits)}",
                                       scores=[h.score for h in hits], wide=wide))


def _search(reg, query, k: int, all_versions: bool, **filters) -> list:
    """``registry.search.search_per_adapter``: one row per adapter unless ``all_versions``."""
    from registry.search import search_per_adapter

    return search_per_adapter(reg, query, k, all_versions, **filters)


@app.command()
def alias(ref: Annotated[str, typer.Argument(help="The version to point at, e.g. name@3.")],
          alias_name: Annotated[str, typer.Argument(metavar="ALIAS", help="The alias, e.g. prod.")],
          home: HomeOption = None, json_output: JsonOption = False):
    """Point NAME@ALIAS at a version (moving the alias if it exists)."""
    with open_registry(home) as reg:
        info = reg.set_alias(ref, alias_name)
    if json_output:
        print_json(info.to_dict())
    else:
        console().print(f"{info.name}@{alias_name} -> {info.ref}")


@app.command()
def rm(ref: Annotated[str, typer.Argument(help="The version to remove.")],
       home: HomeOption = None, json_output: JsonOption = False):
    """Remove a version (it no longer resolves; lineage that names it is kept)."""
    with open_registry(home) as reg:
        info = reg.remove(ref)
    if json_output:
        print_json(info.to_dict())
    else:
        console().print(f"removed {info.ref}")


@app.command()
def reindex(home: HomeOption = None, json_output: JsonOption = False):
    """Rebuild the FAISS index from SQL."""
    with open_registry(home) as reg:
        count = reg.reindex()
    if json_output:
        print_json({"vectors": count})
    else:
        console().print(f"index rebuilt with {count} vectors")


@app.command()
def doctor(repair: Annotated[bool, typer.Option(help="Fix what can be fixed.")] = False,
           home: HomeOption = None, json_output: JsonOption = False):
    """Check SQL vs blobs (re-hashing every digest) vs the FAISS index."""
    with open_registry(home) as reg:
        report = reg.doctor(repair=repair)
    if json_output:
        print_json({"ok": report.ok, "checked_adapters": report.checked_adapters,
                    "problems": report.problems, "repaired": report.repaired})
    else:
        out = console()
        for line in report.repaired:
            out.print(f"[green]repaired[/green] {line}")
        for line in report.problems:
            out.print(f"[red]problem[/red] {line}")
        out.print(f"checked {report.checked_adapters} adapters: " + ("ok" if report.ok else f"{len(report.problems)} problems"))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def migrate(home: HomeOption = None):
    """Apply database migrations (also done automatically on first use)."""
    from registry.db import current_revision, make_engine, upgrade
    from registry.paths import database_url, registry_home

    root = registry_home(home)
    root.mkdir(parents=True, exist_ok=True)
    url = database_url(root)
    engine = make_engine(url)
    upgrade(engine, url)
    console().print(f"database at revision {current_revision(engine)}")


@app.command()
def export(
    refs: Annotated[list[str], typer.Argument(help="Adapters to export (e.g. name@prod).")],
    vllm: Annotated[Path, typer.Option("--vllm", help="Resolver directory: writes <DIR>/<name>/adapter_config.json.")],
    home: HomeOption = None,
    json_output: JsonOption = False,
):
    """Write adapters in the directory layout vLLM's filesystem resolver and LoRAX load."""
    with open_registry(home) as reg:
        paths = reg.export_vllm(vllm, refs)
    if json_output:
        print_json([str(p) for p in paths])
    else:
        for path in paths:
            print(path)
