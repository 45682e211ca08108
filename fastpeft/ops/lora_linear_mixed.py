"""Many LoRA adapters over one frozen base in one call: each row of x takes its own adapter (or none).

``y_m = x_m Wᵀ + b + s_a · (drop_a(x_m) A_aᵀ) B_aᵀ`` with ``a = adapter_index[m]``; index -1 is the base alone. With a
DoRA adapter (a magnitude), its rows are ``(m_a / ‖W + s_a B_a A_a‖) ⊙ (x_m Wᵀ + s_a · drop(x_m) A_aᵀ B_aᵀ) + b``.
Ranks, scalings and dropouts may differ between adapters; each adapter's gradients come from its own rows only, so
several adapters train in one step exactly as each would alone on its rows.

Backends: triton (the fused kernels' MIXED tiles, each tile's rows and adapter read from tables), cuda (decode: up
to 16 rows, the rows' adapters stacked, one launch) and torch. The torch backend runs samples that each take one
adapter over at least MIN_BLOCK_ROWS rows in batched GEMMs; otherwise it groups the rows once per call: runs of equal
index are contiguous views, used in place; an index that changes often is sorted instead, the rows gathered once and
the results scattered back once. The base GEMM runs once over all rows, in forward and for dX. Read top to bottom:
the float64-checkable reference, the CUDA stacking, the call, the backend table (its Functions and the grouping are
``lora_mixed``'s), the registered ops, the op's declaration for the call frame, checks and the public function.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import Backend, autograd_backend
from ..checks import check_finite_number, check_probability, check_same_device, check_training
from ..quantized import QuantizedWeight
from .frame import FusedOp, autocast_cast
from .lora_checks import check_adapter_index, check_adapter_index_values, check_inputs
from .lora_dora import dora_norm_on, dora_scale
from .lora_dropout import check_dropout_seed, seed_to_use
from .lora_linear import lora_linear_reference
from .lora_mixed import (  # noqa: F401  (the backends' Functions and grouping, for callers of this module)
    BASE_INDEX,
    MIN_BLOCK_ROWS,
    RUNS_PER_ADAPTER,
    Group,
    _Meta,
    _MixedLoraLinear,
    _MixedLoraLinearBlocks,
    _MixedLoraLinearTriton,
    _row_drop_mask,
    _stacked,
    group_rows,
    sample_blocks,
)


def lora_linear_mixed_reference(x, weight, bias, lora_As, lora_Bs, scalings, adapter_index, keep_masks=None,
                                dropout_ps=None, magnitudes=None):
    """Each row through :func:`lora_linear_reference` with its own adapter (plain autograd ops; run it in float64).

    keep_masks: None, or per adapter None / a bool keep-mask of x's shape (True = keep) applied to that adapter's
    rows. A quantised weight (an :class:`fastpeft.nf4.NF4Weight`) is dequantised (to its dtype), as by
    :func:`lora_linear_reference`."""
    if isinstance(weight, QuantizedWeight):
        weight = weight.dequantize()
    x2d = x.reshape(-1, x.shape[-1])
    index = adapter_index.reshape(-1)
    y = x2d @ weight.t() + (bias if bias is not None else 0)
    if x2d.shape[0] == 0:
        return y.reshape(*x.shape[:-1], weight.shape[0])
    rows_out = []
    for m in range(x2d.shape[0]):
        a = int(index[m])
        if a == BASE_INDEX:
            rows_out.append(y[m])
            continue
        keep = None if keep_masks is None or keep_masks[a] is None else keep_masks[a].reshape(-1, x.shape[-1])[m:m + 1]
        p = 0.0 if dropout_ps is None else dropout_ps[a]
        m_a = None if magnitudes is None else magnitudes[a]
        rows_out.append(lora_linear_reference(x2d[m:m + 1], weight, bias, lora_As[a], lora_Bs[a], scalings[a], keep,
                                              p, magnitude=m_a)[0])
    return torch.stack(rows_out).reshape(*x.shape[:-1], weight.shape[0])



def _decode_reasons(x2d, lora_As, index, dropout, dora) -> list[str]:
    """Why the CUDA decode kernel cannot run this mixed batch (beyond the device and the build); empty when it can.
    (It takes x, W and b contiguous, and stacks the adapters itself.)"""
    from .. import cuda_ext
    if x2d.shape[0] > cuda_ext.MAX_DECODE_ROWS:  # first: the rest reads the index
        return [f"the cuda decode kernel serves M <= {cuda_ext.MAX_DECODE_ROWS} rows, got M={x2d.shape[0]}"]
    reasons = []
    if dropout:
        reasons.append("the cuda backend has no dropout (inference): use training=False")
    if dora:
        reasons.append("DoRA adapters in a mixed batch run on the torch backend")
    present = sorted({int(a) for a in index.tolist() if a != BASE_INDEX})
    if present and len(present) * max(lora_As[a].shape[0] for a in present) > cuda_ext.MAX_DECODE_RANK:
        reasons.append(f"the rows' adapters stack to more than {cuda_ext.MAX_DECODE_RANK} ranks")
    dtypes = {lora_As[a].dtype for a in present}
    if len(dtypes) > 1 or not dtypes <= {x2d.dtype, torch.float32}:
        reasons.append(f"the rows' adapters must all have the base's dtype {x2d.dtype} or all be float32, got "
                       f"{sorted(map(str, dtypes))}")
    return reasons


def _decode(x2d, weight, bias, lora_As, lora_Bs, scalings, index):
    """A mixed batch of at most 16 rows in one CUDA launch: the rows' adapters stacked (ranks zero-padded, each B
    scaled), each row reading its own."""
    from .. import cuda_ext
    present = sorted({int(a) for a in index.tolist() if a != BASE_INDEX})
    if not present:
        return torch.nn.functional.linear(x2d, weight, bias)
    # each B scaled in fp32, rounded once into the stack
    A_stack, B_stack = _stacked([lora_As[a] for a in present],
                                [lora_Bs[a].detach().float() * scalings[a] for a in present], lora_As[present[0]].dtype)
    K, rank = x2d.shape[1], A_stack.shape[1]
    position = {a: i for i, a in enumerate(present)}
    row_adapter = torch.tensor([position.get(int(a), BASE_INDEX) for a in index.tolist()], dtype=torch.int32,
                               device=x2d.device)
    return cuda_ext.lora_linear_decode(x2d.contiguous(), weight.contiguous(),
                                       bias.contiguous() if bias is not None else None, A_stack.view(-1, K),
                                       B_stack.view(-1, rank), 1.0, row_adapter=row_adapter, adapter_rank=rank)


@dataclass
class MixedCall:
    """One mixed-batch call: its arguments as given (x of any leading dims until prepared as 2-D rows, with ``index``
    then each row's adapter). Per adapter: A, B, scaling, dropout rate and magnitude (None for plain LoRA)."""

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    lora_As: list
    lora_Bs: list
    scalings: list
    adapter_index: Tensor
    dropout_ps: list
    training: bool
    magnitudes: list
    trained_magnitudes: bool = False
    seed: int = -1  # the caller's dropout seed, -1: drawn per call
    index: Tensor | None = None  # once prepared: adapter_index as one int64 row index
    lead: tuple | None = None  # once prepared: x's leading dims

    @property
    def ps(self) -> list:
        """Each adapter's dropout applied: none outside training."""
        return [float(p) if self.training else 0.0 for p in self.dropout_ps]

    def dora_norms(self):
        """Each DoRA adapter's row norms and column scale (None for plain LoRA adapters)."""
        n = len(self.lora_As)
        norms, scales = [None] * n, [None] * n
        for a, m in enumerate(self.magnitudes):
            if m is not None:
                norms[a] = dora_norm_on("torch", self.weight, self.lora_As[a].detach(), self.lora_Bs[a].detach(),
                                        self.scalings[a])
                scales[a] = dora_scale(m.detach(), norms[a])
        return norms, scales


# Each trainable backend plans a call as (autograd Function, its arguments). Eager calls apply the Function; the
# registered op's backward (compiled graphs) runs the same Function's forward and backward outside autograd.

def _triton_plan(call: MixedCall):
    from ..kernels import lora_mixed as kernels
    n = len(call.lora_As)
    norms, scales = call.dora_norms()
    meta = _Meta([], call.scalings, call.ps, call.seed, scales, norms,
                 tiles=kernels.mixed_tiles(call.index, n, call.x.device))
    return _MixedLoraLinearTriton, (call.x, call.weight, call.bias, meta, *call.lora_As, *call.lora_Bs,
                                    *call.magnitudes)


def _torch_plan(call: MixedCall):
    norms, scales = call.dora_norms()
    args = (call.x, call.weight, call.bias)
    adapters = (*call.lora_As, *call.lora_Bs, *call.magnitudes)
    if all(m is None for m in call.magnitudes) and bool((call.index != BASE_INDEX).any()):
        block = sample_blocks(call.adapter_index)
        if block is not None:  # one adapter per sample of >= MIN_BLOCK_ROWS rows: batched GEMMs
            samples = call.adapter_index.reshape(call.adapter_index.shape[0], -1)[:, 0].to(torch.long)
            meta = _Meta([], call.scalings, call.ps, call.seed, scales, norms, block, samples)
            return _MixedLoraLinearBlocks, (*args, meta, *adapters)
    meta = _Meta(group_rows(call.index), call.scalings, call.ps, call.seed, scales, norms)
    return _MixedLoraLinear, (*args, meta, *adapters)


class _Context:
    """What the Functions' forward and backward read of ctx, to run both outside autograd."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _applied(plan):
    def forward(call: MixedCall) -> Tensor:
        function, args = plan(call)
        return function.apply(*args)
    return forward


def _recomputed(plan):
    def backward(call: MixedCall, dy: Tensor, needs: list[bool]) -> list:
        """Gradients of [x, bias, *lora_As, *lora_Bs, *magnitudes] (None where not asked for): the forward again on
        the call's seed (the same masks), then its backward."""
        function, args = plan(call)
        needs_x, needs_bias, *needs_adapters = needs
        ctx = _Context((needs_x, False, needs_bias, False, *needs_adapters))
        with torch.no_grad():
            function.forward(ctx, *args)
            grads = function.backward(ctx, dy)
        return [grads[0], grads[2], *grads[4:]]
    return backward


def _cuda_mixed(call: MixedCall) -> Tensor:
    return _decode(call.x, call.weight, call.bias, call.lora_As, call.lora_Bs, call.scalings, call.index)


def _triton_mixed_reasons(x2d, lora_As, index, dropout, dora) -> list[str]:
    return ["DoRA adapters in a mixed batch run on the torch backend"] if dora else []


# The mixed op's backends, chosen by select_backend like every op's. auto on CUDA tensors takes the first that can
# run the call, in backends.CUDA_PREFERENCE: the decode kernel for a few inference rows, the fused kernels, torch.
MIXED_BACKENDS = {
    "torch": Backend(forward=_applied(_torch_plan), backward=_recomputed(_torch_plan)),
    "triton": Backend(forward=_applied(_triton_plan), backward=_recomputed(_triton_plan),
                      reasons=_triton_mixed_reasons),
    "cuda": Backend(forward=_cuda_mixed, reasons=_decode_reasons),
}


# ----------------------------------------------------------------------------------------------------------
# torch.library ops (what compiled graphs keep): forward runs the backend's Function without autograd and returns the
# seed it used; backward runs the Function's forward again on that seed, then its backward (one more forward than
# eager autograd, which keeps the Function's own saved tensors: a compiled graph cannot hold them).
# Per-adapter tensors come as lists; magnitudes only for the adapters marked in ``dora``.
# ----------------------------------------------------------------------------------------------------------

def _graph_call(x, weight, bias, lora_As, lora_Bs, magnitudes, dora, scalings, dropout_ps, seed, adapter_index):
    given = iter(magnitudes)
    mags = [next(given) if has else None for has in dora]
    return MixedCall(x, weight, bias, list(lora_As), list(lora_Bs), list(scalings), adapter_index, list(dropout_ps),
                     True, mags, True, seed, adapter_index.reshape(-1).to(torch.long))


@torch.library.custom_op("fastpeft::lora_linear_mixed_forward", mutates_args=())
def lora_linear_mixed_forward(x: Tensor, bias: Tensor | None, lora_As: list[Tensor], lora_Bs: list[Tensor],
                              magnitudes: list[Tensor], weight: Tensor, dora: list[bool], scalings: list[float],
                              dropout_ps: list[float], seed: int, adapter_index: Tensor, backend: str
                              ) -> tuple[Tensor, Tensor]:
    """``(y, seed)`` for 2-D x (M, K): the mixed batch on ``backend``, and the dropout seed used (a negative ``seed``
    draws one here, inside the op, so a compiled graph draws it exactly like eager)."""
    entry = autograd_backend(MIXED_BACKENDS, backend)
    _check_index_values(adapter_index, len(lora_As))  # (a compiled caller's checks could not read the values)
    seed = seed_to_use(seed, max(dropout_ps))
    call = _graph_call(x, weight, bias, lora_As, lora_Bs, magnitudes, dora, scalings, dropout_ps, seed, adapter_index)
    with torch.no_grad():
        y = entry.forward(call)
    return y, torch.tensor(seed, dtype=torch.int64)


@lora_linear_mixed_forward.register_fake
def _(x, bias, lora_As, lora_Bs, magnitudes, weight, dora, scalings, dropout_ps, seed, adapter_index, backend):
    autograd_backend(MIXED_BACKENDS, backend)
    return x.new_empty((x.shape[0], weight.shape[0])), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("fastpeft::lora_linear_mixed_backward", mutates_args=())
def lora_linear_mixed_backward(dy: Tensor, x: Tensor, bias: Tensor | None, lora_As: list[Tensor],
                               lora_Bs: list[Tensor], magnitudes: list[Tensor], weight: Tensor, dora: list[bool],
                               scalings: list[float], dropout_ps: list[float], seed: Tensor, adapter_index: Tensor,
                               backend: str, needs: list[bool]) -> list[Tensor]:
    """Gradients of [x, bias, *lora_As, *lora_Bs, *magnitudes] for 2-D dy (M, N); empty where not asked for."""
    entry = autograd_backend(MIXED_BACKENDS, backend)
    call = _graph_call(x, weight, bias, lora_As, lora_Bs, magnitudes, dora, scalings, dropout_ps, int(seed),
                       adapter_index)
    n = len(lora_As)
    given = iter(needs[2 + 2 * n:])
    grads = entry.backward(call, dy, [*needs[:2 + 2 * n], *(next(given) if has else False for has in dora)])
    dms = [dm for dm, has in zip(grads[2 + 2 * n:], dora, strict=True) if has]
    # (an op's outputs may not alias one another: the adapters' gradients can be views of one stacked tensor)
    return [dy.new_empty(0) if g is None else g.clone() if g._base is not None else g
            for g in (*grads[:2 + 2 * n], *dms)]


@lora_linear_mixed_backward.register_fake
def _(dy, x, bias, lora_As, lora_Bs, magnitudes, weight, dora, scalings, dropout_ps, seed, adapter_index, backend,
      needs):
    autograd_backend(MIXED_BACKENDS, backend)
    tensors = [x, bias, *lora_As, *lora_Bs, *magnitudes]
    return [t.new_empty(t.shape) if need and t is not None else dy.new_empty(0)
            for t, need in zip(tensors, needs, strict=True)]


def _setup_context(ctx, inputs, output):
    x, bias, lora_As, lora_Bs, magnitudes, weight, dora, scalings, dropout_ps, _, adapter_index, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, bias, weight, adapter_index, output[1], *lora_As, *lora_Bs, *magnitudes)
    ctx.n, ctx.dora, ctx.scalings, ctx.dropout_ps, ctx.backend = len(lora_As), dora, scalings, dropout_ps, backend


