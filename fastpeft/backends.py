"""Which backends can run here, and which one runs a given call.

A backend is chosen per call (``backend=`` argument), per module (its ``backend`` attribute, passed on as the
argument) or per process (``FASTPEFT_BACKEND=auto|torch|triton|cuda``). ``auto`` takes the fastest backend that
supports the inputs; a backend asked for by name that cannot run raises :class:`BackendUnavailableError` listing
every reason, never a silent fallback.

- ``torch``: always available; the CPU default.
- ``triton``: fused Triton kernels; the default for CUDA tensors (on the CPU only under ``TRITON_INTERPRET=1``).
- ``cuda``: the compiled extension ``fastpeft._C``, for the shapes it serves (decode: forward only, M <= 16).

For CUDA tensors ``auto`` measures the backends that can run a call, once per shape class, and keeps the fastest
(``fastpeft.auto``: in memory and on disk); ops that give no measurement take the first in ``CUDA_PREFERENCE``.

Each op keeps a backend table (name -> :class:`Backend`: forward, backward, the op's own reasons against a call);
:func:`select_backend` combines it with what all ops share (the machine, the build, the devices and dtypes).
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from . import auto
from .checks import cuda_device_reason, kernel_dtype_reason
from .environment import (
    AUTOTUNE_ENV,
    GEMM_SCHEDULE_ENV,
    GEMM_SCHEDULE_ENV_FORMER,
    env_switch,
    gemm_schedule_env,
    triton_interpreting,
)

BACKENDS = ("torch", "triton", "cuda")
# auto's rule order for CUDA tensors: the first backend with no reason against the call wins where nothing is
# measured (and ties of a measurement).
CUDA_PREFERENCE = ("cuda", "triton", "torch")
ENV_VAR = "FASTPEFT_BACKEND"



class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs on this machine."""


def _no_reasons(*call) -> list[str]:
    return []


@dataclass(frozen=True)
class Backend:
    """One backend of one op, as an entry of the op's backend table (name -> Backend).

    ``forward`` and ``backward`` run the op on this backend (``backward`` None: forward-only, so a call that needs
    gradients is refused). ``reasons(*call)`` says why this backend cannot run a given call, beyond what all ops
    share (the machine, the build, the devices and dtypes: :func:`not_supported_reasons`). ``forward_fake`` gives
    the shapes and dtypes ``forward`` returns, for torch.compile. ``schedules()`` names other entries of the table
    ("triton:epilogue") that run this backend in other ways: ``auto`` measures those instead of this entry.
    """
    forward: Callable
    backward: Callable | None = None
    reasons: Callable[..., list[str]] = _no_reasons
    forward_fake: Callable | None = None
    schedules: Callable[[], tuple[str, ...]] = tuple


def autograd_backend(table: dict[str, Backend], name: str) -> Backend:
    """The entry of a backend that a torch.library op with registered autograd can run (it has a backward)."""
    entry = table.get(name)
    if entry is None or entry.backward is None:
        usable = [n for n, e in table.items() if e.backward is not None and n in BACKENDS]
        raise ValueError(f"backend must be {' or '.join(map(repr, usable))} for the autograd op, got {name!r}")
    return entry


@functools.cache
def _triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'fastpeft[triton]', or a CUDA build of torch)"
    return None


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string: "3.7.1+git12ab" -> (3, 7, 1)."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


@functools.cache
def _interpreter_broken() -> str | None:
    """Why Triton's CPU interpreter cannot run fastpeft's kernels here, if it cannot: Triton 3.6 and older index
    NumPy arrays in ways NumPy 2.3 removed (3.7 and later run them all)."""
    import numpy
    import triton
    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 3):
        return (f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) does not run with NumPy "
                f"{numpy.__version__}: it needs Triton >= 3.7 or NumPy < 2.3")
    return None


