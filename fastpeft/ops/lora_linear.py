"""The fused LoRA linear op: ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``; with a magnitude, DoRA.

Read top to bottom: the float64-friendly reference, the torch backend, the backend table (torch, triton and its GEMM
schedules, and the forward-only cuda decode kernel), the torch.library ops (forward, backward, registered autograd)
and the eager autograd Function, then the op's declaration for the call frame (``frame.FusedOp``) and the public
``lora_linear``. Beside it: ``lora_checks`` (input checks), ``lora_dora`` (DoRA's norms and scale) and
``lora_dropout`` (the torch path's masks, the seeds). The Triton kernels live in ``fastpeft.kernels.lora_linear``,
the CUDA decode kernel in ``csrc/lora_linear_decode.cu``.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from ..auto import size_class
from ..backends import SMALL_CALL, Backend, autograd_backend, refuse_double_backward
from ..checks import check_training
from ..environment import GEMM_SCHEDULES, gemm_schedule_env
from ..quantized import QuantizedWeight
from .frame import FusedOp, autocast_cast, unkeyed
from .lora_checks import check_inputs
from .lora_dora import DORA_EPS, dora_norm_on, dora_scale, dora_weight_norm, magnitude_grad, weight_sq_norm
from .lora_dropout import DROPOUT_SEED_LIMIT, check_dropout_seed, dropout_mask, seed_to_use, torch_drop_mask

# (the op's DoRA norms and dropout masks, for callers of this module)
__all__ = ["DORA_EPS", "DROPOUT_SEED_LIMIT", "LORA_LINEAR_BACKENDS", "dora_weight_norm", "dropout_mask",
           "lora_linear", "lora_linear_backward", "lora_linear_forward", "lora_linear_reference", "weight_sq_norm"]

# ----------------------------------------------------------------------------------------------------------
# Reference: plain differentiable torch ops, the definition every backend is tested against.
# ----------------------------------------------------------------------------------------------------------

def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, keep_mask=None, dropout_p=0.0, magnitude=None):
    """``x Wᵀ + b + scaling · ((x ⊙ keep_mask / (1-p)) Aᵀ) Bᵀ`` with ordinary autograd ops; with ``magnitude`` (DoRA)
    ``(m / ‖W + scaling·BA‖_row) ⊙ (x Wᵀ + scaling · (drop(x) Aᵀ) Bᵀ) + b``, the row norm built from the full matrix
    the plain way and detached (a constant in backward, as in the DoRA paper and HF PEFT).

    keep_mask: None (no dropout) or a bool tensor of x's shape (True = keep). Dropped elements are replaced
    by zero (so a NaN there does not reach the low-rank branch; it still reaches y through x Wᵀ).
    Run it in float64 to get the reference outputs and gradients. A quantised weight (an
    :class:`fastpeft.nf4.NF4Weight`) is dequantised (to its dtype): the reference of LoRA over a 4-bit base.
    """
    if isinstance(weight, QuantizedWeight):
        weight = weight.dequantize()
    dropped = x if keep_mask is None else torch.where(keep_mask, x, 0.0) / (1.0 - dropout_p)
    y = x @ weight.t() + scaling * ((dropped @ lora_A.t()) @ lora_B.t())
    if magnitude is not None:
        norm = torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
        y = y * (magnitude / norm.clamp_min(DORA_EPS))
    return y if bias is None else y + bias

# ----------------------------------------------------------------------------------------------------------
# torch backend: the cheapest torch formulation. No M×N temporary: the base GEMM writes y, and the update is
# accumulated into it in place with addmm_. Backward saves x (only if dA is needed), S = drop(x)Aᵀ (M×r) and,
# with dropout, the bool drop-mask (1 byte per element of x) instead of a dropped copy of x. Masks are applied
# with masked_fill: multiplying by a bool tensor would first widen it to a float M×K temporary.
# ----------------------------------------------------------------------------------------------------------

def _base_product(x, weight, bias=None):
    """x Wᵀ (+ bias): one GEMM, or over a quantised base the format's own (NF4: one per dequantised row chunk)."""
    if isinstance(weight, QuantizedWeight):
        return weight.matmul(x, bias)
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
        if isinstance(w, QuantizedWeight):  # a quantised base accumulates its product onto the low-rank term
            low = torch.mm(ds, a) if drop is None else torch.mm(ds * keep_scale, a).masked_fill_(drop, 0.0)
            dx = w.matmul_t(dy_w, out=low)
        elif drop is None:
            dx = torch.mm(dy_w, w).addmm_(ds, a)
        else:
            # The masked low-rank term is built in dx's own buffer, then the base GEMM accumulates onto it.
            dx = torch.mm(ds * keep_scale, a).masked_fill_(drop, 0.0).addmm_(dy_w, w)
    return dx, da, db, dbias, dm


