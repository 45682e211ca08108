"""The fused LoRA linear op: ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

Read top to bottom: the float64-friendly reference, the torch backend, the backend table (torch, triton, and the
forward-only cuda decode kernel), the torch.library ops (forward, backward, registered autograd) that run the table's
autograd backends, input checks, and the public ``lora_linear``. The Triton kernels and launchers live in
``fastpeft.kernels.lora_linear``, the CUDA decode kernel in ``csrc/lora_linear_decode.cu``.
"""
from __future__ import annotations

import functools
import math
import numbers
import threading

import torch
from torch import Tensor

from ..auto import size_class
from ..backends import (
    SMALL_CALL,
    Backend,
    autograd_backend,
    decision,
    refuse_double_backward,
    remember_decision,
    requested_backend,
    select_backend,
    settings,
)
from ..checks import (
    FLOAT_DTYPES,
    GEMM_VARIANTS,
    check_finite_number,
    check_probability,
    check_same_device,
    gemm_variant_env,
)
from ..nf4 import NF4Weight, nf4_matmul, nf4_matmul_t

# ----------------------------------------------------------------------------------------------------------
# Reference: plain differentiable torch ops, the definition every backend is tested against.
# ----------------------------------------------------------------------------------------------------------

def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, keep_mask=None, dropout_p=0.0, magnitude=None):
    """``x Wᵀ + b + scaling · ((x ⊙ keep_mask / (1-p)) Aᵀ) Bᵀ`` with ordinary autograd ops; with ``magnitude`` (DoRA)
    ``(m / ‖W + scaling·BA‖_row) ⊙ (x Wᵀ + scaling · (drop(x) Aᵀ) Bᵀ) + b``, the row norm built from the full matrix
    the plain way and detached (a constant in backward, as in the DoRA paper and HF PEFT).

    keep_mask: None (no dropout) or a bool tensor of x's shape (True = keep). Dropped elements are replaced
    by zero (so a NaN there does not reach the low-rank branch; it still reaches y through x Wᵀ).
    Run it in float64 to get the reference outputs and gradients. An :class:`fastpeft.nf4.NF4Weight` is dequantised
    (to its dtype): the reference of LoRA over a 4-bit base.
    """
    if isinstance(weight, NF4Weight):
        weight = weight.dequantize()
    dropped = x if keep_mask is None else torch.where(keep_mask, x, 0.0) / (1.0 - dropout_p)
    y = x @ weight.t() + scaling * ((dropped @ lora_A.t()) @ lora_B.t())
    if magnitude is not None:
        norm = torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
        y = y * (magnitude / norm.clamp_min(DORA_EPS))
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------------------------
# DoRA's row norm ‖W + s·BA‖ (per output row), never building the N×K matrix. W is frozen, so ‖W_i‖² can be kept by
# a layer; the rest factors: ‖W_i + s B_i A‖² = ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ, one skinny GEMM W Aᵀ
# (N×r) and A Aᵀ (r×r). Computed in fp32 (fp64 for fp64 inputs). The Triton backend forms W + s·BA tile by tile
# instead (kernels/lora_dora.py: ``dora_norm``): the same single read of W, and no cancellation.
# ----------------------------------------------------------------------------------------------------------

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


def dora_weight_norm(weight, lora_A, lora_B, scaling, *, weight_sq=None, backend=None) -> Tensor:
    """DoRA's row norms ``‖W + scaling · B A‖`` (N,), in fp32 (fp64 for fp64 inputs), detached, without forming the
    (N, K) matrix. ``backend`` as for :func:`lora_linear`: "triton" forms W + s·BA tile by tile in a kernel; the
    others factor the square, ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ, with ``weight_sq`` = ‖W_i‖² (N,) when
    known (W is frozen: :func:`weight_sq_norm` once; the kernel does not need it). Factored, a row's square carries
    an error of about 1e-7·‖W_i‖² in fp32, so a row that the update nearly cancels (‖W_i + s B_i A‖ below ~1e-2
    ‖W_i‖) loses digits there; the kernel's tiles do not cancel."""
    if isinstance(weight, NF4Weight):
        raise ValueError("weight is a 4-bit NF4Weight: DoRA over a 4-bit base is not supported; for the row norms "
                         "of the dequantised weight, pass weight.dequantize()")
    _check_weights(weight, None, lora_A, lora_B, scaling)
    if weight_sq is not None:
        if (not isinstance(weight_sq, Tensor) or tuple(weight_sq.shape) != (weight.shape[0],)
                or weight_sq.device != weight.device or weight_sq.dtype not in (torch.float32, torch.float64)):
            raise ValueError(f"weight_sq must be a float32 or float64 ({weight.shape[0]},) tensor on {weight.device} "
                             f"(‖W_i‖² per row), got {getattr(weight_sq, 'shape', type(weight_sq).__name__)} "
                             f"{getattr(weight_sq, 'dtype', '')}")
        _check_values("weight_sq", weight_sq, "squared row norms of W")
    # The norms have a Triton kernel and the torch formulation. The cuda backend's decode kernel takes them as its
    # column scale and has no kernel for them, so its calls compute them the torch way.
    if requested_backend(backend) == "cuda":
        backend = "torch"
    name = select_backend(backend, [weight, lora_A, lora_B], DORA_NORM_BACKENDS)
    with torch.no_grad():
        return _dora_norm_on(name, weight, lora_A, lora_B, float(scaling), weight_sq)


