"""LoRA and (IA)³ adapter files in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow PEFT's ``save_pretrained``: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` for LoRA,
``base_model.model.<module>.ia3_l`` for (IA)³ (the adapter name is not in the key). Read top to bottom: the config
fields and their checks, the adapter folder (replaced whole, atomically), reading and checking a folder, then
``save_adapter`` and ``load_adapter``, whose (IA)³ half is the last section.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import io
import json
import numbers
import os
import re
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .atomic_files import FILE_LOCKS, fsync_dir, locked_folder, write_file_atomically, write_new_file
from .backends import requested_backend
from .checks import is_finite_number, is_positive_int, is_probability
from .layers import Ia3Linear, LoraLinear, _check_adapter_name, _checked_base, _new_adapter, ia3_vector_dtype
from .model import (
    ADAPTER_LAYERS,
    _freeze_all_but_adapters,
    _inside_lora,
    _is_feedforward,
    _replace_modules,
    adapter_layers,
    layers_with_adapter,
    lora_wrap_problem,
    shared_places,
    unwrap_converted,
)
from .nf4 import is_bnb_4bit
from .quantized import QuantizedLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")  # the last: DoRA's, (out_features,)


class AdapterFileError(ValueError):
    """An adapter file is missing, unreadable, corrupted, or does not match the model."""


# ----------------------------------------------------------------------------------------------------------
# Config fields. Every field PEFT's LoraConfig has is one of: checked and honoured; refused when set (it changes
# what the adapter computes and fastpeft does not implement it); or metadata. A field fastpeft does not know
# (from a newer PEFT) is refused when set, since it may change the computation.
# ----------------------------------------------------------------------------------------------------------

def _is_names(v):
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) and t for t in v))


# field: (check, what it must be)
_HONOURED = {
    "peft_type": (lambda v: v == "LORA", "'LORA' or 'IA3'"),  # (an IA3 config is checked by _ia3_config_problems)
    "r": (is_positive_int, "a positive integer"),
    "lora_alpha": (is_finite_number, "a finite number"),
    "lora_dropout": (is_probability, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (_is_names, "null, a regex string or a list of module names"),
    "exclude_modules": (_is_names, "null, a regex string or a list of module names"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(map(is_positive_int, v.values())),
                     "an object of positive integers"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(map(is_finite_number, v.values())),
                      "an object of finite numbers"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a string"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "task_type": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "revision": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "peft_version": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "auto_mapping": (lambda v: v is None or isinstance(v, dict), "null or an object"),
    "layers_pattern": (lambda v: v is None or isinstance(v, (str, list)), "null, a string or a list"),
}
_HONOURED_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
                      "target_modules": None,
                      "exclude_modules": None, "rank_pattern": {}, "alpha_pattern": {}}
# PEFT features that change what a loaded adapter computes, with their "off" value. Training-only and init-only
# settings (loftq_config, eva_config, ...) and layer kinds fastpeft never wraps (megatron_core, qalora_group_size)
# are in _IGNORED instead.
_UNSUPPORTED = {"fan_in_fan_out": False, "lora_bias": False, "bias": "none",
                "modules_to_save": None, "layers_to_transform": None, "use_qalora": False,
                "alora_invocation_tokens": None, "layer_replication": None, "target_parameters": None,
                "trainable_token_indices": None, "megatron_config": None, "use_bdlora": None, "arrow_config": None,
                "kasa_config": None, "ensure_weight_tying": False}
_OFF_WHEN_EMPTY = {"modules_to_save", "layers_to_transform"}  # PEFT treats [] as unset for these
_IGNORED = {"megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
            "velora_config", "monteclora_config", "runtime_config"}
# init_lora_weights values with which PEFT rewrites the base weights when it loads the adapter (PiSSA, OLoRA, LoftQ,
# CorDA): the adapter then only makes sense on that rewritten base.
_BASE_REWRITING_INITS = re.compile(r"pissa(_niter_\d+)?|olora|loftq|corda")


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def _config_problems(config) -> list[str]:
    """Everything wrong with a parsed adapter_config.json, all of it (empty when fastpeft can honour it)."""
    if not isinstance(config, dict):
        return [f"expected a JSON object, got {type(config).__name__}"]
    if "peft_type" not in config:
        return ["it has no peft_type (expected 'LORA' or 'IA3')"]
    if config["peft_type"] == "IA3":
        return _ia3_config_problems(config)
    problems = [f"{field} must be {what}, got {config[field]!r}" for field, (check, what) in _HONOURED.items()
                if field in config and not check(config[field])]
    if not problems:  # the regular expressions, as PEFT will use them
        regexes = [config[f] for f in ("target_modules", "exclude_modules") if isinstance(config.get(f), str)]
        regexes += [rf"(.*\.)?({key})$" for f in ("rank_pattern", "alpha_pattern") for key in config.get(f, {})]
        problems += [f"{regex!r} is not a valid regular expression" for regex in regexes if not _compiles(regex)]
    # A PEFT feature is off only at exactly its default (PEFT turns KaSA on for kasa_config={}, and restricts the
    # layers for layers_to_transform=0); a field fastpeft does not know is accepted only when null or false.
    unsupported = {f: config[f] for f, off in _UNSUPPORTED.items()
                   if f in config and config[f] != off and not (f in _OFF_WHEN_EMPTY and config[f] == [])}
    unknown = {f: v for f, v in config.items()
               if f not in _HONOURED and f not in _UNSUPPORTED and f not in _IGNORED and v not in (None, False)}
    init = config.get("init_lora_weights")
    if isinstance(init, str) and _BASE_REWRITING_INITS.fullmatch(init.lower()):
        unsupported["init_lora_weights"] = init
    if unsupported:
        problems.append(f"it uses PEFT features fastpeft does not implement: {unsupported}")
    if unknown:
        problems.append(f"it sets fields fastpeft does not know (they may change the computation): {unknown}")
    return problems


def _field(config: dict, name: str):
    return config.get(name, _HONOURED_DEFAULTS[name])


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: each key is a regex that must match the whole module name or
    a suffix of it starting after a dot; the first matching key, in the file's order, wins; with none, a key equal
    to the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return patterns.get(name, default)


def _selects(names, name: str) -> bool:
    """PEFT's rule for target_modules / exclude_modules: a string is a regex matched against the whole name, a list
    holds names matched exactly or as a suffix after a dot."""
    if isinstance(names, str):
        return re.fullmatch(names, name) is not None
    return any(name == t or name.endswith("." + t) for t in names)


# ----------------------------------------------------------------------------------------------------------
# The adapter folder is replaced whole. A save builds the new folder beside it (a hidden sibling
# ``.fastpeft-<hash of the name>-<token>``: both files, and links to whatever else the folder holds), then swaps the
# two in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``) and deletes the old one. A save locks the parent
# folder and the folder itself (the kernel drops the locks if the writer dies), so concurrent saves to the folder,
# and to its subfolders (PEFT's layout for more adapters), take turns, and the last one wins whole; each save deletes
# the siblings that killed saves left. ``load_adapter`` opens the folder once and reads both files through that
# handle, so it sees one version even while saves replace the folder. A folder that cannot be swapped (a mount
# point, or one whose parent is not writable) has each file replaced atomically on its own instead.
# ----------------------------------------------------------------------------------------------------------

_READ_ATTEMPTS = 100
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_HIDDEN = ".fastpeft-"


def _staging_prefix(folder: Path) -> str:
    # Fixed length, whatever the folder's name: a name near the filesystem's limit still has room for the token.
    return f"{_HIDDEN}{hashlib.sha1(os.fsencode(folder.name)).hexdigest()[:12]}-"


@functools.cache
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step; False where the system or the filesystem cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree, read-only subfolders included."""
    def writable_and_retry(function, target, _):
        os.chmod(os.path.dirname(target), stat.S_IRWXU)
        function(target)

    if path.is_dir() and not path.is_symlink():
        handler = {"onexc" if sys.version_info >= (3, 12) else "onerror": writable_and_retry}
        try:
            shutil.rmtree(path, **handler)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _build_staging(folder: Path, staging: Path, files: dict[str, bytes]) -> None:
    """The folder's next version in ``staging``: ``files``, and links to (or copies of) every other entry of
    ``folder`` but the old adapter's pickled weights and the hidden folders of unfinished saves."""
    if folder.is_dir():
        for entry in os.scandir(folder):
            if entry.name in files or entry.name == PICKLED_WEIGHTS_NAME or entry.name.startswith(_HIDDEN):
                continue
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), staging / entry.name)
            elif entry.is_dir():
                shutil.copytree(entry.path, staging / entry.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry.path, staging / entry.name)
    for name, data in files.items():
        write_new_file(staging / name, data)  # mode 0o666 less the umask
    if folder.is_dir():
        os.chmod(staging, stat.S_IMODE(folder.stat().st_mode))
    fsync_dir(staging)


