"""Writing adapters where serving systems read them: ``<directory>/<name>/`` folders in the layout
vLLM's filesystem resolver and LoRAX read, each swapped in atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from registry import peft_io
from registry.atomic import TEMP_PREFIX, remove_stale, swap_directory


def export_vllm(reg, directory: str | os.PathLike, refs: Sequence[str]) -> list[Path]:
    """Write ``<directory>/<name>/adapter_config.json`` (+ weights) for each REF: the layout
    vLLM's filesystem resolver and LoRAX read. Each folder is swapped in atomically."""
    root = Path(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)  # folders a killed export left (older than an hour)
    written = []
    for ref in refs:
        info = reg.resolve(ref)
        source = reg._materialize(info, verify=False)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f"{TEMP_PREFIX}export-"))
        for file_name in (peft_io.CONFIG_FILE, peft_io.WEIGHTS_FILE):
            shutil.copyfile(source / file_name, staging / file_name)
        (staging / "registry.json").write_text(json.dumps({"ref": info.ref, "digest": info.digest}))
        target = root / info.name
        swap_directory(staging, target)
        written.append(target)
    return written
