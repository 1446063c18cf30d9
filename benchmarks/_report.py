"""What the benchmark scripts share: printing their JSON summary and writing it to ``--out``."""

from __future__ import annotations

import json
from pathlib import Path


def emit_summary(summary: dict, out: Path | None) -> None:
    """Print ``summary`` as indented JSON and, with ``out``, write the same text there."""
    text = json.dumps(summary, indent=1)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
