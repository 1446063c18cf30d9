"""The generator's errors: one-line ``RegistryError`` subclasses, raised before anything is written."""

from registry.errors import RegistryError


class GeneratorError(RegistryError):
    """A generator that cannot be trained, found, loaded or used as asked (one-line message)."""

class GeneratorLayoutError(GeneratorError):
    """A stored generator whose layout, decoder and normaliser do not agree."""

class TrainingStopped(GeneratorError):
    """Training stopped before its last step; the state is saved and a rerun resumes it."""
