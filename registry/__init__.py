"""Stores and fetches LoRA adapters: SQL metadata, content-addressed safetensors, a FAISS index.

    from registry import Registry
    reg = Registry.open()                 # $REGISTRY_HOME, $REGISTRY_DATABASE_URL
    path = reg.fetch("my-adapter@prod")   # a PEFT directory, digest-checked
"""

from registry.errors import RegistryError

__all__ = ["Registry", "RegistryError", "AdapterInfo", "SearchHit", "ArtifactInfo"]


def __getattr__(name):  # lazy, so `import registry` stays cheap for the CLI
    if name in ("Registry", "AdapterInfo", "SearchHit", "ArtifactInfo"):
        from registry import store

        return getattr(store, name)
    raise AttributeError(name)