def _dora_norm_on(name, weight, lora_A, lora_B, scaling, weight_sq=None):
    if name.startswith("triton") and not torch.compiler.is_compiling():
        from ..kernels import lora_linear as kernels
        return kernels.dora_norm(weight, lora_A, lora_B, scaling)
    return _torch_dora_norm(weight, lora_A, lora_B, scaling, weight_sq)


# ----------------------------------------------------------------------------------------------------------
# torch backend: the cheapest torch formulation. No M×N temporary: the base GEMM writes y, and the update is
# accumulated into it in place with addmm_. Backward saves x (only if dA is needed), S = drop(x)Aᵀ (M×r) and,
# with dropout, the bool drop-mask (1 byte per element of x) instead of a dropped copy of x. Masks are applied
# with masked_fill: multiplying by a bool tensor would first widen it to a float M×K temporary.
# ----------------------------------------------------------------------------------------------------------

_generators = threading.local()  # per thread and device: one Generator, re-seeded by each call


def _generator(device: torch.device) -> torch.Generator:
    by_device = _generators.__dict__.setdefault("by_device", {})
    if device not in by_device:
        by_device[device] = torch.Generator(device=device)
    return by_device[device]


def torch_drop_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The bool drop-mask (True = dropped) the torch backend draws for ``seed``.

    Each element compares a 16-bit uniform against p, so the drop probability is p rounded to a multiple of
    2⁻¹⁶. Drawing 64 random bits per four elements is about 4× faster on a CPU than ``bernoulli_``,
    whose per-element draw dominated the cost of dropout.
    """
    return torch.lt(torch_uniform16(seed, shape, device), -32768 + round(p * 65536))  # (< adds a Python wrapper)


def torch_uniform16(seed: int, shape, device) -> torch.Tensor:
    """The 16-bit uniforms (int16) behind :func:`torch_drop_mask`: element dropped when below -32768 + p·65536."""
    shape = tuple(shape)
    n = math.prod(shape)
    generator = _generator(torch.device(device))
    generator.manual_seed(seed)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None, generator=generator)
    return bits.view(torch.int16)[:n].view(shape)


def _base_product(x, weight, bias=None):
    """x Wᵀ (+ bias): one GEMM, or over a 4-bit base one per dequantised row chunk (``fastpeft.nf4``)."""
    if isinstance(weight, NF4Weight):
        return nf4_matmul(x, weight, bias)
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _torch_lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale=None, keep_pre=False):
    dtype = x.dtype
    a, b = (lora_A, lora_B) if lora_A.dtype == dtype else (lora_A.to(dtype), lora_B.to(dtype))  # r×K, N×r: small
    drop = None
    if dropout_p > 0.0:
        drop = torch_drop_mask(seed, x.shape, dropout_p, x.device)
        s = torch.mm(x.masked_fill(drop, 0.0), a.t()).mul_(1.0 / (1.0 - dropout_p))  # scale M×r, not M×K
    else:
        s = torch.mm(x, a.t())
    if col_scale is None:
        y = _base_product(x, weight, bias)
        y.addmm_(s, b.t(), alpha=scaling)
        return y, s, drop, None
    # DoRA: the column scale multiplies the base and low-rank terms alike, then the bias is added.
    pre = _base_product(x, weight).addmm_(s, b.t(), alpha=scaling)
    scale = col_scale.to(dtype)
    if not keep_pre:  # scaled in place: no second M×N buffer
        y = pre.mul_(scale) if bias is None else pre.mul_(scale).add_(bias)
        return y, s, drop, None
    y = pre * scale if bias is None else torch.addcmul(bias, pre, scale)
    return y, s, drop, pre


def _torch_lora_bwd(dy, x, weight, lora_A, lora_B, s, drop, scaling, dropout_p,
                    needs_dx, needs_da, needs_db, needs_dbias, col_scale=None, pre=None):
    dtype = dy.dtype
    keep_scale = 1.0 / (1.0 - dropout_p)
    dx = da = db = dbias = dm = None
    if needs_dbias:
        dbias = dy.sum(0)
    if pre is not None:  # DoRA's Σ_rows dY ⊙ (x Wᵀ + s·S Bᵀ), divided by the norm by the caller
        dm = (dy * pre).sum(0, dtype=torch.promote_types(dtype, torch.float32))
    b = lora_B.to(dtype)
    dy_w, w = dy, weight  # dX's base GEMM: dy_w · w
    if col_scale is not None:
        # DoRA: LoRA's backward of dZ = dY ⊙ scale, the scale folded into the smaller operand: B's rows always,
        # W's rows (N×K) rather than dY's columns (M×N) when that is less to multiply.
        scale = col_scale.to(dtype)
        b = b * scale[:, None]
        if needs_dx:
            if weight.shape[1] <= dy.shape[0]:
                w = weight * scale[:, None]
            else:
                dy_w = dy * scale
    ds = torch.mm(dy, b).mul_(scaling)  # M×r
    if needs_db:
        db = torch.mm(dy.t(), s).mul_(scaling)
        if col_scale is not None:
            db.mul_(scale[:, None])
        db = db.to(lora_B.dtype)
    if needs_da:
        if drop is None:
            da = torch.mm(ds.t(), x)
        else:
            da = torch.mm(ds.t(), x.masked_fill(drop, 0.0)).mul_(keep_scale)
        da = da.to(lora_A.dtype)
    if needs_dx:
        a = lora_A.to(dtype)
        if isinstance(w, NF4Weight):  # a 4-bit base: W's row chunks accumulate onto the low-rank term
            low = torch.mm(ds, a) if drop is None else torch.mm(ds * keep_scale, a).masked_fill_(drop, 0.0)
            dx = nf4_matmul_t(dy_w, w, out=low)
        elif drop is None:
            dx = torch.mm(dy_w, w).addmm_(ds, a)
        else:
            # The masked low-rank term is built in dx's own buffer, then the base GEMM accumulates onto it.
            dx = torch.mm(ds * keep_scale, a).masked_fill_(drop, 0.0).addmm_(dy_w, w)
    return dx, da, db, dbias, dm


# ----------------------------------------------------------------------------------------------------------
# The backend table: per backend, why it cannot run a call, its forward and its backward. The ops below, the public
# function and dropout_mask read it; nothing else decides by backend name.
# ----------------------------------------------------------------------------------------------------------

def _torch_forward_fake(x, weight, lora_A, dropout_p, keep_pre=False):
    M, K = x.shape
    return (x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_A.shape[0])),
            x.new_empty((M, K) if dropout_p > 0.0 else (0,), dtype=torch.bool),
            x.new_empty((M, weight.shape[0]) if keep_pre else (0,)))


def _torch_backward(dy, x, weight, lora_A, lora_B, s, drop, seed, scaling, dropout_p, *needs, col_scale=None,
                    pre=None):
    return _torch_lora_bwd(dy, x, weight, lora_A, lora_B, s, drop if dropout_p > 0.0 else None, scaling, dropout_p,
                           *needs, col_scale=col_scale, pre=pre)


def _triton_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale=None, keep_pre=False,
                    variant=None):
    from ..kernels import lora_linear as kernels
    y, s, pre = kernels.lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, variant,
                                 col_scale=col_scale, keep_pre=keep_pre)
    return y, s, None, pre  # the mask is regenerated from the seed in backward, never stored


def _triton_forward_fake(x, weight, lora_A, dropout_p, keep_pre=False):
    M = x.shape[0]
    return (x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_A.shape[0]), dtype=torch.float32),
            x.new_empty((0,), dtype=torch.bool), x.new_empty((M, weight.shape[0]) if keep_pre else (0,)))


def _triton_backward(dy, x, weight, lora_A, lora_B, s, drop, seed, scaling, dropout_p, *needs, col_scale=None,
                     pre=None, variant=None):
    from ..kernels import lora_linear as kernels
    return kernels.lora_bwd(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, int(seed), *needs, variant=variant,
                            col_scale=col_scale, pre=pre)


def _triton_entry(variant=None):
    """The triton backend running the fused GEMM's ``variant`` (None: ``$FASTPEFT_GEMM_VARIANT``'s, else the
    default); the plain entry lists the others for ``auto`` to measure, unless that variable fixes one."""
    return Backend(forward=functools.partial(_triton_forward, variant=variant),
                   backward=functools.partial(_triton_backward, variant=variant), forward_fake=_triton_forward_fake,
                   variants=(lambda: () if gemm_variant_env() else TRITON_VARIANTS)
                   if variant is None
                   else tuple)


def _cuda_reasons(x, weight, bias, lora_A, lora_B, dropout_p):
    from .. import cuda_ext
    reasons = cuda_ext.decode_reasons(x, weight, bias, lora_A, lora_B)
    if dropout_p > 0.0:
        reasons.append("the cuda backend has no dropout (inference): use training=False or dropout_p=0")
    return reasons


def _cuda_forward(x, weight, bias, lora_A, lora_B, scaling, col_scale=None):
    from .. import cuda_ext
    # Eager calls go to the kernel directly: a custom op's dispatch costs about as much as a decode step.
    decode = cuda_ext.lora_linear_decode_op if torch.compiler.is_compiling() else cuda_ext.lora_linear_decode
    return decode(x, weight, bias, lora_A, lora_B, float(scaling), col_scale)


TRITON_VARIANTS = tuple(f"triton:{variant}" for variant in GEMM_VARIANTS)
LORA_LINEAR_BACKENDS = {
    "torch": Backend(forward=_torch_lora_fwd, backward=_torch_backward, forward_fake=_torch_forward_fake),
    "triton": _triton_entry(),
    # Decode (M <= 16 rows), inference only: the compiled kernel has a forward op of its own, no autograd.
    "cuda": Backend(forward=_cuda_forward, reasons=_cuda_reasons),
    # The fused GEMM's variants, for auto to measure (a user picks one with $FASTPEFT_GEMM_VARIANT).
    **{name: _triton_entry(name.partition(":")[2]) for name in TRITON_VARIANTS},
}
# What computes DoRA's norms (dora_weight_norm): each runs on the inputs its lora_linear entry runs on.
DORA_NORM_BACKENDS = {name: LORA_LINEAR_BACKENDS[name] for name in ("torch", "triton")}


# ----------------------------------------------------------------------------------------------------------
# torch.library ops: what autograd and torch.compile see. Each op is opaque to the compiler (the kernels inside
# are ours), has a fake implementation giving its outputs' shapes and dtypes, and forward's autograd is
# registered, so a compiled model keeps fastpeft's kernels with no graph break. Both backends share them.
# ----------------------------------------------------------------------------------------------------------

_SEED_BOUND = 2**31 - 1
# Seeds a caller may pass: every one gives its own mask on every backend. torch's CPU generator (mt19937) keeps
# only the low 32 bits of a seed, so seeds differing by 2**32 would draw the same mask there.
DROPOUT_SEED_LIMIT = 2**32


def _seed_to_use(seed: int, dropout_p: float) -> int:
    """The dropout seed of a call: the caller's, or (negative) one drawn from torch's global generator when there is
    dropout; 0 when there is none."""
    if dropout_p > 0.0 and seed < 0:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("lora_linear with dropout is being captured in a CUDA graph: the seed drawn now would "
                               "be baked into the graph and every replay would drop the same elements. Capture with "
                               "dropout off (training=False or dropout_p=0), or pass dropout_seed= to fix the mask "
                               "knowingly")
        seed = int(torch.randint(0, _SEED_BOUND, ()).item())
    return max(seed, 0)


def dora_scale(magnitude: Tensor, weight_norm: Tensor) -> Tensor:
    """DoRA's column scale ``m / max(‖W + s·BA‖, DORA_EPS)`` in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(torch.promote_types(magnitude.dtype, weight_norm.dtype), torch.float32)
    return magnitude.to(dtype) / weight_norm.to(dtype).clamp_min(DORA_EPS)


