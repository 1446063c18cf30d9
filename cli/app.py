"""The typer app and the options every command shares. Commands live in the ``*_commands`` modules."""

from __future__ import annotations

import json
import sys
import time
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
PrecisionOption = Annotated[Optional[str], typer.Option("--precision", help="auto (bf16 on a CPU with AMX or a GPU with bf16, else fp32), fp32 or bf16; default $REGISTRY_PRECISION or auto.")]
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
    """A rich progress bar (description, bar, counts, elapsed, remaining) on a terminal; plain log lines
    otherwise, so that ``nohup ... > log`` shows progress as it happens instead of one frame at the end."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    stderr = console_stderr()
    if not stderr.is_terminal:
        return LineProgress()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=stderr)


class LineProgress:
    """The slice of ``rich.progress.Progress`` the commands use, writing one line to stderr each time a
    task crosses another tenth of its total (nothing at 0, so a command that fails early prints only its
    one-line error), a change of phase (a status whose first word differs from the one before) at
    once, and other status updates (a loss, a step) at most every ``status_every_s`` seconds."""

    def __init__(self, status_every_s: float = 30.0):
        self.status_every_s = status_every_s
        self._tasks: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = {"description": description, "total": total, "completed": 0, "fields": fields,
                                "logged_tenth": 0, "start": time.monotonic(), "logged_at": time.monotonic()}
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, completed=self._tasks[task_id]["completed"] + advance)

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, description: str | None = None, **fields) -> None:
        task = self._tasks[task_id]
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        if advance is not None:
            task["completed"] += advance
        if completed is not None:
            task["completed"] = completed
        task["fields"].update(fields)
        tenth = int(10 * task["completed"] / task["total"]) if task["total"] else 0
        status, previous = fields.get("status"), task.get("seen_status", "")
        new_phase = status and previous and status.split(" ")[0] != previous.split(" ")[0]
        task["seen_status"] = status or previous
        status_news = status and (new_phase or time.monotonic() - task["logged_at"] >= self.status_every_s)
        if tenth > task["logged_tenth"] or status_news:
            task["logged_tenth"], task["logged_at"] = max(tenth, task["logged_tenth"]), time.monotonic()
            status = task["fields"].get("status", "")
            elapsed = time.monotonic() - task["start"]
            total = f"/{task['total']:g}" if task["total"] else ""
            sys.stderr.write(f"{task['description']}: {task['completed']:g}{total} {status} "
                             f"[{elapsed:.0f}s]\n".replace("  [", " ["))
            sys.stderr.flush()


def console_stderr():
    from rich.console import Console

    return Console(stderr=True)