def _environment_reasons(name: str) -> list[str]:
    if name == "torch":
        return []
    if name == "cuda":
        from . import cuda_ext
        _, reason = cuda_ext.load()
        reasons = [reason] if reason else []
        if not torch.cuda.is_available():
            reasons.append("no CUDA GPU (torch.cuda.is_available() is False)")
        return reasons
    env_switch(AUTOTUNE_ENV)  # a bad value is refused here, not where the kernels are first imported (mid-measuring)
    reasons = []
    missing = _triton_missing()
    if missing:
        reasons.append(missing)
    if triton_interpreting():  # the interpreter then runs every Triton kernel of the process
        if not missing:
            reasons += filter(None, [_interpreter_broken()])
    elif not torch.cuda.is_available():
        reasons.append("no CUDA GPU (torch.cuda.is_available() is False) and TRITON_INTERPRET is not 1")
    return reasons


def _input_reasons(name: str, tensors: Iterable[torch.Tensor]) -> list[str]:
    if name == "torch":
        return []
    reasons = []
    for t in tensors:
        reasons += filter(None, [kernel_dtype_reason(t.dtype)])
        if name == "cuda":
            reasons += filter(None, [cuda_device_reason(t.device)])
        elif t.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(t.device)
            if major < 8:
                reasons.append(f"CUDA device {t.device} has compute capability {major}.{minor}; the kernels need 8.0+")
        elif t.device.type == "cpu":
            if not triton_interpreting():
                reasons.append("tensors are on the CPU; Triton runs CPU tensors only under TRITON_INTERPRET=1 "
                               "(set before fastpeft's kernels are first imported)")
        else:
            reasons.append(f"device type {t.device.type!r} is not supported")
    return list(dict.fromkeys(reasons))  # one line per distinct reason, in order