def _magnitude_grad(dm_sum: Tensor, weight_norm: Tensor, dtype: torch.dtype) -> Tensor:
    """dm (in ``dtype``, the magnitude's) from Σ_rows dY ⊙ (x Wᵀ + s·S Bᵀ)."""
    return (dm_sum / weight_norm.to(dm_sum.dtype).clamp_min(DORA_EPS)).to(dtype)


@torch.library.custom_op("fastpeft::lora_linear_forward", mutates_args=())
def lora_linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                        scaling: float, dropout_p: float, seed: int, backend: str, magnitude: Tensor | None = None,
                        weight_norm: Tensor | None = None, keep_pre: bool = False
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward on 2-D x (M, K): ``(y, S, drop, seed, pre)``.

    S = drop(x) Aᵀ (M, r; fp32 on triton, x's dtype on torch) and drop (the torch backend's (M, K) bool mask,
    else empty) are what backward needs; seed (0-d int64) is the dropout seed used. A negative ``seed`` draws
    one from torch's global generator here, inside the op, so a compiled graph draws it exactly like eager.
    DoRA: ``magnitude`` (N,) and ``weight_norm`` (N,) scale the columns; ``pre`` is the unscaled x Wᵀ + s·S Bᵀ
    (M, N) when ``keep_pre`` (backward's dm needs it), else empty.
    """
    entry = autograd_backend(LORA_LINEAR_BACKENDS, backend)
    seed = _seed_to_use(seed, dropout_p)
    col_scale = None if magnitude is None else dora_scale(magnitude, weight_norm)
    y, s, drop, pre = entry.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale,
                                    keep_pre and magnitude is not None)
    empty = x.new_empty(0)
    return (y, s, drop if drop is not None else empty.bool(), torch.tensor(seed, dtype=torch.int64),
            pre if pre is not None else empty)


@lora_linear_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, magnitude=None, weight_norm=None,
      keep_pre=False):
    y, s, drop, pre = autograd_backend(LORA_LINEAR_BACKENDS, backend).forward_fake(
        x, weight, lora_A, dropout_p, keep_pre and magnitude is not None)
    return y, s, drop, torch.empty((), dtype=torch.int64), pre


@torch.library.custom_op("fastpeft::lora_linear_backward", mutates_args=())
def lora_linear_backward(dy: Tensor, x: Tensor | None, weight: Tensor, lora_A: Tensor, lora_B: Tensor, s: Tensor,
                         drop: Tensor, seed: Tensor, scaling: float, dropout_p: float, backend: str,
                         needs_dx: bool, needs_da: bool, needs_db: bool, needs_dbias: bool,
                         magnitude: Tensor | None = None, weight_norm: Tensor | None = None, pre: Tensor | None = None,
                         needs_dm: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dA, dB, dbias, dm)`` for 2-D dy (M, N); a gradient not asked for comes back as an empty tensor.

    x is only read (and only needed) for dA; pre (DoRA's, from forward) only for dm. dA, dB, dm are in the adapters'
    dtype, dx and dbias in dy's.
    """
    col_scale = None if magnitude is None else dora_scale(magnitude, weight_norm)
    grads = autograd_backend(LORA_LINEAR_BACKENDS, backend).backward(
        dy, x, weight, lora_A, lora_B, s, drop, seed, scaling, dropout_p, needs_dx, needs_da, needs_db, needs_dbias,
        col_scale=col_scale, pre=pre if needs_dm and magnitude is not None else None)
    dx, da, db, dbias, dm = grads
    if dm is not None:
        dm = _magnitude_grad(dm, weight_norm, magnitude.dtype)
    return tuple(g if g is not None else dy.new_empty(0) for g in (dx, da, db, dbias, dm))


@lora_linear_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, s, drop, seed, scaling, dropout_p, backend,
      needs_dx, needs_da, needs_db, needs_dbias, magnitude=None, weight_norm=None, pre=None, needs_dm=False):
    autograd_backend(LORA_LINEAR_BACKENDS, backend)
    M, N = dy.shape
    return (dy.new_empty((M, lora_A.shape[1]) if needs_dx else (0,)),
            lora_A.new_empty(lora_A.shape) if needs_da else dy.new_empty(0),
            lora_B.new_empty(lora_B.shape) if needs_db else dy.new_empty(0),
            dy.new_empty((N,) if needs_dbias else (0,)),
            magnitude.new_empty((N,)) if needs_dm and magnitude is not None else dy.new_empty(0))


