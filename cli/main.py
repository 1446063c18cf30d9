"""Entry point of the ``registry`` command: registers every command module and turns user errors
into one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys

from cli import registry_commands  # noqa: F401  (registers commands)
from cli.app import app

COMMAND_MODULES = ("cli.harvest_commands", "cli.generate_commands", "cli.retrieval_commands",
                   "cli.serve_commands", "cli.bench_commands")


def _register_optional_modules() -> None:
    import importlib
    import importlib.util

    for module in COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


_register_optional_modules()


def main() -> None:
    import os

    from registry.errors import RegistryError

    # Our own rich bars report progress; keep transformers' per-load bars and hub lookups quiet.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    try:
        app()
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
