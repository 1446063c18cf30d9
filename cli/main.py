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
        app()
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