def _setup_context(ctx, inputs, output):
    # (magnitude, weight_norm and keep_pre have defaults: a call may leave them out)
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs[:9]
    magnitude, weight_norm = (tuple(inputs[9:11]) + (None, None))[:2]
    _, s, drop, seed_used, pre = output
    ctx.mark_non_differentiable(s, drop, seed_used, pre)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for S and the mask
    # x is kept only for dA, pre only for dm; W is frozen, so it never gets a gradient.
    ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, weight, lora_A, lora_B, s, drop, seed_used,
                          magnitude, weight_norm, pre if magnitude is not None and _needs_dm(ctx) else None)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend


def _needs_dm(ctx) -> bool:
    return len(ctx.needs_input_grad) > 9 and ctx.needs_input_grad[9]


def _backward(ctx, dy, *unused):
    inputs = len(ctx.needs_input_grad)
    if dy is None:
        return (None,) * inputs
    needs_dx, _, needs_dbias, needs_da, needs_db = ctx.needs_input_grad[:5]
    needs_dm = _needs_dm(ctx)
    x, weight, lora_A, lora_B, s, drop, seed, magnitude, weight_norm, pre = ctx.saved_tensors
    dx, da, db, dbias, dm = lora_linear_backward(dy, x, weight, lora_A, lora_B, s, drop, seed, ctx.scaling,
                                                 ctx.dropout_p, ctx.backend, needs_dx, needs_da, needs_db,
                                                 needs_dbias, magnitude, weight_norm, pre, needs_dm)
    return (dx if needs_dx else None, None, dbias if needs_dbias else None, da if needs_da else None,
            db if needs_db else None, None, None, None, None, dm if needs_dm else None, None, None)[:inputs]


