"""Named fault points for crash tests: ``REGISTRY_FAULT=<point>`` makes the process kill itself with
SIGKILL when it reaches that point (no ``finally``, no ``atexit``, no flush), as a power cut or the
OOM killer would. ``REGISTRY_FAULT=<point>:<n>`` stops at the n-th time the point is reached.
Unset (always, outside tests), ``point`` costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

_COUNTS: dict[str, int] = {}


def point(name: str) -> None:
    """Stop dead here when ``$REGISTRY_FAULT`` names this point."""
    spec = os.environ.get("REGISTRY_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _COUNTS[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
