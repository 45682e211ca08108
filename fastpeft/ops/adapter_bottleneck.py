"""The bottleneck adapter op: ``residual + scaling · (act(h W_dᵀ + b_d) W_uᵀ + b_u)``.

Read top to bottom: activations with their derivatives, the reference, the backend table (torch, triton, and the
forward-only cuda decode kernel), the torch.library ops running its autograd backends (autograd saves only the M×m
pre-activation besides h), input checks, the op's declaration for the call frame (``frame.FusedOp``) and the
public ``adapter_bottleneck``. The Triton kernels live in
``fastpeft.kernels.adapter_bottleneck``, the CUDA decode kernel in ``csrc/adapter_bottleneck_decode.cu``.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..auto import size_class
from ..backends import SMALL_CALL, Backend, autograd_backend, refuse_double_backward
from ..checks import (
    ACTIVATIONS,  # noqa: F401  (the op's activations, for ``from fastpeft.ops.adapter_bottleneck``)
    check_activation,
    check_finite_number,
    check_same_device,
)
from .frame import FusedOp, autocast_cast, unkeyed


def activate(pre: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(pre)
    if activation == "gelu":
        return F.gelu(pre)
    if activation == "silu":
        return F.silu(pre)
    return F.gelu(pre, approximate="tanh")


def activation_grad(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / d pre, elementwise (computed in fp32 for half inputs, returned in pre's dtype)."""
    z = pre if pre.dtype in (torch.float32, torch.float64) else pre.float()
    if activation == "relu":
        return (pre > 0).to(pre.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return (cdf + z * pdf).to(pre.dtype)
    if activation == "silu":
        sig = torch.sigmoid(z)
        return (sig * (1.0 + z * (1.0 - sig))).to(pre.dtype)
    k = math.sqrt(2.0 / math.pi)
    inner = k * (z + 0.044715 * z**3)
    t = torch.tanh(inner)
    return (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * z * z)).to(pre.dtype)


def adapter_bottleneck_reference(h, w_down, b_down, w_up, b_up, scaling=1.0, activation="relu", residual=None):
    """``residual + scaling · (act(h W_dᵀ + b_d) W_uᵀ + b_u)`` with ordinary autograd ops (residual None → h)."""
    pre = h @ w_down.t()
    if b_down is not None:
        pre = pre + b_down
    up = activate(pre, activation) @ w_up.t()
    if b_up is not None:
        up = up + b_up
    return (h if residual is None else residual) + scaling * up


# The backend table (see lora_linear.py). A backward here returns what differs by backend: dpre (M, m) in h's dtype
# and dh; the weight and bias gradients are torch GEMMs on every backend.

def _torch_forward(h, w_down, b_down, w_up, b_up, residual, scaling, activation):
    pre = torch.mm(h, w_down.t()) if b_down is None else torch.addmm(b_down, h, w_down.t())
    act = activate(pre, activation)
    base = h if residual is None else residual
    if b_up is None:
        return torch.addmm(base, act, w_up.t(), alpha=scaling), pre
    if h.numel() < SMALL_CALL:  # few rows: one more pass over the output costs less than building [act, 1]
        return torch.addmm(base, act, w_up.t(), alpha=scaling).add_(b_up, alpha=scaling), pre
    ones = torch.ones(act.shape[0], 1, dtype=act.dtype, device=act.device)
    return torch.addmm(base, torch.cat([act, ones], 1), torch.cat([w_up.t(), b_up[None]], 0), alpha=scaling), pre


def _torch_backward(g, w_down, w_up, pre, scaling, activation, has_residual, needs_dh):
    dpre = torch.mm(g, w_up).mul_(scaling).mul_(activation_grad(pre, activation))
    # The residual's gradient (g) is folded into the same GEMM when the residual is h itself.
    dh = (torch.mm(dpre, w_down) if has_residual else torch.addmm(g, dpre, w_down)) if needs_dh else None
    return dpre, dh


def _triton_forward(*args):
    from ..kernels import adapter_bottleneck as kernels
    return kernels.adapter_fwd(*args)


def _triton_backward(g, w_down, w_up, pre, scaling, activation, has_residual, needs_dh):
    from ..kernels import adapter_bottleneck as kernels
    dpre, dh = kernels.adapter_bwd_inputs(g, w_down, w_up, pre, scaling, activation, not has_residual, needs_dh)
    return dpre.to(g.dtype), dh


