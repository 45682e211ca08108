"""The fused (IA)³ linear op: ``y = (x Wᵀ + b) ⊙ l`` (an output scale) or ``y = (x ⊙ l) Wᵀ + b`` (an input scale,
PEFT's ``feedforward_modules``); with ``adapter_index``, a mixed batch whose rows scale by their own task's vector.

Read top to bottom: the reference, the torch backend, the backend table (torch; triton, whose kernels are the fused
LoRA GEMM's with its low-rank term off, ``fastpeft.kernels.ia3_linear``; cuda, the decode kernel's column and input
scales), the torch.library ops and the eager autograd Function, then the op's declaration for the call frame and the
public ``ia3_linear``.

What backward keeps: for an output scale, dl = Σ_rows dY ⊙ (x Wᵀ + b) needs the unscaled output, which forward keeps
(``pre``, M×N, only when l is trained): recomputing it would cost a second base GEMM, and it is the tensor HF PEFT's
autograd keeps too. For an input scale, dl = Σ_rows x ⊙ (dY W) needs x (kept only when l is trained), and the
product dY W is dX's own GEMM, so the sum is taken there.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..auto import size_class
from ..backends import SMALL_CALL, Backend, autograd_backend, refuse_double_backward
from ..checks import check_same_device
from ..quantized import QuantizedWeight
from .frame import FusedOp, autocast_cast, unkeyed
from .lora_checks import check_adapter_index, check_adapter_index_values, check_float_tensors, check_frozen_base
from .lora_linear import _base_product, _format_reasons

__all__ = ["IA3_LINEAR_BACKENDS", "ia3_linear", "ia3_linear_reference"]

# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------

def ia3_linear_reference(x, weight, bias, ia3_l, feedforward=False, adapter_index=None):
    """(IA)³ with ordinary autograd ops, as HF PEFT computes it: ``(x ⊙ l)`` rounded to x's dtype, then the linear
    (an input scale); or the linear, then ``⊙ l`` (an output scale, the bias included). With ``adapter_index`` (x's
    leading shape), ``ia3_l`` is a list of vectors and row i takes ``ia3_l[adapter_index[i]]`` (-1: none).
    Run it in float64 for reference outputs and gradients.
    """
    if isinstance(weight, QuantizedWeight):
        weight = weight.dequantize()
    scale = ia3_l if adapter_index is None else _row_scales(ia3_l, adapter_index)
    if feedforward:
        return torch.nn.functional.linear((x * scale).to(x.dtype), weight, bias)
    return (torch.nn.functional.linear(x, weight, bias) * scale).to(x.dtype)


def _row_scales(vectors, adapter_index) -> Tensor:
    """Each row's vector, (..., F): ``vectors[adapter_index[...]]``, ones where the index is -1."""
    table = torch.stack(list(vectors)) if isinstance(vectors, (list, tuple)) else vectors
    ones = torch.ones_like(table[:1])
    return torch.cat([ones, table])[adapter_index.long() + 1]


# ----------------------------------------------------------------------------------------------------------
# torch backend: no M×N or M×K temporary beyond the one the formula needs. An output scale multiplies the base output
# in place (unless l is trained: then that output is kept for dl); an input scale scales x (PEFT's copy, in x's dtype).
# Products with the scale are taken in the scale's precision and rounded once into x's dtype (``out=``), as PEFT's
# fp32 products are: rounding the scale to bf16 first would differ from PEFT in the last bit.
# ----------------------------------------------------------------------------------------------------------

def _scaled(t, scale):
    """``t ⊙ scale`` in t's dtype, computed in the wider of the two dtypes and rounded once (under autograd, the
    small calls' route, through a widened copy, as PEFT computes it)."""
    if scale.dtype == t.dtype:
        return t * scale
    if torch.is_grad_enabled() and (t.requires_grad or scale.requires_grad):
        return (t * scale).to(t.dtype)
    return torch.mul(t, scale, out=torch.empty_like(t))


def _torch_forward(x, weight, bias, scale, feedforward, keep_pre, index=None):
    s = scale if index is None else _row_scales(scale, index)
    if feedforward:
        return _base_product(_scaled(x, s), weight, bias), None
    pre = _base_product(x, weight, bias)
    if keep_pre or torch.is_grad_enabled() and s.requires_grad:
        return _scaled(pre, s), pre
    return pre.mul_(s), None


