"""How ``auto`` picks among the backends that can run a call on a GPU: by measuring them, once per shape class.

The first call of a shape class (the op's key: dtypes, M's size class, the other sizes, dropout, training or not;
plus the device) runs each candidate backend on the call's own inputs a few times, interleaved, and keeps the one
with the lowest median. The winner is kept in memory and in a small JSON file per device and set of versions (torch,
Triton, fastpeft, the extension), so later processes start with it: runs after the first take the same backend.

- ``FASTPEFT_AUTO_MEASURE=0``: no measuring; ``auto`` takes the first candidate in its rule order. ``1`` (or unset,
  or empty) measures; any other value raises ValueError naming the variable.
- ``FASTPEFT_CACHE_DIR``: the folder of the on-disk cache (default ``$XDG_CACHE_HOME/fastpeft`` or
  ``~/.cache/fastpeft``); set it empty to keep winners in memory only. A relative path is taken from the working
  directory at the time; a relative ``XDG_CACHE_HOME`` is ignored (as the XDG spec says). Where no home folder can
  be found (no ``HOME``, no passwd entry for the uid) a path from ``~`` gives no cache: winners in memory only.

The file is replaced whole (write a temporary file, fsync, rename) under an exclusive lock, merging what other
processes stored meanwhile. A lock held by another process for ``LOCK_WAIT`` seconds (one stopped while it holds it)
is not waited for: the winner is kept in memory only, with one warning per process, and later stores of the process
take the lock only if it is free at once, so a training job never hangs on the cache. The file keeps the newest
``MAX_ENTRIES`` winners. A file that cannot be read or parsed, or is larger than ``MAX_BYTES`` (not read then), is
treated as empty and rewritten, and an entry that names no current candidate is measured again. Nothing is measured
while torch.compile traces, while a CUDA graph captures, under saved-tensor hooks (activation checkpointing), or on
fake tensors: those calls take the rule order, provisionally (the next call outside them measures).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .atomic_files import LockTimeout, locked, write_file_atomically
from .environment import env_switch

MEASURE_ENV = "FASTPEFT_AUTO_MEASURE"
CACHE_DIR_ENV = "FASTPEFT_CACHE_DIR"
FORMAT = 1
ROUNDS = 7  # timed calls per candidate, after one untimed call (compiles, autotuning, allocator warm-up)
# The file's bounds: one entry per shape class and candidate set (about 300 bytes) is a few hundred for a model; a
# store keeps the newest MAX_ENTRIES, and a file past MAX_BYTES (not one fastpeft wrote) is treated as empty unread.
MAX_ENTRIES = 4096
MAX_BYTES = 4 << 20
LOCK_WAIT = 2.0  # seconds a store waits for the cache's lock (a writer holds it for milliseconds)

# key -> winner, for this process; filled from the disk on first use.
_winners: dict[str, str] = {}
_loaded_files: set[Path] = set()
_lock_timed_out = False  # a store of this process gave up on the lock: warned, and later stores do not wait


def size_class(m: int) -> int:
    """M's size class: its next power of two (0 stays 0), so every sequence length of a class shares one choice."""
    return 1 << (m - 1).bit_length() if m > 0 else 0


def measuring_enabled() -> bool:
    """``$FASTPEFT_AUTO_MEASURE``: 1 (or unset) measures, 0 takes the rule order; another value raises ValueError."""
    return env_switch(MEASURE_ENV)


@functools.cache
def _versions() -> dict[str, str]:
    """What a winner depends on besides the device: torch, CUDA, Triton, fastpeft, whether the extension is built,
    and the kernels' own source (an editable install changes them without a new version)."""
    from . import cuda_ext
    versions = {"torch": torch.__version__, "cuda": str(torch.version.cuda),
                "extension": "built" if cuda_ext.load()[0] is not None else "absent"}
    digest = hashlib.sha256()
    package = importlib.util.find_spec("fastpeft.kernels")
    for folder in (package.submodule_search_locations or []) if package is not None else []:
        for path in sorted(Path(folder).glob("*.py")):  # every module of the package, by name
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    versions["kernels"] = digest.hexdigest()[:16]
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "absent"
    from importlib.metadata import PackageNotFoundError, version
    try:
        versions["fastpeft"] = version("fastpeft")
    except PackageNotFoundError:
        versions["fastpeft"] = "source"
    return versions


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


def _cache_folder() -> str | None:
    """The cache's folder, always absolute; None when the disk cache is off or no absolute folder can be had."""
    folder = os.environ.get(CACHE_DIR_ENV)
    if folder is not None:
        if not folder.strip():
            return None
        folder = os.path.expanduser(folder)
        if folder.startswith("~"):  # no home folder to expand it to (no HOME, no passwd entry for the uid)
            return None
        return os.path.abspath(folder)  # a relative path: from the working directory
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative (which the XDG spec says to ignore)
        home = os.path.expanduser("~")
        if not os.path.isabs(home):  # "~" stays "~" without HOME and a passwd entry: never a "./~" folder
            return None
        base = os.path.join(home, ".cache")
    return os.path.join(base, "fastpeft")


def cache_path(device: torch.device) -> Path | None:
    """The on-disk cache file for ``device`` and this set of versions, or None when the disk cache is off."""
    folder = _cache_folder()
    if folder is None:
        return None
    identity = json.dumps({"device": _device_name(device), **_versions()}, sort_keys=True)
    return Path(folder) / f"auto-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"


