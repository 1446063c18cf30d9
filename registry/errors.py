"""User-facing errors. The CLI prints any ``RegistryError`` as one line and exits non-zero."""


class RegistryError(Exception):
    """Base class for every error caused by bad input or a missing thing (not a bug)."""


class InvalidName(RegistryError):
    """A name or alias that is not allowed."""


class NotFound(RegistryError):
    """A reference that resolves to nothing."""


class InvalidAdapter(RegistryError):
    """A PEFT directory or weights that cannot be stored."""


class IntegrityError(RegistryError):
    """Stored bytes that do not match their recorded digest."""
