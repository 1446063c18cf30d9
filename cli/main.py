"""Entry point of the ``registry`` command: registers every command module and turns user errors
into one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys

from cli import (  # noqa: F401  (each module registers its commands on the app)
    bench_commands,
    generate_commands,
    harvest_commands,
    registry_commands,
    retrieval_commands,
    serve_commands,
)
from cli.app import app


def main() -> None:
    import os

    from registry.errors import RegistryError

    # Our own rich bars report progress; keep transformers' per-load bars and hub lookups quiet.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    # Known-harmless library chatter: PEFT notes that we load adapters onto the converted local copy
    # of the base model; transformers deprecates a name PEFT still calls.
    warnings.filterwarnings("ignore", message=r".*base_model_name_or_path.*was renamed")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

    try:
        try:
            app()
        except RegistryError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    except SystemExit as done:
        if not _is_the_process_entry_point():
            raise
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        _exit_without_teardown(code)
    if _is_the_process_entry_point():
        _exit_without_teardown(0)


def _is_the_process_entry_point() -> bool:
    """True when this process is the ``registry`` command itself (console script or ``python -m
    cli.main``), not a test or a program that called ``main()``; ``REGISTRY_FAST_EXIT=0`` turns it off."""
    import os

    if os.environ.get("REGISTRY_FAST_EXIT", "1") == "0":
        return False
    entry = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.basename(entry) == "registry" or entry.endswith(os.path.join("cli", "main.py"))


def _exit_without_teardown(code: int) -> None:
    """Run the atexit handlers, flush, and leave without the interpreter's teardown: with torch
    loaded that teardown alone takes 0.5-0.8 s (measured on a bare ``import torch``), longer than
    most commands' own work. Every file the commands write is complete (fsync + rename) by now."""
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