def _read(path: Path) -> dict[str, str]:
    """The newest ``MAX_ENTRIES`` winners stored in ``path``, oldest first; empty when it is missing, unreadable,
    larger than ``MAX_BYTES`` or not a cache of this format."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_BYTES + 1)
        if len(text) > MAX_BYTES:  # parsing it would cost seconds on every store
            return {}
        data = json.loads(text)
    except (OSError, ValueError, RecursionError):  # RecursionError: nested past what json parses
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("winners"), dict):
        return {}
    winners = [(k, v) for k, v in data["winners"].items() if isinstance(k, str) and isinstance(v, str)]
    return dict(winners[-MAX_ENTRIES:])


def _load(path: Path | None) -> None:
    if path is not None and path not in _loaded_files:
        _loaded_files.add(path)
        for key, winner in _read(path).items():
            _winners.setdefault(key, winner)


def _store(path: Path, key: str, winner: str) -> None:
    """Add one winner to the file: under an exclusive lock, read what is there, merge (the newest ``MAX_ENTRIES``
    kept), replace the file whole. Where the lock is not had within ``LOCK_WAIT`` seconds nothing is stored (the
    caller keeps the winner in memory)."""
    global _lock_timed_out
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    try:
        with locked(lock_path, timeout=0.0 if _lock_timed_out else LOCK_WAIT):
            winners = _read(path)
            winners.pop(key, None)  # stored last: the newest entry, kept longest
            winners[key] = winner
            winners = dict(list(winners.items())[-MAX_ENTRIES:])
            text = json.dumps({"format": FORMAT, "winners": winners}, indent=1)
            write_file_atomically(path, text.encode(), mode=0o600)  # readable by its owner only
    except LockTimeout:
        if not _lock_timed_out:
            _lock_timed_out = True
            warnings.warn(f"fastpeft auto: the cache's lock {lock_path} is held by another process (waited "
                          f"{LOCK_WAIT:g} s): this winner is kept in memory only, and later ones are stored only "
                          "when the lock is free at once", RuntimeWarning, stacklevel=3)


def cuda_timer(fn: Callable[[], None]) -> float:
    """Seconds one call of ``fn`` takes on the current CUDA stream (events around it, waited on)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


def cannot_measure_now(tensors: Sequence[torch.Tensor]) -> bool:
    """True while nothing may be measured: torch.compile tracing, a CUDA graph capturing, fake or meta tensors, or
    saved-tensor hooks in force (activation checkpointing: the measuring calls would run under its hooks)."""
    if torch.compiler.is_compiling():
        return True
    if any(isinstance(t, torch._subclasses.fake_tensor.FakeTensor) or t.device.type == "meta" for t in tensors):
        return True
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def fastest(key: tuple, candidates: Sequence[str], run: Callable[[str], None], tensors: Sequence[torch.Tensor],
            timer: Callable[[Callable[[], None]], float] | None = None) -> tuple[str, bool]:
    """``(backend, final)``: the candidate that runs ``key``'s calls fastest here, stored or measured now with
    ``run(name)`` (one call of the op on backend ``name``) and stored. Winners are kept per set of candidates, so
    one measured among fewer (a schedule fixed by hand, a strided input the cuda kernel cannot take) never stands for
    the full set.

    Where nothing may be measured the answer is a stored winner, else the first candidate in rule order: final
    under saved-tensor hooks (activation checkpointing recomputes the call and must get the same backend again),
    provisional (``final`` False) while a CUDA graph captures or on fake tensors. A candidate that fails while
    measured is left out: the fastest of the others is final for this process but not stored, so a later process
    measures them all again."""
    if len(candidates) == 1:
        return candidates[0], True
    device = tensors[0].device
    fake = any(isinstance(t, torch._subclasses.fake_tensor.FakeTensor) or t.device.type == "meta" for t in tensors)
    full_key = json.dumps([_device_name(device), *map(str, key), list(candidates)])
    path = None if fake else cache_path(device)
    _load(path)
    stored = _winners.get(full_key)
    if stored in candidates:
        return stored, True
    if not measuring_enabled() or cannot_measure_now(tensors):
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        return candidates[0], hooks and not capturing and not fake
    timer = timer or cuda_timer
    runnable = []
    for name in candidates:  # one untimed call each: compiles, autotuning, first allocations
        try:
            run(name)
        except Exception as error:  # a candidate that fails here (out of memory, a compile error) is not chosen
            warnings.warn(f"fastpeft auto: backend {name!r} failed while being measured and is not chosen for "
                          f"this shape class: {type(error).__name__}: {error}", RuntimeWarning, stacklevel=3)
        else:
            runnable.append(name)
    if len(runnable) <= 1:
        return (runnable or candidates)[0], bool(runnable)
    times = {name: [] for name in runnable}
    for _ in range(ROUNDS):  # interleaved rounds, so drift (clocks, other work) hits every candidate alike
        for name in runnable:
            times[name].append(timer(lambda: run(name)))  # noqa: B023  (called at once)
    medians = {name: statistics.median(t) for name, t in times.items()}
    winner = min(runnable, key=lambda name: (medians[name], runnable.index(name)))
    if len(runnable) < len(candidates):  # a failure may pass (memory held elsewhere): not kept beyond this process
        return winner, True
    _winners[full_key] = winner
    if path is not None:
        try:
            _store(path, full_key, winner)
        except OSError:  # a read-only or full disk keeps the winner in memory only
            pass
    return winner, True


def stored_winners() -> dict[str, str]:
    """The winners this process knows (measured or read from the disk), by key."""
    return dict(_winners)


def forget() -> None:
    """Forget the winners held in memory (the on-disk cache is left alone: delete its file to re-measure)."""
    _winners.clear()
    _loaded_files.clear()