lora_linear_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoraLinear(torch.autograd.Function):
    """What the registered op and its autograd do, for eager calls: the table entry's forward and backward, the same
    tensors saved, without the custom op's dispatch (compiled graphs keep the registered op)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, magnitude, weight_norm):
        entry = LORA_LINEAR_BACKENDS[backend]
        col_scale = None if magnitude is None else dora_scale(magnitude, weight_norm)
        needs_dm = magnitude is not None and ctx.needs_input_grad[9]
        y, s, drop, pre = entry.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, col_scale, needs_dm)
        ctx.nf4_weight = weight if isinstance(weight, NF4Weight) else None  # frozen, and not a tensor
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, None if ctx.nf4_weight else weight, lora_A,
                              lora_B, s, drop, col_scale, weight_norm if needs_dm else None, pre)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
        ctx.magnitude_dtype = None if magnitude is None else magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("lora_linear")
        needs_dx, _, needs_dbias, needs_da, needs_db = ctx.needs_input_grad[:5]
        x, weight, lora_A, lora_B, s, drop, col_scale, weight_norm, pre = ctx.saved_tensors
        weight = ctx.nf4_weight if ctx.nf4_weight is not None else weight
        dx, da, db, dbias, dm = LORA_LINEAR_BACKENDS[ctx.backend].backward(
            dy, x, weight, lora_A, lora_B, s, drop, ctx.seed, ctx.scaling, ctx.dropout_p,
            needs_dx, needs_da, needs_db, needs_dbias, col_scale=col_scale, pre=pre)
        if dm is not None:
            dm = _magnitude_grad(dm, weight_norm, ctx.magnitude_dtype)
        return dx, None, dbias, da, db, None, None, None, None, dm, None


# ----------------------------------------------------------------------------------------------------------
# Input checks: every problem named with the argument and what was expected.
# ----------------------------------------------------------------------------------------------------------

def _check_weights(weight, bias, lora_A, lora_B, scaling):
    named = {"weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    _check_float_tensors({k: v for k, v in named.items() if not (k == "weight" and isinstance(v, NF4Weight))})
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


def _check_float_tensors(named):
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}"
                            + (" (a 4-bit weight goes in as a fastpeft.nf4.NF4Weight)" if name == "weight" else ""))


def _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, magnitude=None, weight_norm=None,
                  check_values=True):
    _check_float_tensors({"x": x})
    _check_weights(weight, bias, lora_A, lora_B, scaling)
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
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must be frozen (requires_grad=False): lora_linear trains lora_A, lora_B "
                         "(and bias), never the base weight")
    if magnitude is not None:
        if isinstance(weight, NF4Weight):
            raise ValueError("DoRA (magnitude) over a 4-bit (NF4) base weight is not supported: dequantise the base "
                             "(NF4Linear.dequantized()) or use plain LoRA over it")
        _check_magnitude(magnitude, weight, lora_A, check_values)
    if weight_norm is not None:
        if magnitude is None:
            raise ValueError("weight_norm is DoRA's row norm: give it only with magnitude")
        _check_float_tensors({"weight_norm": weight_norm})
        if tuple(weight_norm.shape) != (n,):
            raise ValueError(f"weight_norm must have shape (out_features={n},), got {tuple(weight_norm.shape)}")
        check_same_device({"weight": weight, "weight_norm": weight_norm})
        if check_values:
            _check_values("weight_norm", weight_norm, "DoRA's row norms ‖W + s·BA‖")


def _check_magnitude(magnitude, weight, lora_A, check_values):
    """DoRA's magnitude: (out_features,), the adapters' dtype; a caller's values finite and >= 0."""
    n = weight.shape[0]
    _check_float_tensors({"magnitude": magnitude})
    if tuple(magnitude.shape) != (n,):
        raise ValueError(f"magnitude must have shape (out_features={n},), got {tuple(magnitude.shape)}")
    if magnitude.dtype != lora_A.dtype:
        raise TypeError(f"magnitude has dtype {magnitude.dtype} but the adapters (lora_A, lora_B) have "
                        f"{lora_A.dtype}; they must match")
    check_same_device({"weight": weight, "magnitude": magnitude})
    if check_values:
        _check_values("magnitude", magnitude, "DoRA's magnitudes start as row norms")


