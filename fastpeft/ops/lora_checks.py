"""The LoRA ops' input checks (lora_linear, its DoRA norms and mixed batches): every problem named with the argument
and what was expected, before any work."""
from __future__ import annotations

import torch

from ..checks import FLOAT_DTYPES, check_finite_number, check_probability, check_same_device
from ..quantized import QuantizedWeight


def check_weights(weight, bias, lora_A, lora_B, scaling):
    named = {"weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    check_float_tensors({k: v for k, v in named.items() if not (k == "weight" and isinstance(v, QuantizedWeight))})
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    n, k = weight.shape
    if k == 0:
        raise ValueError(f"weight {tuple(weight.shape)} has in_features=0; a LoRA layer needs in_features >= 1")
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must have shape (r, in_features={k}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A has rank r={r}; LoRA needs r >= 1")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must have shape (out_features={n}, r={r}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape (out_features={n},), got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}; they must match")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A has dtype {lora_A.dtype} but lora_B has {lora_B.dtype}; they must match")
    check_same_device(named)
    check_finite_number("scaling", scaling)


def check_float_tensors(named):
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}"
                            + (" (a 4-bit weight goes in as a fastpeft.nf4.NF4Weight)" if name == "weight" else ""))


def check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, magnitude=None, weight_norm=None,
                  check_values=True):
    check_float_tensors({"x": x})
    check_weights(weight, bias, lora_A, lora_B, scaling)
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in_features), got a 0-d tensor")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight {tuple(weight.shape)} "
                         f"expects in_features={k}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has {weight.dtype}; they must match")
    check_same_device({"x": x, "weight": weight})
    check_probability("dropout_p", dropout_p)
    check_frozen_base(weight, "lora_linear trains lora_A, lora_B (and bias)")
    if magnitude is not None:
        if isinstance(weight, QuantizedWeight):
            raise ValueError(f"DoRA (magnitude) over a {weight.base_name} ({weight.label}) is not supported: "
                             "dequantise the base (its layer's .dequantized()) or use plain LoRA over it")
        check_magnitude(magnitude, weight, lora_A, check_values)
    if weight_norm is not None:
        if magnitude is None:
            raise ValueError("weight_norm is DoRA's row norm: give it only with magnitude")
        check_float_tensors({"weight_norm": weight_norm})
        if tuple(weight_norm.shape) != (n,):
            raise ValueError(f"weight_norm must have shape (out_features={n},), got {tuple(weight_norm.shape)}")
        check_same_device({"weight": weight, "weight_norm": weight_norm})
        if check_values:
            check_finite_nonnegative("weight_norm", weight_norm, "DoRA's row norms ‖W + s·BA‖")


def check_magnitude(magnitude, weight, lora_A, check_values):
    """DoRA's magnitude: (out_features,), the adapters' dtype; a caller's values finite and >= 0."""
    n = weight.shape[0]
    check_float_tensors({"magnitude": magnitude})
    if tuple(magnitude.shape) != (n,):
        raise ValueError(f"magnitude must have shape (out_features={n},), got {tuple(magnitude.shape)}")
    if magnitude.dtype != lora_A.dtype:
        raise TypeError(f"magnitude has dtype {magnitude.dtype} but the adapters (lora_A, lora_B) have "
                        f"{lora_A.dtype}; they must match")
    check_same_device({"weight": weight, "magnitude": magnitude})
    if check_values:
        check_finite_nonnegative("magnitude", magnitude, "DoRA's magnitudes start as row norms")


def check_finite_nonnegative(name, t, what):
    """Finite and >= 0, where values exist (not while compiling, not on fake or meta tensors)."""
    if t.device.type == "meta" or torch.compiler.is_compiling() or isinstance(t, torch._subclasses.FakeTensor):
        return
    bad = ~torch.isfinite(t) | (t < 0)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite and >= 0 ({what}), got {t[i].item()} at row {i}")


def check_frozen_base(weight, trains: str) -> None:
    """The base weight takes no gradient: ``trains`` says what the op does train."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"weight must be frozen (requires_grad=False): {trains}, never the base weight")


BASE_INDEX = -1  # an adapter index meaning "the base alone"


def check_adapter_index(adapter_index, x) -> None:
    """A mixed batch's adapter_index: an integer tensor of x's leading shape (its values: see below)."""
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index must be an integer tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"adapter_index must be an integer tensor, got {adapter_index.dtype}")
    if tuple(adapter_index.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"adapter_index must have x's leading shape {tuple(x.shape[:-1])} (one adapter per row), got "
                         f"{tuple(adapter_index.shape)}")


def check_adapter_index_values(adapter_index, n) -> None:
    """Every index in [-1, n): an adapter, or -1 for the base alone (reads the values: a device sync)."""
    if adapter_index.numel():
        low, high = int(adapter_index.min()), int(adapter_index.max())
        if low < BASE_INDEX or high >= n:
            raise ValueError(f"adapter_index values must be in [-1, {n - 1}] (-1: the base alone; {n} adapters), got "
                             f"values from {low} to {high}")