def _cuda_reasons(h, w_down, b_down, w_up, b_up, residual):
    from .. import cuda_ext
    return cuda_ext.adapter_bottleneck_decode_reasons(h, w_down, b_down, w_up, b_up, residual)


def _cuda_forward(h, w_down, b_down, w_up, b_up, residual, scaling, activation):
    from .. import cuda_ext
    # Eager calls go to the kernel directly: a custom op's dispatch costs about as much as a decode step.
    compiling = torch.compiler.is_compiling()
    decode = cuda_ext.adapter_bottleneck_decode_op if compiling else cuda_ext.adapter_bottleneck_decode
    return decode(h, w_down, b_down, w_up, b_up, residual, float(scaling), activation), None


ADAPTER_BOTTLENECK_BACKENDS = {
    "torch": Backend(forward=_torch_forward, backward=_torch_backward),
    "triton": Backend(forward=_triton_forward, backward=_triton_backward),
    # Decode (M <= 16 rows, m <= 256), inference only: the whole adapter in one launch, its own op, no autograd.
    "cuda": Backend(forward=_cuda_forward, reasons=_cuda_reasons),
}


# torch.library ops (see lora_linear.py): opaque to torch.compile, with fake implementations and registered
# autograd. torch: forward writes the output with one addmm, [act(pre), 1] · [W_uᵀ; b_u] accumulated onto the
# residual, so the up bias and the scale cost no extra pass over M×d. triton: two fused GEMMs
# (kernels/adapter_bottleneck.py).
# Both save h and the pre-activation (M×m) only; the weight gradients are torch GEMMs on either backend.

@torch.library.custom_op("fastpeft::adapter_bottleneck_forward", mutates_args=())
def adapter_bottleneck_forward(h: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor, b_up: Tensor | None,
                               residual: Tensor | None, scaling: float, activation: str, backend: str
                               ) -> tuple[Tensor, Tensor]:
    """Forward on 2-D h (M, d): ``(out, pre)``, pre = h W_dᵀ + b_d (M, m) being what backward needs."""
    entry = autograd_backend(ADAPTER_BOTTLENECK_BACKENDS, backend)
    return entry.forward(h, w_down, b_down, w_up, b_up, residual, scaling, activation)


@adapter_bottleneck_forward.register_fake
def _(h, w_down, b_down, w_up, b_up, residual, scaling, activation, backend):
    autograd_backend(ADAPTER_BOTTLENECK_BACKENDS, backend)
    return h.new_empty(h.shape), h.new_empty((h.shape[0], w_down.shape[0]))


