"""LoRA adapter files in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow PEFT's ``save_pretrained``: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (the
adapter name is not in the key). Writes are atomic per file (temp file + rename); a load reads and validates
every file, key, shape and config field before the model is touched.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import LoraLinear, _new_adapter
from .model import _set_submodule, layers_with_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# PEFT LoRA features fastpeft does not implement: a config using any of them is refused, never half-loaded.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none",
                "modules_to_save": None, "layers_to_transform": None, "use_qalora": False}


class AdapterFileError(ValueError):
    """An adapter file is missing, unreadable, corrupted, or does not match the model."""


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def peft_lora_config(layers: dict[str, LoraLinear], adapter_name: str) -> dict:
    """PEFT's LoraConfig fields for adapter ``adapter_name`` of the LoRA ``layers`` (by qualified name).

    The most common rank and alpha become ``r`` / ``lora_alpha``, the others per-layer patterns keyed by full name
    (PEFT matches those exactly, so it wraps exactly these layers). PEFT has one dropout and one ``use_rslora`` per
    adapter: layers that disagree on them raise ``ValueError`` rather than be saved as something else.
    """
    adapters = {name: layer.adapters[adapter_name] for name, layer in layers.items()}
    for field in ("lora_dropout", "use_rslora"):
        values = {name: getattr(adapter, field) for name, adapter in adapters.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"PEFT's format has one {field} per adapter; the layers of adapter {adapter_name!r} "
                             f"disagree: {values}")
    ranks = {name: adapter.r for name, adapter in adapters.items()}
    alphas = {name: adapter.lora_alpha for name, adapter in adapters.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    first = next(iter(adapters.values()))
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": first.lora_dropout,
        "target_modules": sorted(adapters),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "use_rslora": first.use_rslora, "init_lora_weights": True, **_UNSUPPORTED,
    }


def save_adapter(model: nn.Module, path, adapter_name: str = "default") -> None:
    """Write the LoRA adapter ``adapter_name`` of every LoraLinear in ``model`` to the folder ``path``, so that
    ``peft.PeftModel.from_pretrained(base_model, path)`` loads it."""
    layers = layers_with_adapter(model, adapter_name)
    if not layers:
        raise ValueError(f"model has no LoRA layers with an adapter named {adapter_name!r}")
    config = peft_lora_config(layers, adapter_name)
    tensors = {}
    for name, layer in layers.items():
        adapter = layer.adapters[adapter_name]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = adapter.lora_A.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = adapter.lora_B.detach().contiguous().cpu()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def _read(folder: Path):
    config_path = folder / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"{config_path} does not exist") from None
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{config_path}: peft_type must be 'LORA', got {config.get('peft_type')!r}"
                               if isinstance(config, dict) else f"{config_path}: expected a JSON object")
    unsupported = {key: config[key] for key, default in _UNSUPPORTED.items()
                   if config.get(key, default) not in (default, None, [], {})}
    if unsupported:
        raise AdapterFileError(f"{config_path} uses PEFT features fastpeft does not support: {unsupported}")
    weights = folder / WEIGHTS_NAME
    try:
        if weights.exists():
            tensors = load_file(str(weights))
        elif (folder / PICKLED_WEIGHTS_NAME).exists():
            tensors = torch.load(folder / PICKLED_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        else:
            raise AdapterFileError(f"{folder} has neither {WEIGHTS_NAME} nor {PICKLED_WEIGHTS_NAME}")
    except (SafetensorError, OSError, RuntimeError, EOFError) as err:
        raise AdapterFileError(f"cannot read the adapter weights in {folder}: {err}") from None
    return config, tensors


def load_adapter(model: nn.Module, path, adapter_name: str = "default", backend=None) -> nn.Module:
    """Load a PEFT LoRA adapter (from ``save_pretrained`` or :func:`save_adapter`) into ``model``, in place.

    Each ``nn.Linear`` named in the file becomes a :class:`LoraLinear` (an existing LoraLinear's adapter of that
    name is replaced); other parameters are frozen. Everything is read and checked first: a missing, truncated or
    mismatched file raises :class:`AdapterFileError` with the model unchanged. Returns ``model``.
    """
    config, tensors = _read(Path(path))
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            raise AdapterFileError(f"unexpected key {key!r} in the adapter weights")
        name = key[len(_PREFIX):-len(suffix)]
        pairs.setdefault(name, {})[suffix.split(".")[1]] = tensor
    problems = []
    for name, pair in pairs.items():
        module = modules.get(name)
        base = module.base_layer if isinstance(module, LoraLinear) else module
        if not isinstance(base, nn.Linear):
            problems.append(f"{name}: no nn.Linear of that name in the model")
            continue
        if set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"{name}: needs both lora_A and lora_B, got {sorted(pair)}")
            continue
        a, b = pair["lora_A"], pair["lora_B"]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or r < 1 or a.shape[1] != base.in_features \
                or tuple(b.shape) != (base.out_features, r):
            problems.append(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a LoRA of "
                            f"{base.in_features} -> {base.out_features}")
    if not pairs:
        problems.append("the adapter weights hold no LoRA tensors")
    if problems:
        raise AdapterFileError(f"adapter in {path} does not match the model: " + "; ".join(problems))

    def pattern(patterns: dict, name: str, default):
        for key, value in patterns.items():
            if name == key or name.endswith("." + key):
                return value
        return default

    built = {}
    for name, pair in pairs.items():
        module = modules[name]
        base = module.base_layer if isinstance(module, LoraLinear) else module
        r = pair["lora_A"].shape[0]
        alpha = pattern(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r))
        adapter = _new_adapter(base, r, alpha, config.get("lora_dropout", 0.0), config.get("use_rslora", False),
                               True, True)
        with torch.no_grad():
            adapter.lora_A.copy_(pair["lora_A"])
            adapter.lora_B.copy_(pair["lora_B"])
        built[name] = (module, adapter)
    model.requires_grad_(False)
    for name, (module, adapter) in built.items():
        if isinstance(module, LoraLinear):
            if module.merged:
                module.unmerge()
            layer = module
        else:
            layer = LoraLinear(module, adapter.r, adapter.lora_alpha, adapter_name=adapter_name, backend=backend)
            _set_submodule(model, name, layer)
        layer.adapters[adapter_name] = adapter
        layer.active_adapter = adapter_name
        adapter.requires_grad_(True)
    return model