def _torch_backward(dy, x, weight, scale, feedforward, pre, needs_dx, needs_dl, needs_dbias):
    dtype = dy.dtype
    s = scale.to(dtype)  # (dX's scale, folded into a GEMM operand)
    dx = dl = dbias = None
    if not feedforward:
        if needs_dl:
            dl = (dy * pre).sum(0, dtype=torch.float32)
        if needs_dbias:
            dbias = dy.sum(0, dtype=torch.float32).mul_(scale.float()).to(dtype)
        if needs_dx:
            # (dY ⊙ l) W, the scale folded into the smaller operand: W's rows (N×K) or dY's columns (M×N)
            if isinstance(weight, QuantizedWeight):
                dx = weight.matmul_t(dy * s)
            elif weight.shape[1] <= dy.shape[0]:
                dx = torch.mm(dy, weight * s[:, None])
            else:
                dx = torch.mm(dy * s, weight)
        return dx, dl, dbias
    if needs_dbias:
        dbias = dy.sum(0, dtype=torch.float32).to(dtype)
    if needs_dx or needs_dl:
        g = weight.matmul_t(dy) if isinstance(weight, QuantizedWeight) else torch.mm(dy, weight)  # dY W (M×K)
        if needs_dl:
            dl = (g * x).sum(0, dtype=torch.float32)
        if needs_dx:
            dx = g.mul_(scale)  # (in scale's precision, rounded once)
    return dx, dl, dbias


def _torch_forward_fake(x, weight, feedforward, keep_pre):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, N) if keep_pre and not feedforward else (0,))


# ----------------------------------------------------------------------------------------------------------
# The backend table. Every entry's forward takes (x, weight, bias, scale, feedforward, keep_pre, index) and returns
# (y, pre); backward returns (dx, dl, dbias).
# ----------------------------------------------------------------------------------------------------------

def _triton_reasons(x, weight, bias, scale, feedforward, index, needs_grad):
    reasons = _format_reasons("triton", weight)
    if index is not None and needs_grad:
        reasons.append("the triton backend runs mixed (IA)³ batches for inference only (no gradients): the torch "
                       "backend trains them")
    return reasons


def _triton_forward(x, weight, bias, scale, feedforward, keep_pre, index=None):
    from ..kernels import ia3_linear as kernels
    return kernels.ia3_fwd(x, weight, bias, scale, feedforward, keep_pre, index)


def _triton_backward(dy, x, weight, scale, feedforward, pre, needs_dx, needs_dl, needs_dbias):
    from ..kernels import ia3_linear as kernels
    return kernels.ia3_bwd(dy, x, weight, scale, feedforward, pre, needs_dx, needs_dl, needs_dbias)


def _cuda_reasons(x, weight, bias, scale, feedforward, index, needs_grad):
    from .. import cuda_ext
    reasons = _format_reasons("cuda", weight)
    if reasons:
        return reasons
    reasons = cuda_ext.decode_reasons(x, weight, bias)
    if needs_grad:
        reasons.append("the cuda backend is forward-only (decode, inference): no gradients")
    return reasons


def _cuda_forward(x, weight, bias, scale, feedforward, keep_pre=False, index=None):
    from .. import cuda_ext
    decode = cuda_ext.ia3_linear_decode_op if torch.compiler.is_compiling() else cuda_ext.ia3_linear_decode
    return decode(x, weight, bias, scale, feedforward, index), None


IA3_LINEAR_BACKENDS = {
    "torch": Backend(forward=_torch_forward, backward=_torch_backward, forward_fake=_torch_forward_fake),
    "triton": Backend(forward=_triton_forward, backward=_triton_backward, forward_fake=_torch_forward_fake,
                      reasons=_triton_reasons),
    "cuda": Backend(forward=_cuda_forward, reasons=_cuda_reasons),  # decode (M <= 16 rows), inference only
}