@torch.library.custom_op("fastpeft::adapter_bottleneck_backward", mutates_args=())
def adapter_bottleneck_backward(g: Tensor, h: Tensor, w_down: Tensor, w_up: Tensor, pre: Tensor, scaling: float,
                                activation: str, has_residual: bool, backend: str, needs_dh: bool,
                                needs_dw_down: bool, needs_db_down: bool, needs_dw_up: bool, needs_db_up: bool
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dh, dW_d, db_d, dW_u, db_u)`` for 2-D g (M, d); a gradient not asked for comes back empty.

    dh excludes the residual's own gradient (g) when a separate residual was given.
    """
    grads = _gradients(g, h, w_down, w_up, pre, scaling, activation, has_residual, backend, needs_dh, needs_dw_down,
                       needs_db_down, needs_dw_up, needs_db_up)
    return tuple(t if t is not None else g.new_empty(0) for t in grads)


def _gradients(g, h, w_down, w_up, pre, scaling, activation, has_residual, backend, needs_dh, needs_dw_down,
               needs_db_down, needs_dw_up, needs_db_up):
    """``(dh, dW_d, db_d, dW_u, db_u)``, None where not asked for: the backward of the registered op and of the
    eager autograd Function."""
    entry = autograd_backend(ADAPTER_BOTTLENECK_BACKENDS, backend)
    dh = dwd = dbd = dwu = dbu = None
    if needs_dw_up:
        dwu = torch.mm(g.t(), activate(pre, activation)).mul_(scaling)
    if needs_db_up:
        dbu = g.sum(0).mul_(scaling)
    if needs_dh or needs_dw_down or needs_db_down:
        dpre, dh = entry.backward(g, w_down, w_up, pre, scaling, activation, has_residual, needs_dh)
        if needs_dw_down:
            dwd = torch.mm(dpre.t(), h)
        if needs_db_down:
            dbd = dpre.sum(0)
    return dh, dwd, dbd, dwu, dbu


@adapter_bottleneck_backward.register_fake
def _(g, h, w_down, w_up, pre, scaling, activation, has_residual, backend, needs_dh, needs_dw_down, needs_db_down,
      needs_dw_up, needs_db_up):
    autograd_backend(ADAPTER_BOTTLENECK_BACKENDS, backend)
    m, d = w_down.shape

    def grad(needed, shape):
        return g.new_empty(shape if needed else (0,))

    return (grad(needs_dh, h.shape), grad(needs_dw_down, (m, d)), grad(needs_db_down, (m,)),
            grad(needs_dw_up, (d, m)), grad(needs_db_up, (d,)))


def _setup_context(ctx, inputs, output):
    h, w_down, b_down, w_up, b_up, residual, scaling, activation, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, w_down, w_up, output[1])
    ctx.scaling, ctx.activation, ctx.has_residual, ctx.backend = scaling, activation, residual is not None, backend


def _backward(ctx, g, unused):
    if g is None:
        return (None,) * 9
    needs = ctx.needs_input_grad
    grads = adapter_bottleneck_backward(g, *ctx.saved_tensors, ctx.scaling, ctx.activation, ctx.has_residual,
                                        ctx.backend, *needs[:5])
    dres = g if ctx.has_residual and needs[5] else None
    return (*(grad if need else None for grad, need in zip(grads, needs[:5], strict=True)), dres, None, None, None)


adapter_bottleneck_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerAdapterBottleneck(torch.autograd.Function):
    """What the registered op and its autograd do, for eager calls: the table entry's forward and the same
    gradients, h and pre saved, without the custom op's dispatch (compiled graphs keep the registered op)."""

    @staticmethod
    def forward(ctx, h, w_down, b_down, w_up, b_up, residual, scaling, activation, backend):
        out, pre = ADAPTER_BOTTLENECK_BACKENDS[backend].forward(h, w_down, b_down, w_up, b_up, residual, scaling,
                                                                activation)
        ctx.save_for_backward(h, w_down, w_up, pre)
        ctx.scaling, ctx.activation, ctx.has_residual, ctx.backend = scaling, activation, residual is not None, backend
        return out

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("adapter_bottleneck")
        needs = ctx.needs_input_grad
        grads = _gradients(g, *ctx.saved_tensors, ctx.scaling, ctx.activation, ctx.has_residual, ctx.backend,
                           *needs[:5])
        dres = g if ctx.has_residual and needs[5] else None
        return (*grads, dres, None, None, None)