def _publish_in_place(folder: Path, files: dict[str, bytes]) -> None:
    """Replace each file atomically on its own (weights first): for folders that cannot be swapped. Temporary files
    are hidden (``_HIDDEN``): loads never see them, and the next save deletes those that killed saves left."""
    with locked_folder(folder):
        for leftover in folder.glob(glob.escape(_HIDDEN) + "*"):
            _remove(leftover)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            write_file_atomically(folder / name, files[name], prefix=_HIDDEN)


def _publish(folder, files: dict[str, bytes]) -> None:
    """Make ``files`` (the two adapter files) the adapter of ``folder`` in one atomic step, keeping its other
    entries."""
    if not FILE_LOCKS:
        raise OSError("save_adapter needs a POSIX system (file locks)")
    folder = Path(os.path.realpath(folder))  # a linked folder: replace the folder it points to
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    for name in files:
        if (folder / name).is_dir():
            raise IsADirectoryError(f"{folder / name} is a folder; the adapter file cannot replace it")
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    if folder.is_dir() and (os.path.ismount(folder) or not os.access(parent, os.W_OK | os.X_OK)):
        return _publish_in_place(folder, files)
    with locked_folder(parent):
        # The folder's own lock holds off saves into its subfolders.
        with locked_folder(folder) if folder.is_dir() else contextlib.nullcontext():
            prefix = _staging_prefix(folder)
            for leftover in parent.glob(glob.escape(prefix) + "*"):
                _remove(leftover)
            staging = parent / f"{prefix}{secrets.token_hex(8)}"
            os.mkdir(staging)
            try:
                _build_staging(folder, staging, files)
            except BaseException as err:
                _remove(staging)
                if isinstance(err, OSError):
                    raise OSError(err.errno, f"cannot save the adapter to {folder}: {err.strerror}",
                                  err.filename) from err
                raise
            try:
                cwd = os.getcwd()
            except FileNotFoundError:
                cwd = None
            try:
                os.rename(staging, folder)  # no folder yet, or an empty one
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    _remove(staging)
                    raise
                if not _exchange(staging, folder):
                    # Without an atomic swap the folder is briefly absent; readers wait for it (_read_version).
                    retired = parent / f"{prefix}{secrets.token_hex(8)}"
                    os.rename(folder, retired)
                    os.rename(staging, folder)
                    staging = retired
                _remove(staging)  # now the old folder
            if cwd is not None and (cwd == str(folder) or cwd.startswith(str(folder) + os.sep)):
                os.chdir(cwd)  # this process worked in the old folder: move it to the same place in the new one
            fsync_dir(parent)