# ----------------------------------------------------------------------------------------------------------
# torch.library ops (compiled graphs), and the eager autograd Function
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastpeft::ia3_linear_forward", mutates_args=())
def ia3_linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, feedforward: bool,
                       backend: str, keep_pre: bool = False, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Forward on 2-D x (M, K): ``(y, pre)``; pre (M, N) when ``keep_pre`` (an output scale's dl needs it), else
    empty. With ``index`` (M,), scale is a table (T, F) and row i takes its row index[i] (-1: none)."""
    y, pre = IA3_LINEAR_BACKENDS[backend].forward(x, weight, bias, scale, feedforward, keep_pre, index)
    return y, pre if pre is not None else x.new_empty(0)


@ia3_linear_forward.register_fake
def _(x, weight, bias, scale, feedforward, backend, keep_pre=False, index=None):
    return _torch_forward_fake(x, weight, feedforward, keep_pre)


@torch.library.custom_op("fastpeft::ia3_linear_backward", mutates_args=())
def ia3_linear_backward(dy: Tensor, x: Tensor | None, weight: Tensor, scale: Tensor, feedforward: bool,
                        pre: Tensor | None, backend: str, needs_dx: bool, needs_dl: bool, needs_dbias: bool
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dl, dbias)`` for 2-D dy (M, N); a gradient not asked for comes back empty. dl in the scale's dtype."""
    dx, dl, dbias = autograd_backend(IA3_LINEAR_BACKENDS, backend).backward(
        dy, x, weight, scale, feedforward, pre, needs_dx, needs_dl, needs_dbias)
    dl = dl.to(scale.dtype) if dl is not None else None
    return tuple(g if g is not None else dy.new_empty(0) for g in (dx, dl, dbias))


@ia3_linear_backward.register_fake
def _(dy, x, weight, scale, feedforward, pre, backend, needs_dx, needs_dl, needs_dbias):
    M, N = dy.shape
    return (dy.new_empty((M, weight.shape[1]) if needs_dx else (0,)),
            scale.new_empty(scale.shape) if needs_dl else dy.new_empty(0), dy.new_empty((N,) if needs_dbias else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, feedforward, backend = inputs[:6]
    _, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)
    needs_dl = ctx.needs_input_grad[3]
    ctx.save_for_backward(x if needs_dl and feedforward else None, weight, scale,
                          pre if needs_dl and not feedforward else None)
    ctx.feedforward, ctx.backend = feedforward, backend


def _backward(ctx, dy, _pre_grad):
    inputs = len(ctx.needs_input_grad)
    if dy is None:
        return (None,) * inputs
    needs_dx, _, needs_dbias, needs_dl = ctx.needs_input_grad[:4]
    x, weight, scale, pre = ctx.saved_tensors
    dx, dl, dbias = ia3_linear_backward(dy, x, weight, scale, ctx.feedforward, pre, ctx.backend, needs_dx, needs_dl,
                                        needs_dbias)
    return (dx if needs_dx else None, None, dbias if needs_dbias else None, dl if needs_dl else None,
            None, None, None, None)[:inputs]


ia3_linear_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerIa3Linear(torch.autograd.Function):
    """The registered op and its autograd for eager calls: the table entry's forward and backward, the same tensors
    saved, without the custom op's dispatch."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, feedforward, backend):
        needs_dl = ctx.needs_input_grad[3]
        y, pre = IA3_LINEAR_BACKENDS[backend].forward(x, weight, bias, scale, feedforward, needs_dl and not feedforward)
        ctx.quantized = weight if isinstance(weight, QuantizedWeight) else None  # frozen, and not a tensor
        ctx.save_for_backward(x if needs_dl and feedforward else None, None if ctx.quantized else weight, scale, pre)
        ctx.feedforward, ctx.backend = feedforward, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("ia3_linear")
        needs_dx, _, needs_dbias, needs_dl = ctx.needs_input_grad[:4]
        x, weight, scale, pre = ctx.saved_tensors
        weight = ctx.quantized if ctx.quantized is not None else weight
        dx, dl, dbias = IA3_LINEAR_BACKENDS[ctx.backend].backward(dy, x, weight, scale, ctx.feedforward, pre,
                                                                  needs_dx, needs_dl, needs_dbias)
        return dx, None, dbias, dl.to(scale.dtype) if dl is not None else None, None, None


# ----------------------------------------------------------------------------------------------------------
# The op in the call frame, and the public function
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Ia3Call:
    """One ia3_linear call: its arguments as given (x of any leading dims until prepared as 2-D rows)."""
    x: Tensor
    weight: Tensor | QuantizedWeight
    bias: Tensor | None
    ia3_l: Tensor | list
    feedforward: bool
    adapter_index: Tensor | None
    index: Tensor | None = unkeyed()  # once prepared: adapter_index as one int64 row index
    lead: tuple | None = unkeyed()  # x's leading dims once prepared

    @property
    def scale(self) -> Tensor:
        """The vector, or a mixed batch's table (T, F)."""
        return self.ia3_l if self.adapter_index is None else torch.stack(list(self.ia3_l))

    @property
    def trains_scale(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.vectors)

    @property
    def vectors(self) -> list:
        return [self.ia3_l] if self.adapter_index is None else list(self.ia3_l)


class _Ia3Linear(FusedOp):
    name = "ia3_linear"
    backends = IA3_LINEAR_BACKENDS

    def autocast(self, call, dtype):
        weight = call.weight
        return dataclasses.replace(call, x=autocast_cast(call.x, dtype), bias=autocast_cast(call.bias, dtype),
                                   weight=weight.with_dtype(dtype) if isinstance(weight, QuantizedWeight)
                                   else autocast_cast(weight, dtype))

    def check(self, call):
        check_ia3_inputs(call.x, call.weight, call.bias, call.ia3_l, call.feedforward, call.adapter_index)

    def prepare(self, call):
        if call.adapter_index is not None:  # (read every call: the values decide which rows read what)
            check_adapter_index_values(call.adapter_index, len(call.ia3_l))
            call = dataclasses.replace(call, index=call.adapter_index.reshape(-1).to(torch.long))
        if call.x.dim() == 2:
            return call
        return dataclasses.replace(call, x=call.x.reshape(-1, call.x.shape[-1]), lead=tuple(call.x.shape[:-1]))

    def tensors(self, call):
        # (not the vectors: any float dtype is read as fp32 by every backend; their devices are checked with x's)
        return [call.x, call.weight] + ([call.bias] if call.bias is not None else [])

    def reasons_call(self, call):
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in self.trainable(call))
        return call.x, call.weight, call.bias, call.ia3_l, call.feedforward, call.index, needs_grad

    def trainable(self, call):
        return [call.x, call.bias, *call.vectors]

    def measurement_key(self, call, needs_grad):
        (M, K), N = call.x.shape, call.weight.shape[0]
        key = ("ia3_linear", call.x.dtype, call.vectors[0].dtype, size_class(M), K, N, call.bias is not None,
               bool(call.feedforward), call.adapter_index is not None, needs_grad)
        if isinstance(call.weight, QuantizedWeight):
            key += (type(call.weight).__name__.lower().removesuffix("weight"),)
        return key

    def small(self, call):
        # mixed batches train through autograd over the torch path's ops (a gather, then the formula)
        return call.index is not None or (call.x.numel() < SMALL_CALL and not isinstance(call.weight, QuantizedWeight))

    def forward(self, entry, call):
        return entry.forward(call.x, call.weight, call.bias, call.scale, call.feedforward,
                             call.trains_scale and not call.feedforward, call.index)[0]

    def registered(self, name, call):
        return ia3_linear_forward(call.x, call.weight, call.bias, call.scale, call.feedforward, name,
                                  call.trains_scale and not call.feedforward, call.index)[0]

    def function(self, name, call):
        return _EagerIa3Linear.apply(call.x, call.weight, call.bias, call.ia3_l, call.feedforward, name)

    def finish(self, call, out):
        return out if call.lead is None else out.reshape(*call.lead, out.shape[-1])


IA3_LINEAR = _Ia3Linear()


def check_ia3_inputs(x, weight, bias, ia3_l, feedforward, adapter_index=None):
    """Every input of an ia3_linear call, named with what was expected."""
    if not isinstance(feedforward, bool):
        kind = f"{type(feedforward).__module__}.{type(feedforward).__qualname__}"
        raise TypeError(f"feedforward must be a bool (True: scale the input, PEFT's feedforward_modules; False: "
                        f"the output), got {feedforward!r} ({kind})")
    named = {"x": x}
    if bias is not None:
        named["bias"] = bias
    if not isinstance(weight, QuantizedWeight):
        named["weight"] = weight
    check_float_tensors(named)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., in_features={k}), got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has {weight.dtype}; they must match")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must have shape (out_features={n},) and weight's dtype {weight.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    check_frozen_base(weight, "ia3_linear trains the (IA)³ vector (and bias)")
    features, side = (k, "in_features") if feedforward else (n, "out_features")
    if adapter_index is None:
        vectors = {"ia3_l": ia3_l}
    else:
        if not isinstance(ia3_l, (list, tuple)) or not ia3_l:
            raise TypeError("with adapter_index, ia3_l must be a non-empty list of vectors, one per adapter, got "
                            f"{type(ia3_l).__name__}")
        vectors = {f"ia3_l[{i}]": v for i, v in enumerate(ia3_l)}
        check_adapter_index(adapter_index, x)
    check_float_tensors(vectors)
    for name, v in vectors.items():
        if tuple(v.shape) != (features,):
            raise ValueError(f"{name} must have shape ({side}={features},) for "
                             f"{'an input' if feedforward else 'an output'} scale (feedforward={feedforward}), got "
                             f"{tuple(v.shape)} (a PEFT ia3_l of shape (N, 1) or (1, K) goes in flattened)")
    if len({v.dtype for v in vectors.values()}) > 1:
        raise TypeError("the (IA)³ vectors must share one dtype, got " + ", ".join(
            f"{name}: {v.dtype}" for name, v in vectors.items()))
    check_same_device({"x": x, "weight": weight, **named, **vectors,
                       **({"adapter_index": adapter_index} if adapter_index is not None else {})})