def _check_values(name, t, what):
    """Finite and >= 0, where values exist (not while compiling, not on fake or meta tensors)."""
    if t.device.type == "meta" or torch.compiler.is_compiling() or isinstance(t, torch._subclasses.FakeTensor):
        return
    bad = ~torch.isfinite(t) | (t < 0)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite and >= 0 ({what}), got {t[i].item()} at row {i}")


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------

def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, backend=None, *,
                dropout_seed=None, magnitude=None, weight_norm=None, _trained_magnitude=False):
    """``x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``, fused; with ``magnitude``, DoRA.

    Args:
        x: (..., K) input, any leading dims and strides; float16/bfloat16/float32 (float64 on the torch backend).
        weight: (N, K) frozen base weight, x's dtype. bias: (N,) in x's dtype, or None; trained if it requires grad.
        lora_A: (r, K), lora_B: (N, r), r >= 1; any float dtype (fp32 adapters on a bf16 base are fine),
            both the same. Gradients are returned in their dtype.
        scaling: the LoRA scale, alpha/r (or alpha/sqrt(r) for rsLoRA).
        dropout_p: dropout on the input of the low-rank branch, applied only when ``training``.
        backend: "auto", "torch", "triton" or "cuda" (the compiled decode kernel: M <= 16 rows, inference
            only); None reads ``$FASTPEFT_BACKEND`` (default auto).
        dropout_seed: fixes the dropout mask (see :func:`dropout_mask`); None draws a seed from torch's
            global generator, so ``torch.manual_seed`` makes runs repeatable.
        magnitude: DoRA's magnitude vector m (N,) in the adapters' dtype (PEFT's ``lora_magnitude_vector``); its
            values (and weight_norm's) must be finite and >= 0 when a caller passes them (a layer's trained
            magnitude may cross zero, as in PEFT):
            ``y = (m / ‖W + scaling·BA‖_row) ⊙ (x Wᵀ + scaling · drop(x) Aᵀ Bᵀ) + b``, the norm a constant in
            backward (detached, as in the DoRA paper and PEFT). Differentiable in m.
        weight_norm: DoRA's row norms ‖W + scaling·BA‖ (N,) when already known (:func:`dora_weight_norm`; a layer
            keeps them in eval mode); None computes them, without forming the (N, K) matrix. Treated as a constant.

    Returns (..., N) in x's dtype. Differentiable in x, lora_A, lora_B, bias and magnitude. Under ``torch.autocast``
    x, weight and bias run in the autocast dtype (as ``nn.Linear`` would), the adapters in their own.

    QLoRA: ``weight`` may be a 4-bit base, a :class:`fastpeft.nf4.NF4Weight` computing in x's dtype (its ``dtype``).
    The triton backend dequantises W's tiles inside the fused GEMMs (forward and dX); the torch backend one row chunk
    (``fastpeft.nf4.NF4_CHUNK`` elements) at a time; the cuda decode kernel reads the packed codes. Nothing of W's
    size is kept for backward. Not with DoRA. Under ``torch.compile`` such a call runs outside the graph (eagerly).
    """
    if isinstance(weight, NF4Weight) and torch.compiler.is_compiling():
        return _lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend,
                                  dropout_seed=dropout_seed, magnitude=magnitude, weight_norm=weight_norm,
                                  _trained_magnitude=_trained_magnitude)
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        weight = weight.with_dtype(dtype) if isinstance(weight, NF4Weight) else weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, numbers.Integral)
                                     or not 0 <= dropout_seed < DROPOUT_SEED_LIMIT):
        raise ValueError(f"dropout_seed must be None or an integer in [0, 2**32), got {dropout_seed!r} (the torch "
                         "backend's generator takes 32 bits of seed, so larger seeds would repeat masks)")
    if not isinstance(training, bool):
        kind = type(training)
        raise TypeError(f"training must be a Python bool, got {kind.__module__}.{kind.__qualname__}")
    backend = requested_backend(backend)  # the environment read once: the signature and the choice agree
    p = dropout_p if training else 0.0
    # Compiled code decides every trace anew: a guard on the decisions would recompile whenever one is added.
    key = None if torch.compiler.is_compiling() else _signature(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                                                training, backend, magnitude, weight_norm,
                                                                _trained_magnitude)
    name = decision(key) if key is not None else None
    if name is None:  # first call of this signature: every check, then (below) the backend
        _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, magnitude, weight_norm,
                      check_values=not _trained_magnitude)
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                              or (bias is not None and bias.requires_grad)
                                              or (magnitude is not None and magnitude.requires_grad))
    if name is None:
        tensors = [x, weight, lora_A, lora_B] + [t for t in (bias, magnitude, weight_norm) if t is not None]
        name = select_backend(backend, tensors, LORA_LINEAR_BACKENDS, (x2d, weight, bias, lora_A, lora_B, float(p)),
                              needs_grad, lambda: _measurement(x2d, weight, bias, lora_A, lora_B, scaling, float(p),
                                                               needs_grad, magnitude, weight_norm),
                              None if key is None else lambda chosen: remember_decision(key, chosen))
    if magnitude is not None:
        weight_norm = (_dora_norm_on(name, weight, lora_A.detach(), lora_B.detach(), float(scaling))
                       if weight_norm is None else weight_norm.detach())
    seed = -1 if dropout_seed is None else int(dropout_seed)
    y = _run_on(name, x2d, weight, bias, lora_A, lora_B, float(scaling), float(p), seed, needs_grad, magnitude,
                weight_norm)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


