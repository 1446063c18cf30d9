"""Reading, validating and writing PEFT LoRA directories (safetensors only, never pickles)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from registry.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[A-Za-z0-9_]+))?\.weight$")
PEFT_PREFIX = "base_model.model."
MAX_WEIGHTS_BYTES = 768 << 20  # a rank-64 LoRA on every linear of a 7B model is ~320 MB in fp32
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-wrapped linear: its module path in the base model and its matrix shapes."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LoraKey:
    """A parsed LoRA weight name: ``<module>.lora_<part>[.<adapter>].weight``."""

    module: str          # e.g. base_model.model.model.layers.0.self_attn.q_proj (prefix kept)
    part: str            # "A" or "B"
    adapter: str | None  # the PEFT adapter name some saves leave in the key ("default"), else None

    def key(self, part: str | None = None, adapter: bool = True) -> str:
        """The weight name back, for ``part`` (default: this one), with or without the adapter name."""
        middle = f".{self.adapter}" if adapter and self.adapter else ""
        return f"{self.module}.lora_{part or self.part}{middle}.weight"


def parse_lora_key(key: str) -> LoraKey | None:
    """The one parser of LoRA weight names (registry, generator, retrieval, harvest); None if not one."""
    match = LORA_KEY.match(key)
    return LoraKey(match["module"], match["part"], match["adapter"]) if match else None


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def read_adapter_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise InvalidAdapter(f"{directory} is not a directory")
    if not path.exists():
        raise InvalidAdapter(f"{directory} has no {CONFIG_FILE}: not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidAdapter(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{path} must hold a JSON object")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapter(f"{path}: only LoRA adapters are supported (peft_type={config.get('peft_type')!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise InvalidAdapter(f"{path} lacks the required field {key!r}")
    return config


def read_adapter_weights(directory: Path) -> dict:
    """Load ``adapter_model.safetensors``; pickled weight files are refused without being opened."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InvalidAdapter(
                f"{directory} holds pickled weights ({', '.join(pickles)}); pickles are refused and "
                f"never unpickled: save the adapter with safe_serialization=True"
            )
        raise InvalidAdapter(f"{directory} has no {WEIGHTS_FILE}")
    check_weights_header(weights)
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InvalidAdapter(f"{weights} is not a readable safetensors file: {first_line}") from None


def check_weights_header(path: Path) -> None:
    """Refuse an oversized file or non-float tensors from the file size and the safetensors header
    alone, before any tensor is read."""
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise InvalidAdapter(f"{path} is {size / 2**20:.0f} MiB: the limit for adapter weights is "
                             f"{MAX_WEIGHTS_BYTES >> 20} MiB")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, 100 << 20):
            raise InvalidAdapter(f"{path} is not a readable safetensors file: bad header length")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidAdapter(f"{path} is not a readable safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{path} is not a readable safetensors file: its header is not an object")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(f"{path}: tensor {key!r} has dtype {dtype}: LoRA weights must be floating point")


def read_adapter_dir(directory: str | Path) -> tuple[dict, dict]:
    """A PEFT LoRA directory, validated: (adapter_config dict, state dict). The one reader of the
    layout (``Registry.add_directory``, ``retrieval.compose.load_adapter_dir``)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    return config, read_adapter_weights(directory)


def write_adapter_dir(directory: str | Path, state_dict: dict, config: dict) -> Path:
    """Write a PEFT directory ``PeftModel.from_pretrained`` loads: the config as sorted, indented JSON,
    the weights as safetensors (contiguous CPU tensors, ``format: pt``); each file written atomically."""
    from registry.atomic import atomic_save_tensors, atomic_write_json

    directory = Path(directory)
    atomic_write_json(directory / CONFIG_FILE, config, indent=2, sort_keys=True)
    atomic_save_tensors(directory / WEIGHTS_FILE, state_dict, metadata={"format": "pt"})
    return directory


def normalize_key(key: str) -> str:
    """Drop an adapter name PEFT may leave in a key (``lora_A.default.weight`` -> ``lora_A.weight``)."""
    parsed = parse_lora_key(key)
    return key if parsed is None else parsed.key(adapter=False)


def lora_modules(state_dict: dict) -> list[LoraModule]:
    """Pair every lora_A with its lora_B and check their shapes agree; sorted by module path."""
    pairs: dict[str, dict[str, tuple]] = {}
    for key, tensor in state_dict.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise InvalidAdapter(f"unsupported tensor {key!r}: only linear LoRA A/B weights are supported")
        if tensor.ndim != 2:
            raise InvalidAdapter(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected a matrix")
        module = parsed.module.removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[parsed.part] = tuple(tensor.shape)
    if not pairs:
        raise InvalidAdapter("the adapter holds no LoRA weights")
    modules = []
    for module, parts in sorted(pairs.items(), key=lambda item: natural_key(item[0])):
        if set(parts) != {"A", "B"}:
            raise InvalidAdapter(f"module {module} has lora_{''.join(parts)} but not both A and B")
        (rank_a, in_features), (out_features, rank_b) = parts["A"], parts["B"]
        if rank_a != rank_b:
            raise InvalidAdapter(f"module {module}: lora_A rank {rank_a} != lora_B rank {rank_b}")
        modules.append(LoraModule(module, rank_a, in_features, out_features))
    return modules


def natural_key(text: str) -> list:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def check_finite(state_dict: dict) -> None:
    import torch

    for key, tensor in state_dict.items():
        if not torch.isfinite(tensor).all():
            raise InvalidAdapter(f"tensor {key!r} contains NaN or Inf values")


def check_against_base(modules: list[LoraModule], base_shapes: dict[str, tuple[int, int]], base: str) -> None:
    """Every LoRA module must exist in the base model with matching (out, in) features."""
    for item in modules:
        shape = base_shapes.get(item.module)
        if shape is None:
            raise InvalidAdapter(f"module {item.module} does not exist in base model {base}")
        if shape != (item.out_features, item.in_features):
            raise InvalidAdapter(
                f"module {item.module}: adapter fits a {item.out_features}x{item.in_features} layer "
                f"but base model {base} has {shape[0]}x{shape[1]}"
            )


def layout_fingerprint(modules: list[LoraModule]) -> str:
    """sha256 over the sorted (module, rank, in, out) list: equal layouts compose directly."""
    rows = [[m.module, m.rank, m.in_features, m.out_features] for m in modules]
    return hashlib.sha256(canonical_json(rows)).hexdigest()


def serialize_weights(state_dict: dict) -> bytes:
    """Canonical safetensors bytes: PEFT key names, contiguous tensors, fixed metadata."""
    from safetensors.torch import save

    tensors = {normalize_key(k): v.detach().contiguous().cpu() for k, v in sorted(state_dict.items())}
    return save(tensors, metadata={"format": "pt"})
