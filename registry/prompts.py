"""Reading prompt files: one prompt per line, or JSONL whose objects carry a ``prompt`` field."""

from __future__ import annotations

import json
from pathlib import Path

from registry.errors import RegistryError

MAX_PROMPT_CHARS = 8192  # one prompt; the CLI, the API and ``Registry.add_weights`` share this limit
MAX_PROMPTS_FILE_BYTES = 64 << 20


def check_prompt(prompt: str, where: str = "prompt") -> str:
    """``prompt`` if it is within ``MAX_PROMPT_CHARS``, else a one-line ``RegistryError``."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RegistryError(f"{where} is {len(prompt):,} characters long: the limit is {MAX_PROMPT_CHARS:,}")
    return prompt


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts in ``path``; raises ``RegistryError`` for a missing, non-UTF-8 or empty file."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_PROMPTS_FILE_BYTES:
            raise RegistryError(f"prompts file {path} is larger than {MAX_PROMPTS_FILE_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"prompts file {path} does not exist") from None
    except UnicodeDecodeError:
        raise RegistryError(f"prompts file {path} is not valid UTF-8") from None
    except OSError as err:
        raise RegistryError(f"cannot read prompts file {path}: {err.strerror}") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise RegistryError(f"{path}:{number}: invalid JSON line") from None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise RegistryError(f"{path}:{number}: JSON line without a non-empty 'prompt' string")
            prompts.append(check_prompt(prompt.strip(), f"{path}:{number}"))
        else:
            prompts.append(check_prompt(line, f"{path}:{number}"))
    if not prompts:
        raise RegistryError(f"prompts file {path} holds no prompts")
    return prompts


def prompts_sha256(prompts) -> str:
    """The digest of a prompt list (order matters), recorded in generated and composed adapters' recipes:
    sha256 of its compact UTF-8 JSON encoding (unambiguous, unlike joining by newlines)."""
    import hashlib

    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