def _backward(ctx, dy, unused):
    n = ctx.n
    needs_x, needs_bias, needs_As, needs_Bs, needs_mags = ctx.needs_input_grad[:5]  # (lists for list inputs)
    needs = [bool(needs_x), bool(needs_bias), *needs_As, *needs_Bs, *needs_mags]
    grads = [None] * len(needs)
    if dy is not None:
        x, bias, weight, adapter_index, seed, *adapters = ctx.saved_tensors
        lora_As, lora_Bs, magnitudes = adapters[:n], adapters[n:2 * n], adapters[2 * n:]
        grads = lora_linear_mixed_backward(dy, x, bias, lora_As, lora_Bs, magnitudes, weight, ctx.dora, ctx.scalings,
                                           ctx.dropout_ps, seed, adapter_index, ctx.backend, needs)
        grads = [g if need else None for g, need in zip(grads, needs, strict=True)]
    # (the gradients in the inputs' structure: a list for each list of tensors, None for the rest)
    return (grads[0], grads[1], grads[2:2 + n], grads[2 + n:2 + 2 * n], grads[2 + 2 * n:], *[None] * 7)


lora_linear_mixed_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# The op in the call frame, checks and the public function
# ----------------------------------------------------------------------------------------------------------

class _LoraLinearMixed(FusedOp):
    name = "lora_linear_mixed"
    backends = MIXED_BACKENDS
    cached = False  # the index's values decide the checks and the backends' reasons
    measured = False  # auto takes the first backend that can run the call

    def autocast(self, call, dtype):  # as lora_linear does
        return dataclasses.replace(call, x=autocast_cast(call.x, dtype), weight=autocast_cast(call.weight, dtype),
                                   bias=autocast_cast(call.bias, dtype))

    def check(self, call):
        for a in range(len(call.lora_As)):  # each adapter as lora_linear would check it, named by its position
            try:
                check_finite_number("scaling", call.scalings[a])
                check_probability("dropout_p", call.dropout_ps[a])
                check_inputs(call.x, call.weight, call.bias, call.lora_As[a], call.lora_Bs[a], call.scalings[a],
                             call.dropout_ps[a], call.magnitudes[a], check_values=not call.trained_magnitudes)
            except (TypeError, ValueError) as err:
                raise type(err)(f"adapter {a}: {err}") from None
        _check_index(call.adapter_index, call.x, len(call.lora_As))
        check_same_device({"x": call.x, "adapter_index": call.adapter_index})

    def prepare(self, call):
        return dataclasses.replace(call, x=call.x.reshape(-1, call.x.shape[-1]), lead=tuple(call.x.shape[:-1]),
                                   index=call.adapter_index.reshape(-1).to(torch.long),
                                   scalings=[float(s) for s in call.scalings])

    def tensors(self, call):
        return [call.x, call.weight, *call.lora_As, *call.lora_Bs] + ([call.bias] if call.bias is not None else [])

    def reasons_call(self, call):
        return (call.x, call.lora_As, call.index, max(call.ps) > 0.0, any(m is not None for m in call.magnitudes))

    def trainable(self, call):
        return [call.x, call.bias, *call.lora_As, *call.lora_Bs, *call.magnitudes]

    def _seeded(self, call):
        return dataclasses.replace(call, seed=seed_to_use(call.seed, max(call.ps)))

    def forward(self, entry, call):
        return entry.forward(self._seeded(call))

    def function(self, name, call):  # (each backend's forward applies its own autograd Function, as with no grad)
        return self.backends[name].forward(self._seeded(call))

    def registered(self, name, call):
        dora = [m is not None for m in call.magnitudes]
        magnitudes = [m for m in call.magnitudes if m is not None]
        return lora_linear_mixed_forward(call.x, call.bias, call.lora_As, call.lora_Bs, magnitudes, call.weight, dora,
                                         call.scalings, call.ps, call.seed, call.adapter_index, name)[0]

    def finish(self, call, out):
        return out.reshape(*call.lead, out.shape[-1])