def _read_version(folder: Path) -> dict[str, bytes] | None:
    """The bytes of the folder's adapter files (a name is absent when its file is), all from one version of the
    folder; None when a save replaced the folder while it was being read."""
    try:
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        if folder.parent.is_dir() and any(folder.parent.glob(glob.escape(_staging_prefix(folder)) + "*")):
            time.sleep(0.001)  # perhaps a save without atomic swaps, between its two renames
            return None
        raise AdapterFileError(f"{folder} does not exist") from None
    except NotADirectoryError:
        raise AdapterFileError(f"{folder} is not a folder") from None
    try:
        files = {}
        for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLED_WEIGHTS_NAME):
            if name == PICKLED_WEIGHTS_NAME and WEIGHTS_NAME in files:
                break  # the safetensors file wins, as in PEFT
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=handle)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise AdapterFileError(f"{folder / name} is not a regular file")
            with os.fdopen(fd, "rb") as f:
                files[name] = f.read()
        if CONFIG_NAME not in files or WEIGHTS_NAME not in files:
            # Absent, or deleted with the old folder after a save swapped it out: then read the new one.
            try:
                if not os.path.samestat(os.stat(folder), os.fstat(handle)):
                    return None
            except FileNotFoundError:
                return None
        return files
    except OSError as err:
        raise AdapterFileError(f"cannot read the adapter in {folder}: {err}") from None
    finally:
        os.close(handle)


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The folder's config and tensors, each file read once into memory and parsed from there, and checked."""
    for _ in range(_READ_ATTEMPTS):
        files = _read_version(folder)
        if files is not None:
            break
    else:
        if not folder.exists():  # what a killed first save leaves is not an adapter
            raise AdapterFileError(f"{folder} does not exist")
        raise AdapterFileError(f"{folder}: the adapter was replaced {_READ_ATTEMPTS} times while being read")
    config_path = folder / CONFIG_NAME
    if CONFIG_NAME not in files:
        raise AdapterFileError(f"{config_path} does not exist")
    try:
        config = json.loads(files[CONFIG_NAME])
    except (ValueError, RecursionError) as err:  # bad JSON or bad UTF-8; nesting too deep to parse
        raise AdapterFileError(f"{config_path} is not valid JSON: {type(err).__name__}: {err}") from None
    problems = _config_problems(config)
    if problems:
        raise AdapterFileError(f"{config_path}: " + "; ".join(problems))
    if WEIGHTS_NAME in files:
        weights_path = folder / WEIGHTS_NAME
        try:
            tensors = load_safetensors(files[WEIGHTS_NAME])
        except Exception as err:  # the parser's errors for any malformed bytes
            raise AdapterFileError(f"{weights_path} is not a valid safetensors file: {err}") from None
    elif PICKLED_WEIGHTS_NAME in files:
        weights_path = folder / PICKLED_WEIGHTS_NAME
        try:  # weights_only: tensors and plain containers, never arbitrary objects
            tensors = torch.load(io.BytesIO(files[PICKLED_WEIGHTS_NAME]), map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors of every kind, including refused globals
            raise AdapterFileError(f"{weights_path} cannot be read as a weights-only torch file: "
                                   f"{type(err).__name__}: {err}") from None
    else:
        raise AdapterFileError(f"{folder} has neither {WEIGHTS_NAME} nor {PICKLED_WEIGHTS_NAME}")
    if not isinstance(tensors, dict):
        raise AdapterFileError(f"{weights_path} must hold a mapping of names to tensors, got "
                               f"{type(tensors).__name__}")
    bad = {k: type(v).__name__ for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)}
    if bad:
        raise AdapterFileError(f"{weights_path} must hold a mapping of names to tensors; these entries are not: "
                               f"{dict(list(bad.items())[:5])}")
    not_dense = {k: f"{v.layout}, {v.device}" for k, v in tensors.items()
                 if v.layout != torch.strided or v.is_nested or v.device.type != "cpu"}
    if not_dense:
        raise AdapterFileError(f"{weights_path}: adapter weights must be dense tensors, got {not_dense}")
    not_float = {k: str(v.dtype) for k, v in tensors.items() if not v.dtype.is_floating_point}
    if not_float:
        raise AdapterFileError(f"{weights_path}: adapter weights must be floating point, got {not_float}")
    return config, tensors


# ----------------------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------------------