# ----------------------------------------------------------------------------------------------------------
# The backend table: per backend, why it cannot run a call, its forward and its backward. Every entry's forward takes
# the same arguments and returns (y, S, drop, pre); backends.select_backend chooses among them.
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
                    schedule=None):
    from ..kernels import lora_linear as kernels
    y, s, pre = kernels.lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, schedule,
                                 col_scale=col_scale, keep_pre=keep_pre)
    return y, s, None, pre  # the mask is regenerated from the seed in backward, never stored


def _triton_forward_fake(x, weight, lora_A, dropout_p, keep_pre=False):
    M = x.shape[0]
    return (x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_A.shape[0]), dtype=torch.float32),
            x.new_empty((0,), dtype=torch.bool), x.new_empty((M, weight.shape[0]) if keep_pre else (0,)))


def _triton_backward(dy, x, weight, lora_A, lora_B, s, drop, seed, scaling, dropout_p, *needs, col_scale=None,
                     pre=None, schedule=None):
    from ..kernels import lora_linear as kernels
    return kernels.lora_bwd(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, int(seed), *needs, schedule=schedule,
                            col_scale=col_scale, pre=pre)


def _format_reasons(backend: str, weight) -> list[str]:
    """A quantised base whose format has no kernel of ``backend`` (its ``kernels``) runs on the others."""
    if isinstance(weight, QuantizedWeight) and backend not in weight.kernels:
        return [f"the {backend} backend has no kernel for a {weight.label} base (its format's kernels: "
                f"{', '.join(sorted(weight.kernels)) or 'none'}; the torch backend runs any)"]
    return []


def _triton_reasons(x, weight, bias, lora_A, lora_B, dropout_p):
    return _format_reasons("triton", weight)


def _triton_entry(schedule=None):
    """The triton backend running the fused GEMM's ``schedule`` (None: ``$FASTPEFT_GEMM_SCHEDULE``'s, else the
    default); the plain entry lists the others for ``auto`` to measure, unless that variable fixes one."""
    return Backend(forward=functools.partial(_triton_forward, schedule=schedule),
                   backward=functools.partial(_triton_backward, schedule=schedule), forward_fake=_triton_forward_fake,
                   reasons=_triton_reasons,
                   schedules=(lambda: () if gemm_schedule_env() else TRITON_SCHEDULES)
                   if schedule is None
                   else tuple)


def _cuda_reasons(x, weight, bias, lora_A, lora_B, dropout_p):
    from .. import cuda_ext
    reasons = _format_reasons("cuda", weight)
    if reasons:
        return reasons
    reasons = cuda_ext.decode_reasons(x, weight, bias, lora_A, lora_B)
    if dropout_p > 0.0:
        reasons.append("the cuda backend has no dropout (inference): use training=False or dropout_p=0")
    return reasons


def _cuda_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, col_scale=None, keep_pre=False):
    from .. import cuda_ext
    # Eager calls go to the kernel directly: a custom op's dispatch costs about as much as a decode step. (No
    # dropout: its reasons refuse it.)
    decode = cuda_ext.lora_linear_decode_op if torch.compiler.is_compiling() else cuda_ext.lora_linear_decode
    return decode(x, weight, bias, lora_A, lora_B, float(scaling), col_scale), None, None, None