def ia3_linear(x, weight, bias, ia3_l, feedforward=False, backend=None, *, adapter_index=None):
    """(IA)³, fused: ``(x Wᵀ + b) ⊙ l`` (``feedforward=False``: keys, values, any output scale) or ``(x ⊙ l) Wᵀ + b``
    (``feedforward=True``: PEFT's ``feedforward_modules``, an input scale).

    Args:
        x: (..., K), any leading dims; float16/bfloat16/float32 (float64 on the torch backend).
        weight: (N, K) frozen base weight in x's dtype (or a quantised base,
            :class:`fastpeft.quantized.QuantizedWeight`).
        bias: (N,) in x's dtype, or None; trained if it requires grad.
        ia3_l: the learned vector, (N,) for an output scale or (K,) for an input scale, any float dtype (PEFT keeps
            it as (N, 1) or (1, K): pass it flattened). With ``adapter_index``: a list of such vectors, one per task.
        adapter_index: None, or an integer tensor of x's leading shape: the task of each row (-1: no scale), for
            serving a batch of (IA)³ tasks in one call (the triton backend runs it for inference; torch trains it).
        backend: "auto", "torch", "triton" or "cuda" (the decode kernel: M <= 16 rows, inference only); None reads
            ``$FASTPEFT_BACKEND``.

    Returns (..., N) in x's dtype; differentiable in x, bias and the vector(s) (their gradients in their dtype).
    The input scale rounds ``x ⊙ l`` to x's dtype before the product, as PEFT's scaled copy of x does; the triton
    backend applies it to x's tiles as its GEMM loads them, and the output scale in the GEMM's epilogue. Over a
    quantised base under ``torch.compile`` the call runs outside the graph (eagerly).
    """
    if isinstance(weight, QuantizedWeight) and torch.compiler.is_compiling():
        return _ia3_linear_eager(x, weight, bias, ia3_l, feedforward, backend, adapter_index=adapter_index)
    call = Ia3Call(x, weight, bias, list(ia3_l) if isinstance(ia3_l, tuple) else ia3_l, feedforward, adapter_index)
    return IA3_LINEAR(call, backend)


# A call over a quantised base under torch.compile: a graph break, then the eager op (the weight is no tensor).
_ia3_linear_eager = torch.compiler.disable(lambda *args, **kwargs: ia3_linear(*args, **kwargs))