def _json_number(value):
    """A config number as JSON writes it: numpy scalars, Fractions and the like become int or float."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def peft_lora_config(model: nn.Module, adapter_name: str) -> dict:
    """PEFT's LoraConfig fields for adapter ``adapter_name`` of the LoRA layers of ``model``, such that PEFT wraps
    exactly those layers with exactly their ranks and alphas.

    The most common rank and alpha become ``r`` / ``lora_alpha``, the others per-layer patterns keyed by the escaped
    full name, longest first (PEFT takes the first key matching a name or a dotted suffix of it; where one name ends
    another, both get entries). ``target_modules`` lists the names (PEFT also matches them as suffixes), or is one
    regular expression naming them whole where a listed name ends the name of some other module of the model.
    PEFT has one dropout, one ``use_rslora`` and one ``use_dora`` per adapter: layers that disagree on them raise
    ``ValueError`` rather than be saved as something else.
    """
    layers = layers_with_adapter(model, adapter_name)
    adapters = {name: layer.adapters[adapter_name] for name, layer in layers.items()}
    for field in ("lora_dropout", "use_rslora", "use_dora"):
        values = {name: getattr(adapter, field) for name, adapter in adapters.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"PEFT's format has one {field} per adapter; the layers of adapter {adapter_name!r} "
                             f"disagree: {values}")
    ranks = {name: adapter.r for name, adapter in adapters.items()}
    alphas = {name: _json_number(adapter.lora_alpha) for name, adapter in adapters.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    names = sorted(adapters, key=lambda n: (-len(n), n))
    collide = {x for m in names for n in names if m != n and m.endswith("." + n) for x in (m, n)}
    lora_prefixes = list(adapter_layers(model))  # (their bases are plain layers in the model PEFT loads into)
    others = [n for n, _ in model.named_modules() if n not in adapters
              and not any(n.startswith(prefix + ".") for prefix in lora_prefixes)]
    suffix_clash = any(other.endswith("." + name) for name in adapters for other in others)
    targets = sorted(adapters)
    first = next(iter(adapters.values()))
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": float(first.lora_dropout),
        "target_modules": "|".join(re.escape(n) for n in targets) if suffix_clash else targets,
        "rank_pattern": {re.escape(n): ranks[n] for n in names if ranks[n] != r or n in collide},
        "alpha_pattern": {re.escape(n): alphas[n] for n in names if alphas[n] != alpha or n in collide},
        "use_rslora": bool(first.use_rslora), "use_dora": first.use_dora, "init_lora_weights": True, **_UNSUPPORTED,
    }


def save_adapter(model: nn.Module, path, adapter_name: str = "default") -> None:
    """Write the adapter ``adapter_name`` of ``model`` to the folder ``path`` in PEFT's format, so that
    ``peft.PeftModel.from_pretrained(base_model, path)`` loads it: a LoRA adapter (its LoraLinear layers) as PEFT's
    LORA files, an (IA)³ adapter (its Ia3Linear layers) as PEFT's IA3 files. One name on layers of both kinds is
    refused (PEFT's files hold one tuner type).

    Everything is built and checked in memory first; then both files replace the folder's adapter in one atomic
    step (see docs/files.md: a reader sees the whole old or the whole new adapter, across kills and concurrent saves).
    """
    if isinstance(model, ADAPTER_LAYERS):
        raise ValueError(f"save_adapter needs a model that contains LoRA or (IA)³ layers: PEFT's files name each "
                         f"layer by its path in the model, and a bare {type(model).__name__} has none (put it in a "
                         "module, e.g. nn.Sequential(layer), and load into the same structure)")
    model = unwrap_converted(model)
    kinds: dict[str, list[str]] = {}
    for name, layer in layers_with_adapter(model, adapter_name).items():
        kinds.setdefault("LoRA" if isinstance(layer, LoraLinear) else "(IA)³", []).append(name)
    if len(kinds) > 1:
        raise ValueError(f"adapter {adapter_name!r} is LoRA on {kinds['LoRA']} and (IA)³ on {kinds['(IA)³']}; PEFT's "
                         "files hold one tuner type per adapter: give the two parts different adapter names")
    if "(IA)³" in kinds:
        _publish(path, _ia3_files(model, adapter_name))
        return
    shared = [names for names in shared_places(model, LoraLinear)
              if adapter_name in model.get_submodule(names[0]).adapters]
    if shared:
        raise ValueError(f"the LoRA layers at {shared} are each one module used at several places; PEFT's files name "
                         "one place per layer, and PEFT loading them would put LoRA at that place only")
    layers = layers_with_adapter(model, adapter_name)
    if not layers:
        raise ValueError(f"model has no LoRA layers with an adapter named {adapter_name!r} (nor (IA)³ layers)")
    not_float = {f"{name}.{t}": str(getattr(layer.adapters[adapter_name], t).dtype)
                 for name, layer in layers.items() for t in ("lora_A", "lora_B", "lora_magnitude_vector")
                 if getattr(layer.adapters[adapter_name], t) is not None
                 and not getattr(layer.adapters[adapter_name], t).dtype.is_floating_point}
    if not_float:
        raise ValueError(f"adapter {adapter_name!r} has weights PEFT's files cannot hold (floating point only): "
                         f"{not_float}")
    config = peft_lora_config(model, adapter_name)
    problems = _config_problems(config)
    if problems:
        raise ValueError(f"adapter {adapter_name!r} cannot be saved in PEFT's format: " + "; ".join(problems))
    tensors = {}
    for name, layer in layers.items():
        adapter = layer.adapters[adapter_name]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = adapter.lora_A.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = adapter.lora_B.detach().contiguous().cpu()
        if adapter.use_dora:
            magnitude = adapter.lora_magnitude_vector.detach().contiguous().cpu()
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = magnitude
    files = {CONFIG_NAME: (json.dumps(config, indent=2, allow_nan=False) + "\n").encode(),
             WEIGHTS_NAME: save_safetensors(tensors, metadata={"format": "pt"})}
    _publish(path, files)


def _all_linear(model: nn.Module, config: dict) -> list[str]:
    """PEFT's ``target_modules="all-linear"``: every linear layer but a transformers model's output head (its output
    embeddings, or for sequence classification its ``score`` / ``classifier``)."""
    head = None
    if hasattr(model, "get_output_embeddings") and hasattr(model, "config"):  # a transformers PreTrainedModel
        head = model.get_output_embeddings()
        if head is None and config.get("task_type") == "SEQ_CLS":
            head = next((getattr(model, n) for n in ("score", "classifier") if getattr(model, n, None) is not None),
                        None)
    layers = (nn.Linear, *ADAPTER_LAYERS, QuantizedLinear)
    return [n for n, m in model.named_modules() if isinstance(m, layers) and m is not head]


def _key_problems(config: dict, tensors: dict, model: nn.Module) -> tuple[dict, list[str]]:
    """The LoRA pairs of the file by module name, and every reason the file does not fit ``model``."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            problems.append(f"unexpected key {key!r} (fastpeft reads LoRA A/B weights and DoRA magnitudes only)")
            continue
        pairs.setdefault(key[len(_PREFIX):-len(suffix)], {})[suffix.split(".")[1]] = tensor
    if not pairs and not problems:
        problems.append("the adapter weights hold no LoRA tensors")
    modules = dict(model.named_modules(remove_duplicate=False))  # a module used at two places has both names
    lora_prefixes = [n for n, m in modules.items() if isinstance(m, ADAPTER_LAYERS)]
    named: dict[int, str] = {}  # module -> the first key naming it
    inside = _inside_lora(model)
    targets, excluded = _field(config, "target_modules"), _field(config, "exclude_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model, config)
    for name, pair in pairs.items():
        module = modules.get(name)
        if name == "":
            problem = "a key names no module (saved from a bare layer, not a model)"
        elif any(name.startswith(prefix + ".") for prefix in (*lora_prefixes, *pairs)):
            kind = "an (IA)³" if any(name.startswith(p + ".") and isinstance(modules[p], Ia3Linear)
                                     for p in lora_prefixes) else "a LoRA"
            problem = f"{name}: inside {kind} layer (a LoRA on the base layer of {kind} layer never runs)"
        elif targets is not None and not _selects(targets, name) or excluded is not None and _selects(excluded, name):
            problem = (f"{name}: not selected by the config's target_modules / exclude_modules (PEFT would ignore "
                       "these weights)")
        elif module is None:
            problem = f"{name}: no module of that name in the model"
        elif id(module) in inside:
            problem = (f"{name}: also the base layer at {inside[id(module)]} (a LoRA layer inside a LoRA layer never "
                       "runs)")
        elif named.setdefault(id(module), name) != name:
            problem = (f"{name}: the same module as {named[id(module)]} (one module, used at two places, has one "
                       "adapter)")
        elif isinstance(module, Ia3Linear):
            problem = f"{name}: an (IA)³ layer already (one method per layer)"
        elif not isinstance(module, LoraLinear) and (why := lora_wrap_problem(module)) is not None:
            problem = f"{name}: {why}"
        else:
            problems += _tensor_problems(config, name, pair, module.base_layer if isinstance(module, LoraLinear)
                                         else module)
            continue
        problems.append(problem)
    return pairs, problems


def _tensor_problems(config: dict, name: str, pair: dict[str, torch.Tensor], base: nn.Module) -> list[str]:
    """Why the tensors a file holds for the layer ``name`` (over ``base``) do not fit it; empty when they do."""
    want = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if _field(config, "use_dora") else set())
    if set(pair) != want:
        return [f"{name}: needs {' and '.join(sorted(want))} (use_dora={_field(config, 'use_dora')}), got "
                f"{sorted(pair)}"]
    a, b = pair["lora_A"], pair["lora_B"]
    r = a.shape[0] if a.dim() == 2 else -1
    if a.dim() != 2 or b.dim() != 2 or r < 1 or a.shape[1] != base.in_features \
            or tuple(b.shape) != (base.out_features, r):
        return [f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a LoRA of "
                f"{base.in_features} -> {base.out_features}"]
    problems = []
    want_r = _pattern_value(_field(config, "rank_pattern"), name, _field(config, "r"))
    if r != want_r:
        problems.append(f"{name}: the weights have rank {r}, the config gives it rank {want_r}")
    m = pair.get("lora_magnitude_vector")
    if m is not None and (isinstance(base, QuantizedLinear) or is_bnb_4bit(base)):
        return [*problems, f"{name}: a DoRA adapter over a 4-bit base, which fastpeft does not run (LoRA over it "
                           "does)"]
    if m is not None and tuple(m.shape) != (base.out_features,):
        return [*problems, f"{name}: lora_magnitude_vector {tuple(m.shape)} does not fit out_features="
                           f"{base.out_features}"]
    # Every tensor finite in the dtype the adapter holds it in (fp32, or fp64 on an fp64 base): a value past that
    # dtype's range would load as inf. A magnitude's negative entries are a trained magnitude's right (PEFT writes
    # them).
    dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
    infinite = [key for key, t in sorted(pair.items()) if not torch.isfinite(t.to(dtype)).all()]
    if infinite:
        problems.append(f"{name}: {', '.join(infinite)} {'hold' if len(infinite) > 1 else 'holds'} values that are "
                        f"not finite in the adapter's dtype {str(dtype).removeprefix('torch.')} (NaN, inf, or past "
                        "its range)")
    return problems


def load_adapter(model: nn.Module, path, adapter_name: str = "default", backend=None) -> nn.Module:
    """Load a PEFT LoRA or IA3 adapter (from ``save_pretrained`` or :func:`save_adapter`) into ``model``, in place.

    LoRA: each ``nn.Linear`` named in the file becomes a :class:`LoraLinear` running the loaded adapter; a LoraLinear
    gets it as one more adapter (or has its adapter of that name replaced) and keeps its active adapter, as PEFT's
    ``load_adapter`` and :func:`apply_lora` do (:func:`fastpeft.set_adapter` activates it). IA3: the same with
    :class:`Ia3Linear`, each scaling its input where the config's ``feedforward_modules`` select it, else its output;
    every layer the config selects must have its vector, of the shape its side gives it. Other parameters are
    frozen. ``backend`` (when given) is set on every layer loaded into.
    Every argument, the config, every key, dtype and shape are checked first: anything fastpeft cannot honour
    exactly as PEFT would raises :class:`AdapterFileError` (or ``ValueError`` for a bad argument) with the model
    unchanged. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_adapter_name(adapter_name)
    if backend is not None:
        requested_backend(backend)
    if isinstance(model, nn.Linear):
        raise ValueError("load_adapter loads into a model, in place; a bare nn.Linear cannot become a LoraLinear in "
                         "place (put it in a module, e.g. nn.Sequential(layer))")
    model = unwrap_converted(model)
    config, tensors = _read(Path(path))
    if config["peft_type"] == "IA3":
        return _load_ia3(model, path, config, tensors, adapter_name, backend)
    pairs, problems = _key_problems(config, tensors, model)
    if problems:
        raise AdapterFileError(f"adapter in {path} does not match the model: " + "; ".join(problems))

    elsewhere = sorted(set(layers_with_adapter(model, adapter_name)) - set(pairs))
    if elsewhere:
        raise ValueError(f"the model has an adapter named {adapter_name!r} on layers the file does not hold "
                         f"({', '.join(elsewhere)}); loading would leave a mix of two adapters under one name: "
                         f"delete_adapter(model, {adapter_name!r}) first, or load under another adapter_name")
    built = {}
    for name, pair in pairs.items():
        module = model.get_submodule(name)
        # (a bitsandbytes 4-bit layer: the adapter is built for the NF4Linear that LoraLinear will make of it)
        base = module.base_layer if isinstance(module, LoraLinear) else _checked_base(module)
        alpha = _pattern_value(_field(config, "alpha_pattern"), name, _field(config, "lora_alpha"))
        adapter = _new_adapter(base, pair["lora_A"].shape[0], alpha, _field(config, "lora_dropout"),
                               _field(config, "use_rslora"), True, True)
        with torch.no_grad():
            adapter.lora_A.copy_(pair["lora_A"])
            adapter.lora_B.copy_(pair["lora_B"])
        if "lora_magnitude_vector" in pair:  # DoRA: the file's magnitude, in the adapter's dtype and device
            adapter.lora_magnitude_vector = nn.Parameter(pair["lora_magnitude_vector"].to(adapter.lora_A))
        built[name] = (module, adapter)
    _freeze_all_but_adapters(model)
    new_layers = {}
    for name, (module, adapter) in built.items():
        if isinstance(module, LoraLinear):
            if module.merged_adapter == adapter_name:  # its weights are about to be replaced
                module.unmerge()
            layer = module
            if backend is not None:
                layer.backend = backend
        else:
            layer = new_layers[name] = LoraLinear(module, adapter.r, adapter.lora_alpha, adapter_name=adapter_name,
                                                  backend=backend)
        layer.adapters[adapter_name] = adapter  # a layer that had LoRA keeps its active adapter, as in PEFT
        adapter.requires_grad_(True)
    _replace_modules(model, new_layers)
    return model


# ----------------------------------------------------------------------------------------------------------
# (IA)³: PEFT's IA3 files. One vector per layer, ``base_model.model.<module>.ia3_l``, shaped (out_features, 1) (an
# output scale) or (1, in_features) (an input scale). PEFT decides which layers get a vector from target_modules /
# exclude_modules and which side each scales from feedforward_modules, so a file is checked against both: every layer
# the config selects has its vector, every vector its layer, each of the shape its side gives it.
# ----------------------------------------------------------------------------------------------------------

_IA3_SUFFIX = ".ia3_l"
_NAMES = "null, a regex string or a list of module names"
_IA3_HONOURED = {
    "peft_type": (lambda v: v == "IA3", "'IA3'"),
    "target_modules": (_is_names, _NAMES),
    "exclude_modules": (_is_names, _NAMES),
    "feedforward_modules": (_is_names, _NAMES),
    "init_ia3_weights": (lambda v: isinstance(v, bool), "true or false"),
    **{field: _HONOURED[field] for field in ("inference_mode", "task_type", "base_model_name_or_path", "revision",
                                             "peft_version", "auto_mapping")},
}
# PEFT features that change what the adapter computes, with their "off" value: transformers' Conv1D layers (weights
# stored transposed), and whole modules trained and saved beside the vectors.
_IA3_UNSUPPORTED = {"fan_in_fan_out": False, "modules_to_save": None}
_IA3_FIELDS = ("target_modules", "feedforward_modules")


def _ia3_config_problems(config: dict) -> list[str]:
    """Everything wrong with a parsed IA3 adapter_config.json (empty when fastpeft can honour it)."""
    problems = [f"{field} must be {what}, got {config[field]!r}" for field, (check, what) in _IA3_HONOURED.items()
                if field in config and not check(config[field])]
    if not problems:
        regexes = [config[f] for f in ("target_modules", "exclude_modules", "feedforward_modules")
                   if isinstance(config.get(f), str)]
        problems += [f"{regex!r} is not a valid regular expression" for regex in regexes if not _compiles(regex)]
        targets, feedforward = config.get("target_modules"), config.get("feedforward_modules")
        if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
            problems.append(f"feedforward_modules must be a subset of target_modules (PEFT's IA3Config refuses the "
                            f"config otherwise): {sorted(set(feedforward) - set(targets))} are not targets")
    unsupported = {f: config[f] for f, off in _IA3_UNSUPPORTED.items()
                   if f in config and config[f] != off and not (f == "modules_to_save" and config[f] == [])}
    if unsupported:
        why = (" (fan_in_fan_out: transformers' Conv1D layers, GPT-2 style, whose weights are stored transposed; "
               "fastpeft's (IA)³ layers wrap nn.Linear)" if "fan_in_fan_out" in unsupported else "")
        problems.append(f"it uses PEFT features fastpeft does not implement for (IA)³: {unsupported}{why}")
    unknown = {f: v for f, v in config.items()
               if f not in _IA3_HONOURED and f not in _IA3_UNSUPPORTED and v not in (None, False)}
    if unknown:
        problems.append(f"it sets fields fastpeft does not know for IA3 (they may change the computation): {unknown}")
    return problems


def _model_type(model: nn.Module):
    return getattr(getattr(model, "config", None), "model_type", None)


def _ia3_modules(config: dict, model: nn.Module, field: str):
    """The config's ``target_modules`` / ``feedforward_modules`` as PEFT uses them with ``model``: as given, or for
    null PEFT's own table by the transformers model type; None where it has none (PEFT then refuses the config)."""
    if config.get(field) is not None:
        return config[field]
    try:
        from peft.utils import constants
    except ModuleNotFoundError as err:
        if err.name != "peft":  # peft is there but broken: its own error says what to fix
            raise
        return None
    table = (constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING if field == "target_modules"
             else constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING)
    return list(table[_model_type(model)]) if _model_type(model) in table else None


def _full_names(names: list[str], clash: bool):
    """Module names as a PEFT config lists them: the list itself, or where a listed name would also select some
    other module, one regular expression matching exactly these names whole."""
    return "|".join(re.escape(n) for n in names) if clash else names


def peft_ia3_config(model: nn.Module, adapter_name: str) -> dict:
    """PEFT's IA3Config fields (every one PEFT writes) for the (IA)³ adapter ``adapter_name`` of ``model``, such that
    PEFT wraps exactly its Ia3Linear layers, each scaling the side it scales here.

    ``target_modules`` lists the full names (PEFT also matches them as suffixes after a dot), or is one regular
    expression naming them whole where a listed name ends the name of some other module of the model.
    ``feedforward_modules`` likewise lists the input-scaling layers (PEFT matches each as a plain suffix of a target's
    name, dot or not), or is a regular expression where one of them ends the name of an output-scaling target.
    """
    layers = layers_with_adapter(model, adapter_name)
    targets = sorted(layers)
    prefixes = list(adapter_layers(model))  # (their bases are plain layers in the model PEFT loads into)
    others = [n for n, _ in model.named_modules()
              if n not in layers and not any(n.startswith(prefix + ".") for prefix in prefixes)]
    feedforward = [n for n in targets if layers[n].feedforward]
    outputs = [n for n in targets if not layers[n].feedforward]
    return {
        "peft_type": "IA3", "task_type": None, "auto_mapping": None, "base_model_name_or_path": None,
        "revision": None, "peft_version": None, "inference_mode": True,  # (PEFT fills in its version on load)
        "target_modules": _full_names(targets, any(o.endswith("." + t) for t in targets for o in others)),
        "exclude_modules": None,
        "feedforward_modules": _full_names(feedforward, any(n.endswith(f) for f in feedforward for n in outputs)),
        "init_ia3_weights": True,  # (how a new vector starts: this one is in the file)
        **_IA3_UNSUPPORTED,
    }


def _ia3_files(model: nn.Module, adapter_name: str) -> dict[str, bytes]:
    """The two files of the (IA)³ adapter ``adapter_name`` of ``model`` (every layer holding it is an Ia3Linear)."""
    shared = [names for names in shared_places(model, Ia3Linear)
              if adapter_name in model.get_submodule(names[0]).ia3_l]
    if shared:
        raise ValueError(f"the (IA)³ layers at {shared} are each one module used at several places; PEFT's files name "
                         "one place per layer, and PEFT loading them would put (IA)³ at that place only")
    vectors = {name: layer.ia3_l[adapter_name] for name, layer in layers_with_adapter(model, adapter_name).items()}
    not_float = {name: str(v.dtype) for name, v in vectors.items() if not v.dtype.is_floating_point}
    if not_float:
        raise ValueError(f"adapter {adapter_name!r} has vectors PEFT's files cannot hold (floating point only): "
                         f"{not_float}")
    config = peft_ia3_config(model, adapter_name)
    problems = _ia3_config_problems(config)
    if problems:
        raise ValueError(f"adapter {adapter_name!r} cannot be saved in PEFT's format: " + "; ".join(problems))
    # (copies: safetensors refuses tensors sharing memory, as tied vectors would)
    tensors = {f"{_PREFIX}{name}{_IA3_SUFFIX}": v.detach().cpu().clone() for name, v in vectors.items()}
    return {CONFIG_NAME: (json.dumps(config, indent=2, allow_nan=False) + "\n").encode(),
            WEIGHTS_NAME: save_safetensors(tensors, metadata={"format": "pt"})}


def _is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' Conv1D (GPT-2's linear layers, weights stored (in, out))."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _ia3_key_problems(config: dict, tensors: dict, model: nn.Module) -> tuple[dict, list[str]]:
    """The file's vectors by module name, each as ``(tensor, feedforward)``, and every reason the file does not fit
    ``model``."""
    vectors: dict[str, torch.Tensor] = {}
    problems = []
    for key, tensor in tensors.items():
        if not key.startswith(_PREFIX) or not key.endswith(_IA3_SUFFIX):
            problems.append(f"unexpected key {key!r} (an IA3 file holds (IA)³ vectors only, "
                            f"'{_PREFIX}<module>{_IA3_SUFFIX}')")
            continue
        vectors[key[len(_PREFIX):-len(_IA3_SUFFIX)]] = tensor
    if not vectors and not problems:
        problems.append("the adapter weights hold no (IA)³ vectors")
    targets, feedforward = (_ia3_modules(config, model, field) for field in _IA3_FIELDS)
    for field, value in zip(_IA3_FIELDS, (targets, feedforward), strict=True):
        if value is None:
            kind = f"model type {_model_type(model)!r}" if _model_type(model) else "this model (not a transformers one)"
            problems.append(f"the config's {field} is null: PEFT then takes them from its table by the transformers "
                            f"model type, which has no entry for {kind}; name them in the config")
    if targets is None or feedforward is None:
        return {}, problems
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model, config)
    excluded = config.get("exclude_modules")

    def selected(name):
        return _selects(targets, name) and not (excluded is not None and _selects(excluded, name))

    modules = dict(model.named_modules(remove_duplicate=False))  # a module used at two places has both names
    prefixes = [n for n, m in modules.items() if isinstance(m, ADAPTER_LAYERS)]
    inside = _inside_lora(model)
    named: dict[int, str] = {}  # module -> the first key naming it
    plan = {}
    for name, vector in vectors.items():
        module = modules.get(name)
        if name == "":
            problem = "a key names no module (saved from a bare layer, not a model)"
        elif any(name.startswith(prefix + ".") for prefix in (*prefixes, *vectors)):
            problem = f"{name}: inside an adapter layer (a vector on the base layer of an adapter layer never runs)"
        elif not selected(name):
            problem = (f"{name}: not selected by the config's target_modules / exclude_modules (PEFT would ignore this "
                       "vector)")
        elif module is None:
            problem = f"{name}: no module of that name in the model"
        elif id(module) in inside:
            problem = f"{name}: also the base layer at {inside[id(module)]} (an adapter inside an adapter never runs)"
        elif named.setdefault(id(module), name) != name:
            problem = (f"{name}: the same module as {named[id(module)]} (one module, used at two places, has one "
                       "adapter)")
        elif isinstance(module, LoraLinear):
            problem = f"{name}: a LoRA layer already (one method per layer)"
        elif _is_conv1d(module):
            problem = (f"{name}: a transformers Conv1D (GPT-2 style, weights stored transposed: PEFT's "
                       "fan_in_fan_out), which fastpeft's (IA)³ layers do not wrap")
        elif not isinstance(module, Ia3Linear) and (why := lora_wrap_problem(module)) is not None:
            problem = f"{name}: {why}"
        else:
            plan[name] = (vector, _is_feedforward(name, feedforward))
            problems += _ia3_vector_problems(name, vector, module, plan[name][1])
            continue
        problems.append(problem)
    # PEFT gives every module the config selects a vector; one the file lacks would start afresh there (ones, or
    # random numbers without init_ia3_weights), not as the adapter was saved.
    missing = [n for n, _ in model.named_modules() if n and n not in vectors and selected(n)
               and not any(n.startswith(prefix + ".") for prefix in prefixes)]
    problems += [f"{n}: selected by the config's target_modules, but the file holds no vector for it (PEFT would give "
                 "it a vector of its own making)" for n in missing]
    return plan, problems