TRITON_SCHEDULES = tuple(f"triton:{schedule}" for schedule in GEMM_SCHEDULES)
LORA_LINEAR_BACKENDS = {
    "torch": Backend(forward=_torch_lora_fwd, backward=_torch_backward, forward_fake=_torch_forward_fake),
    "triton": _triton_entry(),
    # Decode (M <= 16 rows), inference only: the compiled kernel has a forward op of its own, no autograd.
    "cuda": Backend(forward=_cuda_forward, reasons=_cuda_reasons),
    # The fused GEMM's schedules, for auto to measure (a user picks one with $FASTPEFT_GEMM_SCHEDULE).
    **{name: _triton_entry(name.partition(":")[2]) for name in TRITON_SCHEDULES},
}

# ----------------------------------------------------------------------------------------------------------
# torch.library ops: what autograd and torch.compile see. Each op is opaque to the compiler (the kernels inside
# are ours), has a fake implementation giving its outputs' shapes and dtypes, and forward's autograd is
# registered, so a compiled model keeps fastpeft's kernels with no graph break. Both backends share them.
# ----------------------------------------------------------------------------------------------------------

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
    seed = seed_to_use(seed, dropout_p)
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
        dm = magnitude_grad(dm, weight_norm, magnitude.dtype)
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
        ctx.quantized = weight if isinstance(weight, QuantizedWeight) else None  # frozen, and not a tensor
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, None if ctx.quantized else weight, lora_A,
                              lora_B, s, drop, col_scale, weight_norm if needs_dm else None, pre)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
        ctx.magnitude_dtype = None if magnitude is None else magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("lora_linear")
        needs_dx, _, needs_dbias, needs_da, needs_db = ctx.needs_input_grad[:5]
        x, weight, lora_A, lora_B, s, drop, col_scale, weight_norm, pre = ctx.saved_tensors
        weight = ctx.quantized if ctx.quantized is not None else weight
        dx, da, db, dbias, dm = LORA_LINEAR_BACKENDS[ctx.backend].backward(
            dy, x, weight, lora_A, lora_B, s, drop, ctx.seed, ctx.scaling, ctx.dropout_p,
            needs_dx, needs_da, needs_db, needs_dbias, col_scale=col_scale, pre=pre)
        if dm is not None:
            dm = magnitude_grad(dm, weight_norm, ctx.magnitude_dtype)
        return dx, None, dbias, da, db, None, None, None, None, dm, None


# ----------------------------------------------------------------------------------------------------------
# The op in the call frame, and the public function
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoraCall:
    """One lora_linear call: its arguments as given (x of any leading dims until prepared as 2-D rows)."""
    x: Tensor
    weight: Tensor | QuantizedWeight
    bias: Tensor | None
    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    dropout_p: float
    training: bool
    magnitude: Tensor | None
    weight_norm: Tensor | None
    trained_magnitude: bool
    seed: int = unkeyed(-1)  # the caller's dropout seed, -1: drawn per call
    lead: tuple | None = unkeyed()  # x's leading dims once prepared

    @property
    def p(self) -> float:
        """The dropout applied: none outside training."""
        return float(self.dropout_p) if self.training else 0.0

    @property
    def keep_pre(self) -> bool:
        """Whether DoRA's unscaled output is kept for backward (the magnitude's gradient needs it)."""
        return self.magnitude is not None and self.magnitude.requires_grad and torch.is_grad_enabled()

    def col_scale(self):
        return None if self.magnitude is None else dora_scale(self.magnitude, self.weight_norm)


