"""Names, aliases and references (REFs).

A REF is one of ``name`` (the latest version), ``name@3`` (a version), ``name@prod`` (an alias) or
``sha256:<hex>`` (a digest or a unique prefix of at least 8 hex digits). Versions are immutable
integers numbered per name; aliases move.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import InvalidName

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: "$" lets "abc\n" through
VERSION_PATTERN = re.compile(r"[0-9]{1,10}")  # ASCII digits only: "²" and "١" are str.isdigit() too
MAX_VERSION = 2**31 - 1  # the SQL column is a 32-bit integer
DIGEST_PATTERN = re.compile(r"[0-9a-f]{8,64}")
RESERVED_ALIASES = {"latest"}


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a safe adapter name, else raise ``InvalidName``.

    Names become directory names for serving systems, so ``/``, ``..``, control characters and
    leading dots are refused.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = name.encode("unicode_escape").decode() if isinstance(name, str) else repr(name)
        raise InvalidName(
            f"invalid {what} {shown!r}: use letters, digits, '.', '_' or '-' (max 128), "
            "starting with a letter or digit, without '..'"
        )
    return name


def validate_alias(alias: str) -> str:
    """Aliases follow name rules but may not be all digits (those are versions) or reserved."""
    validate_name(alias, "alias")
    if alias.isdigit() or VERSION_PATTERN.fullmatch(alias) or alias in RESERVED_ALIASES:
        raise InvalidName(f"invalid alias {alias!r}: digits mean versions and 'latest' is reserved")
    return alias


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of (name [+ version | alias]) or digest is set."""

    name: str | None = None
    version: int | None = None
    alias: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.digest:
            return f"sha256:{self.digest}"
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias:
            return f"{self.name}@{self.alias}"
        return str(self.name)


def parse_ref(text: str) -> Ref:
    """Parse a REF string; raise ``InvalidName`` with a one-line message when it is malformed."""
    text = (text or "").strip()
    if text.startswith("sha256:"):
        digest = text[len("sha256:"):].lower()
        if not DIGEST_PATTERN.fullmatch(digest):
            raise InvalidName(f"invalid digest reference {text!r}: expected sha256:<8-64 hex digits>")
        return Ref(digest=digest)
    name, sep, tag = text.partition("@")
    validate_name(name)
    if not sep or tag == "latest":
        return Ref(name=name)
    if tag.isdigit():
        if not VERSION_PATTERN.fullmatch(tag) or int(tag) > MAX_VERSION:
            shown = tag.encode("unicode_escape").decode()
            raise InvalidName(f"invalid version {shown!r} in {name}@{shown}: versions are ASCII digits "
                              f"up to {MAX_VERSION}")
        return Ref(name=name, version=int(tag))
    validate_alias(tag)
    return Ref(name=name, alias=tag)
