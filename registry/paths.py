"""Where a registry lives: its home folder and its database URL."""

from __future__ import annotations

import os
from pathlib import Path


def registry_home(home: str | os.PathLike | None = None) -> Path:
    """The registry home: the argument, else ``$REGISTRY_HOME``, else a per-user data dir."""
    if home is not None:
        return Path(home).expanduser()
    if os.environ.get("REGISTRY_HOME"):
        return Path(os.environ["REGISTRY_HOME"]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("lora-registry", appauthor=False))


def database_url(home: Path, url: str | None = None) -> str:
    """The SQLAlchemy URL: the argument, else ``$REGISTRY_DATABASE_URL``, else SQLite in the home."""
    return url or os.environ.get("REGISTRY_DATABASE_URL") or f"sqlite:///{home / 'registry.db'}"