# A call over a 4-bit base under torch.compile: a graph break, then the eager op (the NF4 weight is no tensor).
_lora_linear_eager = torch.compiler.disable(lambda *args, **kwargs: lora_linear(*args, **kwargs))


def _tensor_key(t):
    return None if t is None else (t.shape, t.dtype, t.device, t.requires_grad)


def _signature(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend, magnitude, weight_norm,
               trained_magnitude):
    """What every check and the backend decision of a call depend on, hashable; None when the inputs are not even
    tensors (the full checks then say what is wrong). A magnitude's values are checked on a signature's first call."""
    try:
        key = (x.shape, x.dtype, x.device, x.requires_grad,
               type(weight), weight.shape, weight.dtype, weight.device, weight.requires_grad,
               _tensor_key(bias), _tensor_key(magnitude), _tensor_key(weight_norm), trained_magnitude,
               lora_A.shape, lora_A.dtype, lora_A.device, lora_A.requires_grad,
               lora_B.shape, lora_B.dtype, lora_B.device, lora_B.requires_grad,
               type(scaling), scaling, type(dropout_p), dropout_p, training, torch.is_grad_enabled(),
               settings(backend, x.device))
        if x.is_cuda:  # layouts matter only to the CUDA kernels' reasons
            key += (x.stride(), weight.is_contiguous(), bias is None or bias.is_contiguous(),
                    lora_A.is_contiguous(), lora_B.is_contiguous())
        return key
    except (AttributeError, TypeError):
        return None