def _ia3_vector_problems(name: str, vector: torch.Tensor, module: nn.Module, feedforward: bool) -> list[str]:
    """Why the file's vector for the layer ``name`` (``module``: a plain layer or an Ia3Linear) does not fit it as the
    config's side (``feedforward``: an input scale) gives it; empty when it does."""
    base = module.base_layer if isinstance(module, Ia3Linear) else module
    n_in, n_out = base.in_features, base.out_features
    side = "an input scale (feedforward_modules)" if feedforward else "an output scale"
    if isinstance(module, Ia3Linear) and module.feedforward != feedforward:
        return [f"{name}: the config makes it {side}, but the model's (IA)³ layer there scales its "
                f"{'input' if module.feedforward else 'output'} (feedforward={module.feedforward})"]
    want, flipped = ((1, n_in), (n_out, 1)) if feedforward else ((n_out, 1), (1, n_in))
    if tuple(vector.shape) != want:
        why = ("the other side's shape: the config's feedforward_modules disagree with the vectors"
               if tuple(vector.shape) == flipped else "no vector of this layer")
        return [f"{name}: ia3_l has shape {tuple(vector.shape)}, but as {side} of a {n_in} -> {n_out} layer it needs "
                f"{want} ({why})"]
    # Finite in the dtype the layer holds it in: a value past that dtype's range would load as inf.
    weight = module.base_layer.weight if isinstance(module, Ia3Linear) else _checked_base(module).weight
    autocast = module.autocast_adapter_dtype if isinstance(module, Ia3Linear) else True
    dtype = ia3_vector_dtype(weight.dtype, autocast)
    if not torch.isfinite(vector.to(dtype)).all():
        return [f"{name}: ia3_l holds values that are not finite in the vector's dtype "
                f"{str(dtype).removeprefix('torch.')} (NaN, inf, or past its range)"]
    return []


