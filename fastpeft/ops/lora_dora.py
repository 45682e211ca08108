"""DoRA's row norm ‖W + s·BA‖ (per output row), never building the N×K matrix, and its column scale.

W is frozen, so ‖W_i‖² can be kept by a layer; the rest factors: ‖W_i + s B_i A‖² = ‖W_i‖² + 2s·B_i·(A W_iᵀ) +
s²·B_i (A Aᵀ) B_iᵀ, one skinny GEMM W Aᵀ (N×r) and A Aᵀ (r×r). Computed in fp32 (fp64 for fp64 inputs). The Triton
backend forms W + s·BA tile by tile instead (kernels/lora_dora.py: ``dora_norm``): the same single read of W, and no
cancellation. The norms' backends are a table like an op's (``DORA_NORM_BACKENDS``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..backends import Backend, requested_backend, select_backend
from ..quantized import QuantizedWeight
from .lora_checks import check_finite_nonnegative, check_weights

# Norms below this count as this: a zero row of W with B's row zero (they exist in real models) gives a finite output
# and gradients (m / eps · 0), where m / 0 would be NaN.
DORA_EPS = 1e-12
_NORM_CHUNK = 1 << 22  # elements of W converted at a time when W is not in the norm's dtype


def _norm_dtype(weight, lora_A):
    return torch.float64 if torch.float64 in (weight.dtype, lora_A.dtype) else torch.float32


def weight_sq_norm(weight: Tensor) -> Tensor:
    """‖W_i‖² per row of W (N, K), in fp32 (fp64 for fp64 W), converting at most ``_NORM_CHUNK`` elements at a time."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if weight.dtype == dtype:
        return torch.linalg.vector_norm(weight, dim=1).square_()
    rows = max(1, _NORM_CHUNK // max(1, weight.shape[1]))
    return torch.cat([torch.linalg.vector_norm(weight[n0:n0 + rows].to(dtype), dim=1).square_()
                      for n0 in range(0, weight.shape[0], rows)])


def _torch_dora_norm(weight, lora_A, lora_B, scaling, weight_sq=None):
    dtype = _norm_dtype(weight, lora_A)
    a, b = lora_A.to(dtype), lora_B.to(dtype)
    if weight.dtype == dtype:
        wa = torch.mm(weight, a.t())  # (N, r)
    else:  # in row chunks: no full-precision copy of W
        rows = max(1, _NORM_CHUNK // max(1, weight.shape[1]))
        wa = torch.cat([torch.mm(weight[n0:n0 + rows].to(dtype), a.t()) for n0 in range(0, weight.shape[0], rows)])
    if weight_sq is None:
        weight_sq = weight_sq_norm(weight)
    sq = (b * wa).sum(1).mul_(2.0 * scaling).add_(weight_sq.to(dtype))
    sq.add_((torch.mm(b, torch.mm(a, a.t())) * b).sum(1), alpha=scaling * scaling)
    return sq.clamp_min_(0.0).sqrt_()


def _triton_dora_norm(weight, lora_A, lora_B, scaling, weight_sq=None):
    from ..kernels import lora_linear as kernels
    return kernels.dora_norm(weight, lora_A, lora_B, scaling)


# The norms' backends: the Triton kernel and the torch formulation. The cuda backend's decode kernel takes the norms
# as its column scale and has no kernel for them, so its calls compute them the torch way.
DORA_NORM_BACKENDS = {
    "torch": Backend(forward=_torch_dora_norm),
    "triton": Backend(forward=_triton_dora_norm),
}


def dora_norm_on(backend: str, weight, lora_A, lora_B, scaling: float, weight_sq=None) -> Tensor:
    """The row norms as a lora_linear call on table entry ``backend`` ("triton:epilogue" is the triton kernel) computes
    them, inputs checked; compiled graphs compute them the torch way (the kernel is not traced)."""
    name = backend.partition(":")[0]
    if name not in DORA_NORM_BACKENDS or torch.compiler.is_compiling():
        name = "torch"
    return DORA_NORM_BACKENDS[name].forward(weight, lora_A, lora_B, scaling, weight_sq)


def dora_weight_norm(weight, lora_A, lora_B, scaling, *, weight_sq=None, backend=None) -> Tensor:
    """DoRA's row norms ``‖W + scaling · B A‖`` (N,), in fp32 (fp64 for fp64 inputs), detached, without forming the
    (N, K) matrix. ``backend`` as for :func:`lora_linear`: "triton" forms W + s·BA tile by tile in a kernel; the
    others factor the square, ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ, with ``weight_sq`` = ‖W_i‖² (N,) when
    known (W is frozen: :func:`weight_sq_norm` once; the kernel does not need it). Factored, a row's square carries
    an error of about 1e-7·‖W_i‖² in fp32, so a row that the update nearly cancels (‖W_i + s B_i A‖ below ~1e-2
    ‖W_i‖) loses digits there; the kernel's tiles do not cancel."""
    if isinstance(weight, QuantizedWeight):
        raise ValueError(f"weight is a {weight.label}: DoRA over a {weight.base_name} is not supported; "
                         "for the row norms of the dequantised weight, pass weight.dequantize()")
    check_weights(weight, None, lora_A, lora_B, scaling)
    if weight_sq is not None:
        if (not isinstance(weight_sq, Tensor) or tuple(weight_sq.shape) != (weight.shape[0],)
                or weight_sq.device != weight.device or weight_sq.dtype not in (torch.float32, torch.float64)):
            raise ValueError(f"weight_sq must be a float32 or float64 ({weight.shape[0]},) tensor on {weight.device} "
                             f"(‖W_i‖² per row), got {getattr(weight_sq, 'shape', type(weight_sq).__name__)} "
                             f"{getattr(weight_sq, 'dtype', '')}")
        check_finite_nonnegative("weight_sq", weight_sq, "squared row norms of W")
    if requested_backend(backend) == "cuda":
        backend = "torch"
    name = select_backend(backend, [weight, lora_A, lora_B], DORA_NORM_BACKENDS)
    with torch.no_grad():
        return dora_norm_on(name, weight, lora_A, lora_B, float(scaling), weight_sq)


def dora_scale(magnitude: Tensor, weight_norm: Tensor) -> Tensor:
    """DoRA's column scale ``m / max(‖W + s·BA‖, DORA_EPS)`` in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(torch.promote_types(magnitude.dtype, weight_norm.dtype), torch.float32)
    return magnitude.to(dtype) / weight_norm.to(dtype).clamp_min(DORA_EPS)


def magnitude_grad(dm_sum: Tensor, weight_norm: Tensor, dtype: torch.dtype) -> Tensor:
    """dm (in ``dtype``, the magnitude's) from Σ_rows dY ⊙ (x Wᵀ + s·S Bᵀ)."""
    return (dm_sum / weight_norm.to(dm_sum.dtype).clamp_min(DORA_EPS)).to(dtype)
