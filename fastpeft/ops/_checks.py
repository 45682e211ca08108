"""Argument checks shared by the ops: each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers


def check_same_device(named: dict) -> None:
    """All tensors in ``named`` (name -> tensor) on one device."""
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_finite_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")


def check_op_backend(backend: str) -> None:
    """The torch.library ops run the torch and triton backends; the cuda kernels have ops of their own."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton' for the autograd op, got {backend!r}")