def _load_ia3(model: nn.Module, path, config: dict, tensors: dict, adapter_name: str, backend) -> nn.Module:
    """:func:`load_adapter` for an IA3 file (``config`` and ``tensors`` read and checked as files already).

    Every vector must fit its layer and the config's ``feedforward_modules`` (an Ia3Linear already there must scale
    the same side), and every layer the config selects must have its vector. A plain ``nn.Linear`` becomes an
    :class:`Ia3Linear` running the loaded vector; an Ia3Linear gets it as one more named vector (or has the vector of
    that name replaced, unmerged first when merged) and keeps its active adapter, as PEFT does. Everything is built
    before the model changes."""
    plan, problems = _ia3_key_problems(config, tensors, model)
    for name in plan:
        module = model.get_submodule(name)
        if isinstance(module, Ia3Linear) and module.merged_adapter == adapter_name \
                and (why := module.unmerge_problem()) is not None:
            problems.append(f"{name}: its adapter {adapter_name!r}, to be replaced, is merged and cannot be unmerged: "
                            f"{why}")
    if problems:
        raise AdapterFileError(f"adapter in {path} does not match the model: " + "; ".join(problems))
    elsewhere = sorted(set(layers_with_adapter(model, adapter_name)) - set(plan))
    if elsewhere:
        raise ValueError(f"the model has an adapter named {adapter_name!r} on layers the file does not hold "
                         f"({', '.join(elsewhere)}); loading would leave a mix of two adapters under one name: "
                         f"delete_adapter(model, {adapter_name!r}) first, or load under another adapter_name")
    new_layers, vectors = {}, {}
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]  # (an Ia3Linear freezes its base when made)
    try:
        for name, (tensor, feedforward) in plan.items():
            module = model.get_submodule(name)
            if isinstance(module, Ia3Linear):
                vector = module._new_vector(True, module.autocast_adapter_dtype)
            else:
                layer = new_layers[name] = Ia3Linear(module, feedforward, adapter_name=adapter_name, backend=backend)
                vector = layer.ia3_l[adapter_name]
            with torch.no_grad():
                vector.copy_(tensor)
            vectors[name] = vector
    except BaseException:
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        raise
    _freeze_all_but_adapters(model)
    for name, vector in vectors.items():
        if name in new_layers:
            continue
        layer = model.get_submodule(name)
        if layer.merged_adapter == adapter_name:  # its vector is about to be replaced
            layer.unmerge()
        layer.ia3_l[adapter_name] = vector  # a layer that had (IA)³ keeps its active adapter, as in PEFT
        if backend is not None:
            layer.backend = backend
    _replace_modules(model, new_layers)
    for vector in vectors.values():
        vector.requires_grad_(True)
    return model