def _check_inputs(h, w_down, b_down, w_up, b_up, residual, scaling, activation):
    named = {"h": h, "w_down": w_down, "w_up": w_up, "b_down": b_down, "b_up": b_up, "residual": residual}
    named = {k: v for k, v in named.items() if v is not None or k in ("h", "w_down", "w_up")}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != h.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but h has {h.dtype}; they must match")
    if h.dim() < 1:
        raise ValueError("h must have shape (..., d), got a 0-d tensor")
    d = h.shape[-1]
    if d == 0:
        raise ValueError(f"h has shape {tuple(h.shape)}: the hidden size d (its last dim) must be at least 1")
    if w_down.dim() != 2 or w_down.shape[1] != d or w_down.shape[0] < 1:
        raise ValueError(f"w_down must have shape (m, d={d}) with m >= 1, got {tuple(w_down.shape)}")
    m = w_down.shape[0]
    if tuple(w_up.shape) != (d, m):
        raise ValueError(f"w_up must have shape (d={d}, m={m}), got {tuple(w_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (m,):
        raise ValueError(f"b_down must have shape (m={m},), got {tuple(b_down.shape)}")
    if b_up is not None and tuple(b_up.shape) != (d,):
        raise ValueError(f"b_up must have shape (d={d},), got {tuple(b_up.shape)}")
    if residual is not None and residual.shape != h.shape:
        raise ValueError(f"residual must have h's shape {tuple(h.shape)}, got {tuple(residual.shape)}")
    check_same_device(named)
    check_finite_number("scaling", scaling)
    check_activation(activation)


@dataclasses.dataclass
class BottleneckCall:
    """One adapter_bottleneck call: its arguments as given (h of any leading dims until prepared as 2-D rows)."""
    h: Tensor
    w_down: Tensor
    b_down: Tensor | None
    w_up: Tensor
    b_up: Tensor | None
    residual: Tensor | None
    scaling: float
    activation: str
    lead: tuple | None = unkeyed()  # h's leading dims once prepared
    # Under autocast, a residual wider than the autocast dtype: the update is added to it after the op.
    wide_residual: Tensor | None = unkeyed()


class _AdapterBottleneck(FusedOp):
    name = "adapter_bottleneck"
    backends = None  # set below, once the table exists

    def autocast(self, call, dtype):
        cast = {f: autocast_cast(getattr(call, f), dtype) for f in ("h", "w_down", "b_down", "w_up", "b_up")}
        base = call.h if call.residual is None else call.residual
        # A residual wider than the autocast dtype keeps its precision: the update is added to it after the op (one
        # that is not h's shape, or not floating point, goes on to the checks as it is).
        if (isinstance(base, Tensor) and isinstance(call.h, Tensor) and base.shape == call.h.shape
                and base.dtype in (torch.float32, torch.float64) and base.dtype.itemsize > dtype.itemsize):
            return dataclasses.replace(call, **cast, residual=torch.zeros_like(cast["h"]), wide_residual=base)
        return dataclasses.replace(call, **cast, residual=autocast_cast(call.residual, dtype))

    def check(self, call):
        _check_inputs(call.h, call.w_down, call.b_down, call.w_up, call.b_up, call.residual, call.scaling,
                      call.activation)

    def prepare(self, call):
        if call.h.dim() == 2:
            return call
        h2d = call.h.reshape(-1, call.h.shape[-1])
        return dataclasses.replace(call, h=h2d, residual=None if call.residual is None else call.residual.reshape(
            h2d.shape), lead=tuple(call.h.shape[:-1]))

    def tensors(self, call):
        return [t for t in (call.h, call.w_down, call.w_up, call.b_down, call.b_up, call.residual) if t is not None]

    def reasons_call(self, call):
        return call.h, call.w_down, call.b_down, call.w_up, call.b_up, call.residual

    def trainable(self, call):
        return [call.h, call.w_down, call.w_up, call.b_down, call.b_up, call.residual]

    def measurement_key(self, call, needs_grad):
        (M, d), m = call.h.shape, call.w_down.shape[0]
        return ("adapter_bottleneck", call.h.dtype, size_class(M), d, m, call.activation, call.b_down is not None,
                call.b_up is not None, call.residual is not None, needs_grad)

    def small(self, call):
        # (what autograd saves there beyond h and pre, act(pre), is small)
        return call.h.numel() < SMALL_CALL

    def _args(self, call):
        return (call.h, call.w_down, call.b_down, call.w_up, call.b_up, call.residual, float(call.scaling),
                call.activation)

    def forward(self, entry, call):
        return entry.forward(*self._args(call))[0]

    def registered(self, name, call):
        return adapter_bottleneck_forward(*self._args(call), name)[0]

    def function(self, name, call):
        return _EagerAdapterBottleneck.apply(*self._args(call), name)

    def finish(self, call, out):
        out = out if call.lead is None else out.reshape(*call.lead, out.shape[-1])
        return out if call.wide_residual is None else call.wide_residual + out


ADAPTER_BOTTLENECK = _AdapterBottleneck()
ADAPTER_BOTTLENECK.backends = ADAPTER_BOTTLENECK_BACKENDS


def adapter_bottleneck(h, w_down, b_down, w_up, b_up, scaling=1.0, activation="relu", residual=None, backend=None):
    """``residual + scaling · (act(h W_dᵀ + b_d) W_uᵀ + b_u)``.

    Args:
        h: (..., d) hidden states; w_down (m, d), b_down (m,) or None, w_up (d, m), b_up (d,) or None, all in
            h's dtype and on its device.
        activation: "relu", "gelu" (erf), "silu" (swish) or "gelu_tanh".
        residual: None (sequential adapter: h itself) or a tensor of h's shape (parallel adapter).
        backend: None/"auto", "torch", "triton" (fused GEMMs) or "cuda" (the whole adapter in one launch for
            M <= 16 rows, m <= 256, inference only).

    Returns (..., d) in h's dtype; differentiable in h, both weights, both biases and the residual.

    Under ``torch.autocast`` the GEMMs run in the autocast dtype, as the two ``nn.Linear`` of an unfused adapter
    would, and a residual wider than that dtype (an fp32 residual stream) keeps its precision: the update is added
    to it after the fused op, so the result has the residual's dtype, like ``h + adapter(h)`` written with nn.Linear.
    """
    return ADAPTER_BOTTLENECK(BottleneckCall(h, w_down, b_down, w_up, b_up, residual, scaling, activation), backend)
