"""The bottom of the package: definitions every layer shares (dtypes, activation codes) and the argument checks used
by the ops, the layers, the CUDA wrapper and the kernels' launchers (the settings read from the environment are
``fastpeft.environment``'s). Each error names the argument and what was expected. Imports nothing from fastpeft."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # the torch path (float64: references)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the Triton and CUDA kernels
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Bottleneck-adapter activations; the codes are what the Triton and CUDA kernels switch on.
ACTIVATIONS = ("relu", "gelu", "silu", "gelu_tanh")
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}

def kernel_dtype_reason(dtype: torch.dtype) -> str | None:
    """Why the kernels cannot take a tensor of ``dtype`` (None when they can)."""
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not one of float16, bfloat16, float32"
    return None


def cuda_device_reason(device: torch.device) -> str | None:
    """Why the compiled CUDA kernels cannot take a tensor on ``device`` (None when they can)."""
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device}"
    return None


def is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def is_finite_number(value) -> bool:
    """A real number (not a bool) that is finite; an integer too large for a float is not. While torch.compile
    traces, a number's value may be symbolic (a float argument that changed between calls), so only its type is
    checked there."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return True
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if torch.compiler.is_compiling():
        return True
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def is_probability(value) -> bool:
    """A dropout probability: a number in [0, 1)."""
    return is_finite_number(value) and 0.0 <= value < 1.0


def check_positive_int(name: str, value) -> None:
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_finite_number(name: str, value) -> None:
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_probability(name: str, value) -> None:
    if not is_probability(value):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def check_training(training) -> None:
    if not isinstance(training, bool):
        kind = type(training)
        raise TypeError(f"training must be a Python bool, got {kind.__module__}.{kind.__qualname__}")


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def check_same_device(named: dict) -> None:
    """All tensors in ``named`` (name -> tensor) on one device."""
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


# Every output buffer a kernel (Triton or CUDA) writes is made here. The tests install a hook that fills each fresh
# buffer with NaN, so an element a kernel fails to write fails them; the library never sets it.
OUTPUT_HOOK = None


def new_output(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if OUTPUT_HOOK is not None:
        OUTPUT_HOOK(out)
    return out