def _run_on(name, x2d, weight, bias, lora_A, lora_B, scaling, p, seed, needs_grad, magnitude=None, weight_norm=None):
    """The op on 2-D x on the table's entry ``name``, inputs checked (DoRA: ``weight_norm`` given with
    ``magnitude``). Compiled graphs go through the registered op; eager calls straight to the entry's forward (no
    gradient needed) or through :class:`_EagerLoraLinear`, the same forward and backward without the custom op's
    dispatch, which cost more than a small layer's arithmetic; small calls on the torch path without dropout run its
    ops under autograd, compiled or not."""
    entry = LORA_LINEAR_BACKENDS[name]
    if entry.backward is None:  # a forward-only kernel: no autograd op around it
        col_scale = None if magnitude is None else dora_scale(magnitude, weight_norm)
        return entry.forward(x2d, weight, bias, lora_A, lora_B, scaling, col_scale)
    if name == "torch" and p == 0.0 and x2d.numel() < SMALL_CALL and not isinstance(weight, NF4Weight):
        # A small call without dropout, eager or compiled alike: autograd over the torch path's own ops saves what
        # its custom backward would (x for dA, S for dB) and costs less than any Python autograd node; larger calls
        # gain more (about 3%) from the custom backward's fused dX than the node costs.
        col_scale = None if magnitude is None else dora_scale(magnitude, weight_norm)  # differentiable in m
        return entry.forward(x2d, weight, bias, lora_A, lora_B, scaling, 0.0, 0, col_scale, magnitude is not None)[0]
    if torch.compiler.is_compiling() and not isinstance(weight, NF4Weight):
        keep_pre = magnitude is not None and magnitude.requires_grad and torch.is_grad_enabled()
        return lora_linear_forward(x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed, name, magnitude,
                                   weight_norm, keep_pre)[0]
    seed = _seed_to_use(seed, p)
    if not needs_grad:
        col_scale = None if magnitude is None else dora_scale(magnitude, weight_norm)
        return entry.forward(x2d, weight, bias, lora_A, lora_B, scaling, p, seed, col_scale)[0]
    return _EagerLoraLinear.apply(x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed, name, magnitude,
                                  weight_norm)


def _measurement(x2d, weight, bias, lora_A, lora_B, scaling, p, needs_grad, magnitude=None, weight_norm=None):
    """(key, run) for ``auto``'s measurement of this call: the shape class, and one call on a given backend (forward,
    and backward when training) on the same inputs, detached, with a fixed dropout seed so that measuring draws
    nothing from torch's generator. DoRA's norm is measured with the op when the call has none."""
    (M, K), (N, r) = x2d.shape, lora_B.shape
    key = ("lora_linear", x2d.dtype, lora_A.dtype, size_class(M), K, N, r, bias is not None, p > 0.0, needs_grad)
    if isinstance(weight, NF4Weight):
        key += ("nf4",)
    if magnitude is not None:
        key += ("dora", weight_norm is None)
    inputs = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t
              for t in (x2d, weight, bias, lora_A, lora_B, magnitude)]

    def run(name):
        with torch.enable_grad() if needs_grad else torch.no_grad():
            norm = weight_norm
            if magnitude is not None and norm is None:
                norm = _dora_norm_on(name, *inputs[1:2], *(t.detach() for t in inputs[3:5]), scaling)
            y = _run_on(name, *inputs[:5], scaling, p, 0, needs_grad, inputs[5], norm)
            if needs_grad:
                y.backward(torch.ones_like(y))
    return key, run


def dropout_mask(seed: int, shape, p: float, backend: str = "torch", device="cpu") -> torch.Tensor:
    """The bool keep-mask (True = keep) that ``backend`` applies to a 2-D (M, K) input for ``dropout_seed=seed``.

    Backends draw differently (torch: its Generator; triton: in-kernel Philox at offset m·K + k), so a
    seed reproduces a mask within one backend. ``seed`` is an integer in [0, 2**32).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < DROPOUT_SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2
            and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise ValueError(f"shape must be (M, K), two positive integers, got {shape!r}")
    check_probability("p", p)
    if backend not in _KEEP_MASKS:
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    device = torch.device(device)
    select_backend(backend, [torch.empty(0, device=device)], LORA_LINEAR_BACKENDS)  # one that cannot run says why
    return _KEEP_MASKS[backend](seed, tuple(int(n) for n in shape), float(p), device)


def _triton_keep_mask(seed, shape, p, device):
    from ..kernels import lora_linear as kernels
    return kernels.dropout_keep_mask(seed, shape, p, device)


# The dropout masks of the backends that draw them (in forward, and again in backward on triton).
_KEEP_MASKS = {"torch": lambda seed, shape, p, device: ~torch_drop_mask(seed, shape, p, device),
               "triton": _triton_keep_mask}