LORA_LINEAR_MIXED = _LoraLinearMixed()


def _as_list(name, value, n, default=None):
    if value is None:
        return [default] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{name} must be a list of {n} entries (one per adapter), got {value!r}")
    return list(value)


def _check_index(adapter_index, x, n):
    check_adapter_index(adapter_index, x)
    if not torch.compiler.is_compiling():  # (traced, the values are checked inside the registered op)
        _check_index_values(adapter_index, n)


_check_index_values = check_adapter_index_values


def lora_linear_mixed(x, weight, bias, lora_As, lora_Bs, scalings, adapter_index, dropout_ps=None, training=True,
                      backend=None, *, dropout_seed=None, magnitudes=None, _trained_magnitudes=False):
    """A batch whose rows take different LoRA adapters over one frozen base, in one call.

    Args:
        x: (..., K). weight (N, K), bias (N,) or None: as for :func:`lora_linear`.
        lora_As, lora_Bs: one (r_a, K) / (N, r_a) pair per adapter; ranks and dtypes may differ between adapters.
        scalings: one LoRA scale per adapter. dropout_ps: one dropout probability per adapter (default 0), applied
            to that adapter's rows when ``training``.
        adapter_index: integer tensor of x's leading shape: the adapter of each row, -1 for the base alone.
        magnitudes: None, or one DoRA magnitude (N,) or None per adapter.
        backend: "auto", "torch" (any device), "triton" (the fused kernels, reading each tile's rows and adapter
            from tables; not with DoRA adapters) or "cuda" (decode, inference only); auto takes the first of them
            that can run the call on CUDA tensors, torch on the CPU. None reads ``$FASTPEFT_BACKEND``.
    Returns (..., N). Differentiable in x, bias and every adapter's tensors; rows of adapter a update adapter a only.
    Under ``torch.compile`` the call is one registered op (its backward runs the forward again, on the same seed).
    """
    if not isinstance(lora_As, (list, tuple)) or not isinstance(lora_Bs, (list, tuple)):
        raise TypeError("lora_As and lora_Bs must be lists of tensors, one per adapter")
    if isinstance(weight, QuantizedWeight):  # (before autocast's cast, which a quantised weight does not take)
        raise ValueError(f"weight is a {weight.label}: mixed-adapter batches over a {weight.base_name} are not "
                         "supported; run one adapter at a time (fastpeft.lora_linear takes it)")
    n = len(lora_As)
    if n == 0 or len(lora_Bs) != n:
        raise ValueError(f"lora_As and lora_Bs must hold one tensor per adapter, at least one; got {len(lora_As)} "
                         f"and {len(lora_Bs)}")
    check_training(training)
    check_dropout_seed(dropout_seed)
    call = MixedCall(x, weight, bias, list(lora_As), list(lora_Bs), _as_list("scalings", scalings, n), adapter_index,
                     _as_list("dropout_ps", dropout_ps, n, 0.0), training, _as_list("magnitudes", magnitudes, n),
                     _trained_magnitudes, -1 if dropout_seed is None else int(dropout_seed))
    return LORA_LINEAR_MIXED(call, backend)