def not_supported_reasons(name: str, tensors: Iterable[torch.Tensor] = ()) -> list[str]:
    """Every reason backend ``name`` cannot run ``tensors`` here; empty when it can."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return _environment_reasons(name) + _input_reasons(name, list(tensors))


def backend_status() -> dict[str, list[str]]:
    """For each backend, why it cannot run on this machine at all (an empty list: it can)."""
    return {name: _environment_reasons(name) for name in BACKENDS}


def available_backends() -> list[str]:
    """The backends that can run on this machine (for some inputs)."""
    return [name for name, reasons in backend_status().items() if not reasons]


def check_environment() -> None:
    """Read every setting fastpeft takes from the environment, raising ValueError naming the first bad one. Each is
    also checked where it is used; this checks them all at once (``python -m fastpeft info``)."""
    requested_backend(None)
    triton_interpreting()
    auto.measuring_enabled()
    env_switch(AUTOTUNE_ENV)
    gemm_schedule_env()


def requested_backend(backend: str | None) -> str:
    """The backend name in force: the argument if given, else ``$FASTPEFT_BACKEND``, else ``auto``."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    if not isinstance(backend, str) or backend.strip().lower() not in ("auto",) + BACKENDS:
        raise ValueError(f"{source} must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    return backend.strip().lower()


# Elements of an op's input below which its eager torch path is differentiated by autograd over its own ops rather
# than by its custom backward: there the Python autograd node costs more than the backward's fused work saves
# (measured crossover on a CPU: LoRA at M=32, K=1024).
SMALL_CALL = 32 * 1024

# Decisions for call signatures already checked (an op's key: shapes, dtypes, devices, strides, requires_grad, grad
# mode, scalars, the backend asked for and the settings read from the environment) -> the backend to run. Every
# check runs on the first call of a signature; later calls of it skip them. Bounded: emptied when full.
_decisions: dict = {}
DECISIONS_LIMIT = 4096
MEASURE_SETTINGS_ENV = (GEMM_SCHEDULE_ENV, GEMM_SCHEDULE_ENV_FORMER, auto.MEASURE_ENV)


def settings(backend: str | None, device: torch.device) -> tuple:
    """The environment settings a decision for ``backend`` (None: the environment's) on ``device`` depends on, for
    the signature keys: only those that matter are read (each read costs about a microsecond)."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR)
    if len(auto_preference(device)) == 1:  # nothing for auto to measure (the CPU): the rest cannot matter
        return (requested,)
    return (requested, *(os.environ.get(name) for name in MEASURE_SETTINGS_ENV))


def decision(key):
    """The backend decided for signature ``key`` earlier, or None."""
    return _decisions.get(key)


def remember_decision(key, name: str) -> None:
    if len(_decisions) >= DECISIONS_LIMIT:
        _decisions.clear()
    _decisions[key] = name


def forget_decisions() -> None:
    """Forget every decided signature (the next call of each is checked and decided again)."""
    _decisions.clear()


def refuse_double_backward(op: str, instead: str = "call it under backend='torch' on inputs below "
                                                   "fastpeft.backends.SMALL_CALL elements, or ") -> None:
    """Called first in an op's custom backward: with ``create_graph=True`` its gradients would carry no history of
    their own, so a second derivative would come out silently wrong (or as None); refuse it instead, saying what
    works (``instead``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported by its fused backward; "
                           f"{instead}write the layer with plain torch ops for higher-order gradients")


def auto_preference(device: torch.device) -> tuple[str, ...]:
    """The backends ``auto`` considers for tensors on ``device``, in rule order: on the CPU the torch path only
    (Triton's interpreter is a test tool, never a choice)."""
    return CUDA_PREFERENCE if device.type == "cuda" else ("torch",)


def select_backend(backend: str | None, tensors: list[torch.Tensor], table: dict[str, Backend] | None = None,
                   call: tuple = (), needs_grad: bool = False, measure: Callable[[], tuple] | None = None,
                   remember: Callable[[str], None] | None = None) -> str:
    """Resolve ``backend`` (None → ``$FASTPEFT_BACKEND`` → ``auto``) for a call on ``tensors``.

    With an op's backend ``table``, each entry adds its own reasons against the ``call`` (its arguments), and a
    forward-only entry refuses calls with ``needs_grad``; a backend the table lacks cannot run the op. Every
    backend's reasons are computed once per call. ``measure()``, where given, returns ``(key, run)`` for
    :func:`fastpeft.auto.fastest`: ``auto`` then picks among several runnable backends by measurement.
    ``remember(name)`` is called with the choice when it is final (not a provisional one made while nothing could be
    measured), for the op to keep it for the call's signature.
    """
    computed: dict[str, list[str]] = {}

    def reasons_against(name):
        if name not in computed:
            reasons = not_supported_reasons(name, tensors)
            if table is not None:
                entry = table.get(name)
                if entry is None:
                    reasons.append(f"this op has no {name} backend")
                else:
                    reasons += entry.reasons(*call)
                    if entry.backward is None and needs_grad:
                        reasons.append(f"the {name} backend is forward-only (inference): inputs require grad "
                                       "(use torch.no_grad() or torch.inference_mode())")
            computed[name] = list(dict.fromkeys(reasons))  # one line per distinct reason
        return computed[name]

    def chosen(name, final=True):
        if final and remember is not None:
            remember(name)
        return name

    name = requested_backend(backend)
    if name == "auto":
        preference = auto_preference(tensors[0].device)
        first = next((c for c in preference if not reasons_against(c)), None)
        if first is None:
            return chosen("torch")
        if measure is None:
            return chosen(first)
        candidates = [c for c in preference if not reasons_against(c)]
        if table is not None:  # a backend's schedules share its reasons
            candidates = [v for c in candidates for v in (table[c].schedules() or (c,))]
        if len(candidates) == 1 or not auto.measuring_enabled():  # read only where there is something to measure
            return chosen(first)
        if torch.compiler.is_compiling():  # compiled code cannot trace the measurement or the winners' file
            return chosen(first, final=False)
        key, run = measure()
        return chosen(*auto.fastest(key, candidates, run, tensors))
    reasons = reasons_against(name)
    if reasons:
        raise BackendUnavailableError(f"backend {name!r} cannot run this call:\n  - " + "\n  - ".join(reasons))
    return chosen(name)
