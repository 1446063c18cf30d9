"""The typer app and the options every command shares. Commands live in the ``*_commands`` modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="registry",
    help="A LoRA adapter registry: store, harvest, generate (DnD), retrieve and compose adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
HomeOption = Annotated[Optional[Path], typer.Option("--home", help="Registry home (default: $REGISTRY_HOME or a per-user data dir).", envvar="REGISTRY_HOME", show_envvar=False)]
PromptsOption = Annotated[Optional[Path], typer.Option("--prompts", help="File with one prompt per line, or JSONL with a 'prompt' field.", dir_okay=False)]


def open_registry(home: Path | None):
    from registry.store import Registry

    return Registry.open(home)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def console():
    from rich.console import Console

    return Console()


def progress():
    """A rich progress bar with a description, a bar, counts, elapsed and remaining time."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console_stderr())


def console_stderr():
    from rich.console import Console

    return Console(stderr=True)