class _LoraLinear(FusedOp):
    name = "lora_linear"
    backends = None  # set below, once the table exists

    def autocast(self, call, dtype):
        weight = call.weight
        return dataclasses.replace(call, x=autocast_cast(call.x, dtype), bias=autocast_cast(call.bias, dtype),
                                   weight=weight.with_dtype(dtype) if isinstance(weight, QuantizedWeight)
                                   else autocast_cast(weight, dtype))

    def check(self, call):
        check_inputs(call.x, call.weight, call.bias, call.lora_A, call.lora_B, call.scaling, call.dropout_p,
                     call.magnitude, call.weight_norm, check_values=not call.trained_magnitude)

    def prepare(self, call):
        if call.x.dim() == 2:
            return call
        return dataclasses.replace(call, x=call.x.reshape(-1, call.x.shape[-1]), lead=tuple(call.x.shape[:-1]))

    def tensors(self, call):
        return [call.x, call.weight, call.lora_A, call.lora_B] + [
            t for t in (call.bias, call.magnitude, call.weight_norm) if t is not None]

    def reasons_call(self, call):
        return call.x, call.weight, call.bias, call.lora_A, call.lora_B, call.p

    def trainable(self, call):
        return [call.x, call.lora_A, call.lora_B, call.bias, call.magnitude]

    def measurement_key(self, call, needs_grad):
        (M, K), (N, r) = call.x.shape, call.lora_B.shape
        key = ("lora_linear", call.x.dtype, call.lora_A.dtype, size_class(M), K, N, r, call.bias is not None,
               call.p > 0.0, needs_grad)
        if isinstance(call.weight, QuantizedWeight):
            key += (type(call.weight).__name__.lower().removesuffix("weight"),)
        if call.magnitude is not None:  # DoRA's norm is measured with the op when the call has none
            key += ("dora", call.weight_norm is None)
        return key

    def for_measuring(self, call):
        return dataclasses.replace(call, seed=0)  # measuring draws nothing from torch's generator

    def bind(self, name, call):
        if call.magnitude is None:
            return call
        norm = call.weight_norm
        norm = (dora_norm_on(name, call.weight, call.lora_A.detach(), call.lora_B.detach(), float(call.scaling))
                if norm is None else norm.detach())
        return dataclasses.replace(call, weight_norm=norm)

    def small(self, call):
        return call.p == 0.0 and call.x.numel() < SMALL_CALL and not isinstance(call.weight, QuantizedWeight)

    def forward(self, entry, call):
        # (differentiable in the magnitude through the scale where autograd runs over the torch path's ops)
        return entry.forward(call.x, call.weight, call.bias, call.lora_A, call.lora_B, float(call.scaling), call.p,
                             seed_to_use(call.seed, call.p), call.col_scale(), call.keep_pre)[0]

    def registered(self, name, call):
        return lora_linear_forward(call.x, call.weight, call.bias, call.lora_A, call.lora_B, float(call.scaling),
                                   call.p, call.seed, name, call.magnitude, call.weight_norm, call.keep_pre)[0]

    def function(self, name, call):
        return _EagerLoraLinear.apply(call.x, call.weight, call.bias, call.lora_A, call.lora_B, float(call.scaling),
                                      call.p, seed_to_use(call.seed, call.p), name, call.magnitude, call.weight_norm)

    def finish(self, call, out):
        return out if call.lead is None else out.reshape(*call.lead, out.shape[-1])


LORA_LINEAR = _LoraLinear()
LORA_LINEAR.backends = LORA_LINEAR_BACKENDS


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

    QLoRA: ``weight`` may be a quantised base (:class:`fastpeft.quantized.QuantizedWeight`), a 4-bit
    :class:`fastpeft.nf4.NF4Weight` computing in x's dtype (its ``dtype``). The triton backend dequantises W's tiles
    inside the fused GEMMs (forward and dX); the torch backend one row chunk (``fastpeft.nf4.NF4_CHUNK`` elements) at
    a time; the cuda decode kernel reads the packed codes. Nothing of W's size is kept for backward. Not with DoRA.
    Under ``torch.compile`` such a call runs outside the graph (eagerly).
    """
    if isinstance(weight, QuantizedWeight) and torch.compiler.is_compiling():
        return _lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend,
                                  dropout_seed=dropout_seed, magnitude=magnitude, weight_norm=weight_norm,
                                  _trained_magnitude=_trained_magnitude)
    check_dropout_seed(dropout_seed)
    check_training(training)
    call = LoraCall(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, magnitude, weight_norm,
                    _trained_magnitude, -1 if dropout_seed is None else int(dropout_seed))
    return LORA_LINEAR(call, backend)


# A call over a quantised base under torch.compile: a graph break, then the eager op (the weight is no tensor).
_lora_linear_eager = torch.compiler.disable(lambda *args, **kwargs: lora_linear(*args, **kwargs))
