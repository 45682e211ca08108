"""The settings fastpeft reads from the environment, and their readers: each reads its variable where it is used,
and a bad value raises ValueError naming the variable and what it takes (``python -m fastpeft info`` checks them all,
``backends.check_environment``). Imports nothing from fastpeft."""
from __future__ import annotations

import os
import warnings

# How the fused LoRA GEMM adds the low-rank term (kernels/lora_linear.py: ``lora_gemm``). ``auto`` measures each;
# $FASTPEFT_GEMM_SCHEDULE fixes one by hand.
GEMM_SCHEDULES = ("prologue", "epilogue", "cublas", "tma")
GEMM_SCHEDULE_ENV = "FASTPEFT_GEMM_SCHEDULE"
GEMM_SCHEDULE_ENV_FORMER = "FASTPEFT_GEMM_VARIANT"  # its former name, still read
# FASTPEFT_AUTOTUNE=0 launches each Triton kernel's default config instead of autotuning.
AUTOTUNE_ENV = "FASTPEFT_AUTOTUNE"


def env_switch(name: str) -> bool:
    """An on/off setting from the environment: ``1`` (or unset, or empty) is on, ``0`` off. Anything else raises
    ValueError naming the variable: "false", "off" or "disable" are no values of it, rather than read as on."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be one of 1, 0 (or unset); got {value!r}")
    return value != "0"


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter: ``TRITON_INTERPRET`` read as Triton
    reads it (``1``, ``true``, ``on``, ``yes`` or ``y`` in any case, and whatever else the installed Triton takes for
    on), so the two never disagree. Off: unset, empty, ``0``, ``false``, ``off``, ``no`` or ``n`` in any case. Any
    other value, which Triton reads as off (``" yes "``, ``"2"``), raises ValueError naming the variable: on was
    likely meant."""
    value = os.environ.get("TRITON_INTERPRET", "")
    if value in ("", "0", "1"):  # the usual values, read without asking Triton
        return value == "1"
    if _triton_reads_interpret_on(value):
        return True
    if value.lower() in _INTERPRET_OFF:
        return False
    raise ValueError("TRITON_INTERPRET must be one of 1, true, on, yes, y, 0, false, off, no, n (in any case, as "
                     f"Triton reads it); got {value!r}")


_INTERPRET_OFF = ("0", "false", "off", "no", "n")


def _triton_reads_interpret_on(value: str) -> bool:
    try:
        from triton import knobs
    except ImportError:  # no Triton to ask: what every Triton fastpeft supports reads as on
        return value.lower() in ("1", "true", "on", "yes", "y")
    return bool(knobs.runtime.interpret)  # what Triton's launcher reads


def gemm_schedule_env() -> str | None:
    """The fused GEMM's schedule fixed by ``$FASTPEFT_GEMM_SCHEDULE`` (or its former name ``$FASTPEFT_GEMM_VARIANT``;
    in any case), None where both are unset or empty; a value not in ``GEMM_SCHEDULES``, or the two set to different
    schedules, raises ValueError naming the variable."""
    found = {}
    for name in (GEMM_SCHEDULE_ENV, GEMM_SCHEDULE_ENV_FORMER):
        value = os.environ.get(name, "")
        schedule = value.strip().lower()
        if schedule and schedule not in GEMM_SCHEDULES:
            raise ValueError(f"{name} must be one of {', '.join(GEMM_SCHEDULES)}, got {value!r}")
        if schedule:
            found[name] = schedule
    if GEMM_SCHEDULE_ENV_FORMER in found and not _former_name_warned:
        _warn_former_name()
    if len(set(found.values())) > 1:
        raise ValueError(f"{GEMM_SCHEDULE_ENV}={found[GEMM_SCHEDULE_ENV]!r} and its former name "
                         f"{GEMM_SCHEDULE_ENV_FORMER}={found[GEMM_SCHEDULE_ENV_FORMER]!r} disagree: set one")
    return next(iter(found.values()), None)


_former_name_warned = False


def _warn_former_name() -> None:
    global _former_name_warned
    _former_name_warned = True
    warnings.warn(f"{GEMM_SCHEDULE_ENV_FORMER} is the former name of {GEMM_SCHEDULE_ENV}: set {GEMM_SCHEDULE_ENV} "
                  "instead", DeprecationWarning, stacklevel=3)
