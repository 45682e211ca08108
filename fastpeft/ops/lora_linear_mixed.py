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
the float64-checkable reference, the torch grouping and its autograd Functions, the Triton Function, the CUDA
stacking, checks and the public function.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import Backend, autograd_backend, refuse_double_backward
from ..checks import check_finite_number, check_probability, check_same_device, check_training
from ..quantized import QuantizedWeight
from .frame import FusedOp
from .lora_checks import check_inputs
from .lora_dora import dora_norm_on, dora_scale, magnitude_grad
from .lora_dropout import DROPOUT_SEED_LIMIT, check_dropout_seed, seed_to_use, torch_drop_mask, torch_uniform16
from .lora_linear import lora_linear_reference

BASE_INDEX = -1  # rows that take no adapter


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


# ----------------------------------------------------------------------------------------------------------
# Grouping: the rows of each adapter, as contiguous runs (views) or as one gathered set per adapter.
# ----------------------------------------------------------------------------------------------------------

# Above this many runs per adapter present, the rows are sorted and gathered rather than walked run by run.
RUNS_PER_ADAPTER = 4


@dataclass
class Group:
    adapter: int
    rows: slice | Tensor  # a contiguous run, or the (sorted) row indices of the adapter


def group_rows(index: Tensor) -> list[Group]:
    """The row groups of a 1-D adapter index (on any device; read once on the host), base rows left out."""
    host = index.cpu()
    M = host.numel()
    if M == 0:
        return []
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (host[1:] != host[:-1]).nonzero().flatten() + 1])
    adapters = host[starts].tolist()
    present = {a for a in adapters if a != BASE_INDEX}
    if len(starts) <= RUNS_PER_ADAPTER * max(1, len(present)):
        ends = starts[1:].tolist() + [M]
        return [Group(a, slice(s, e)) for a, s, e in zip(adapters, starts.tolist(), ends, strict=True)
                if a != BASE_INDEX]
    groups = []
    for a in sorted(present):
        rows = (host == a).nonzero().flatten().to(index.device)
        groups.append(Group(a, rows))
    return groups


def _rows(t: Tensor, rows):
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _add_rows(out: Tensor, rows, value: Tensor) -> None:
    if isinstance(rows, slice):
        out[rows] += value
    else:
        out.index_add_(0, rows, value)


# ----------------------------------------------------------------------------------------------------------
# The autograd Function (torch backend)
# ----------------------------------------------------------------------------------------------------------

class _MixedLoraLinear(torch.autograd.Function):
    """Forward and backward of a mixed batch on 2-D x. Inputs after the fixed ones: every adapter's A, then every
    B, then every magnitude (None for plain LoRA); ``meta`` holds the groups, scalings, dropouts, norms and seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, meta, *adapter_tensors):
        n = len(meta.scalings)
        lora_As, lora_Bs, magnitudes = adapter_tensors[:n], adapter_tensors[n:2 * n], adapter_tensors[2 * n:]
        dtype = x.dtype
        dora = any(m is not None for m in magnitudes)
        # the bias is added last where DoRA scales rows before it, else by the base GEMM itself
        y = torch.addmm(bias, x, weight.t()) if bias is not None and not dora else torch.mm(x, weight.t())
        saved = []  # per group: (S, drop mask or None, pre or None)
        for i, g in enumerate(meta.groups):
            a = g.adapter
            xs = _rows(x, g.rows)
            p = meta.dropout_ps[a]
            drop = None
            if p > 0.0:  # each group its own mask, drawn from the call's seed and the group's position
                drop = torch_drop_mask((meta.seed + 7919 * i) % DROPOUT_SEED_LIMIT, xs.shape, p, x.device)
                s = torch.mm(xs.masked_fill(drop, 0.0), lora_As[a].to(dtype).t()).mul_(1.0 / (1.0 - p))
            else:
                s = torch.mm(xs, lora_As[a].to(dtype).t())
            b_t = lora_Bs[a].to(dtype).t()
            pre = None
            if magnitudes[a] is None:
                if isinstance(g.rows, slice):  # a run: accumulated in place, no temporary
                    y[g.rows].addmm_(s, b_t, alpha=meta.scalings[a])
                else:
                    y.index_add_(0, g.rows, torch.mm(s, b_t), alpha=meta.scalings[a])
            else:  # DoRA: this group's rows scaled per column before the bias
                term = torch.mm(s, b_t).mul_(meta.scalings[a])
                rows_pre = _rows(y, g.rows) + term
                if ctx.needs_input_grad[4 + 2 * n + a]:
                    pre = rows_pre
                scaled = rows_pre * meta.scales[a].to(dtype)
                if isinstance(g.rows, slice):
                    y[g.rows] = scaled
                else:
                    y.index_copy_(0, g.rows, scaled)
            saved.append((s, drop, pre))
        if bias is not None and dora:
            y += bias
        ctx.meta = meta
        ctx.saved_groups = saved
        ctx.save_for_backward(x if any(ctx.needs_input_grad[4:4 + n]) else None, weight, *adapter_tensors)
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("lora_linear_mixed", "run one adapter at a time (lora_linear), or ")
        meta = ctx.meta
        n = len(meta.scalings)
        x, weight, *adapter_tensors = ctx.saved_tensors
        lora_As, lora_Bs, magnitudes = adapter_tensors[:n], adapter_tensors[n:2 * n], adapter_tensors[2 * n:]
        needs = ctx.needs_input_grad
        dtype = dy.dtype
        grads_A = [None] * n
        grads_B = [None] * n
        grads_m = [None] * n
        dbias = dy.sum(0) if needs[2] else None
        # DoRA rows: dY scaled per column for everything but the bias (dm takes the unscaled dY)
        dy_eff = dy
        if any(magnitudes[g.adapter] is not None for g in meta.groups):
            dy_eff = dy.clone()
            for g, (_, _, pre) in zip(meta.groups, ctx.saved_groups, strict=True):
                a = g.adapter
                if magnitudes[a] is None:
                    continue
                rows_dy = _rows(dy, g.rows)
                if pre is not None:
                    part = (rows_dy * pre).sum(0, dtype=torch.promote_types(dtype, torch.float32))
                    dm = magnitude_grad(part, meta.norms[a], magnitudes[a].dtype)
                    grads_m[a] = dm if grads_m[a] is None else grads_m[a] + dm
                scaled = rows_dy * meta.scales[a].to(dtype)
                if isinstance(g.rows, slice):
                    dy_eff[g.rows] = scaled
                else:
                    dy_eff.index_copy_(0, g.rows, scaled)
        dx = torch.mm(dy_eff, weight) if needs[0] else None
        for g, (s, drop, _) in zip(meta.groups, ctx.saved_groups, strict=True):
            a = g.adapter
            if not (needs[0] or needs[4 + a] or needs[4 + n + a]):
                continue
            p = meta.dropout_ps[a]
            keep_scale = 1.0 / (1.0 - p)
            dys = _rows(dy_eff, g.rows)
            ds = torch.mm(dys, lora_Bs[a].to(dtype)).mul_(meta.scalings[a])
            if needs[4 + n + a]:
                db = torch.mm(dys.t(), s).mul_(meta.scalings[a]).to(lora_Bs[a].dtype)
                grads_B[a] = db if grads_B[a] is None else grads_B[a] + db
            if needs[4 + a]:
                xs = _rows(x, g.rows)
                if drop is not None:
                    xs = xs.masked_fill(drop, 0.0)
                da = torch.mm(ds.t(), xs).mul_(keep_scale if drop is not None else 1.0).to(lora_As[a].dtype)
                grads_A[a] = da if grads_A[a] is None else grads_A[a] + da
            if needs[0]:
                if drop is None and isinstance(g.rows, slice):
                    dx[g.rows].addmm_(ds, lora_As[a].to(dtype))
                else:
                    term = torch.mm(ds, lora_As[a].to(dtype))
                    if drop is not None:
                        term.mul_(keep_scale).masked_fill_(drop, 0.0)
                    _add_rows(dx, g.rows, term)
        # adapters with no rows in the batch get zero gradients (they took part, with nothing to learn)
        for a in range(n):
            if needs[4 + a] and grads_A[a] is None:
                grads_A[a] = torch.zeros_like(lora_As[a])
            if needs[4 + n + a] and grads_B[a] is None:
                grads_B[a] = torch.zeros_like(lora_Bs[a])
            if magnitudes[a] is not None and needs[4 + 2 * n + a] and grads_m[a] is None:
                grads_m[a] = torch.zeros_like(magnitudes[a])
        return (dx, None, dbias, None, *grads_A, *grads_B, *grads_m)


# Samples of at least this many rows (tokens) each, one adapter per sample, take the batched path.
MIN_BLOCK_ROWS = 16


def sample_blocks(adapter_index: Tensor) -> int | None:
    """L when the index is constant over each sample's rows (x of shape (B, ..., K): one adapter per sample, as a
    batch of sequences has) with L = rows per sample >= MIN_BLOCK_ROWS; else None."""
    if adapter_index.dim() < 2 or adapter_index.shape[0] == 0:
        return None
    per_sample = adapter_index.reshape(adapter_index.shape[0], -1)
    L = per_sample.shape[1]
    if L < MIN_BLOCK_ROWS or not bool((per_sample == per_sample[:, :1]).all()):
        return None
    return L


class _MixedLoraLinearBlocks(torch.autograd.Function):
    """A mixed batch of samples of L rows each, one adapter per sample, no DoRA: every sample's low-rank term in
    batched GEMMs (one ``bmm`` for S, one ``baddbmm_`` onto y's (B, L, N) view), whatever the number of adapters.
    Each sample's A and B are stacked once per call (ranks padded with zeros to the largest; base samples take
    zeros), its scaling applied to its S. Dropout draws one mask over x, each sample at its adapter's rate."""

    @staticmethod
    def forward(ctx, x, weight, bias, meta, *adapter_tensors):
        n = len(meta.scalings)
        lora_As, lora_Bs = adapter_tensors[:n], adapter_tensors[n:2 * n]
        dtype, device = x.dtype, x.device
        L = meta.block
        samples = meta.sample_adapter.tolist()
        B, K, N = len(samples), x.shape[1], weight.shape[0]
        present = sorted({a for a in samples if a != BASE_INDEX})
        r_max = max(lora_As[a].shape[0] for a in present)
        padded_A, padded_B = {}, {}
        for a in present:
            r = lora_As[a].shape[0]
            padded_A[a] = lora_As[a].to(dtype) if r == r_max else torch.cat(
                [lora_As[a].to(dtype), x.new_zeros((r_max - r, K))])
            padded_B[a] = lora_Bs[a].to(dtype) if r == r_max else torch.cat(
                [lora_Bs[a].to(dtype), x.new_zeros((N, r_max - r))], dim=1)
        if len(present) < B:  # base samples
            padded_A[BASE_INDEX], padded_B[BASE_INDEX] = x.new_zeros((r_max, K)), x.new_zeros((N, r_max))
        A_s = torch.stack([padded_A[a] for a in samples])  # (B, r_max, K)
        B_s = torch.stack([padded_B[a] for a in samples])  # (B, N, r_max)
        row_p = [meta.dropout_ps[a] if a != BASE_INDEX else 0.0 for a in samples]
        # per sample: s_a, and 1/(1-p) where it drops
        scale = torch.tensor([(meta.scalings[a] if a != BASE_INDEX else 0.0) / (1.0 - p)
                              for a, p in zip(samples, row_p, strict=True)], device=device).view(B, 1, 1)  # fp32
        xb = x.view(B, L, K)
        drop = None
        if max(row_p) > 0.0:
            drop = _row_drop_mask(meta.seed, (B, L, K), torch.tensor(row_p, dtype=torch.float64), device)
            s = torch.bmm(xb.masked_fill(drop, 0.0), A_s.transpose(1, 2))
        else:
            s = torch.bmm(xb, A_s.transpose(1, 2))
        s.mul_(scale)
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        y.view(B, L, N).baddbmm_(s, B_s.transpose(1, 2))
        ctx.meta = meta
        ctx.save_for_backward(x if any(ctx.needs_input_grad[4:4 + n]) else None, weight, s, drop, A_s, B_s, scale,
                              *adapter_tensors[:2 * n])
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("lora_linear_mixed", "run one adapter at a time (lora_linear), or ")
        meta = ctx.meta
        n = len(meta.scalings)
        x, weight, s, drop, A_s, B_s, scale, *adapter_tensors = ctx.saved_tensors
        lora_As, lora_Bs = adapter_tensors[:n], adapter_tensors[n:2 * n]
        needs = ctx.needs_input_grad
        samples = meta.sample_adapter
        B, L = samples.shape[0], meta.block
        N, K = weight.shape
        dyb = dy.view(B, L, N)
        ds = torch.bmm(dyb, B_s).mul_(scale)  # (B, L, r_max): s_a/(1-p) · dY B
        dx = dbias = None
        if needs[0]:
            dx = torch.mm(dy, weight)
            if drop is None:
                dx.view(B, L, K).baddbmm_(ds, A_s)
            else:
                dx.view(B, L, K).add_(torch.bmm(ds, A_s).masked_fill_(drop, 0.0))
        if needs[2]:
            dbias = dy.sum(0)
        grads_A, grads_B = [None] * n, [None] * n
        which = torch.where(samples < 0, n, samples).to(dy.device)  # the base's rows summed into a discarded slot
        if any(needs[4 + n:4 + 2 * n]):
            db = dy.new_zeros((n + 1, N, s.shape[2])).index_add_(0, which, torch.bmm(dyb.transpose(1, 2), s))
        if any(needs[4:4 + n]):
            xb = x.view(B, L, K) if drop is None else x.view(B, L, K).masked_fill(drop, 0.0)
            da = dy.new_zeros((n + 1, s.shape[2], K)).index_add_(0, which, torch.bmm(ds.transpose(1, 2), xb))
        present = set(samples.tolist())
        for a in range(n):  # an adapter without samples (its rank maybe above the padding) gets zeros
            r = lora_As[a].shape[0]
            if needs[4 + a]:
                grads_A[a] = da[a, :r].to(lora_As[a].dtype) if a in present else torch.zeros_like(lora_As[a])
            if needs[4 + n + a]:
                grads_B[a] = db[a, :, :r].to(lora_Bs[a].dtype) if a in present else torch.zeros_like(lora_Bs[a])
        return (dx, None, dbias, None, *grads_A, *grads_B, *([None] * n))


def _row_drop_mask(seed, shape, row_p, device):
    """Drop-mask (True = dropped) of a (B, L, K) input, sample b at rate row_p[b] (float64, on the host), from one
    draw over all of it (the torch backend's 16-bit uniforms, as :func:`torch_drop_mask`)."""
    threshold = (-32768 + torch.round(row_p * 65536)).to(torch.int16).to(device).view(-1, 1, 1)
    return torch.lt(torch_uniform16(seed, shape, device), threshold)


@dataclass
class _Meta:
    groups: list
    scalings: list
    dropout_ps: list
    seed: int
    scales: list  # DoRA's column scale per adapter (None for plain LoRA)
    norms: list
    block: int | None = None  # the batched path: rows per sample
    sample_adapter: Tensor | None = None  # (B,) the adapter of each sample, -1 for the base
    tiles: object = None  # the Triton path's tiles (kernels.MixedTiles)


class _MixedLoraLinearTriton(torch.autograd.Function):
    """A mixed batch on the Triton kernels (no DoRA): the adapters stacked (ranks zero-padded to the largest), the
    rows in tiles of one adapter each, read through tables by the shrink, the seeded fused GEMM and the backward
    kernels, with no gather of x and no scatter of y."""

    @staticmethod
    def forward(ctx, x, weight, bias, meta, *adapter_tensors):
        from ..kernels import lora_mixed as kernels
        n = len(meta.scalings)
        lora_As, lora_Bs = adapter_tensors[:n], adapter_tensors[n:2 * n]
        A_stack, B_stack = _stacked(lora_As, lora_Bs, x.dtype)
        y, s = kernels.lora_mixed_fwd(x, weight, bias, A_stack, B_stack, meta.scalings, meta.dropout_ps, meta.seed,
                                      meta.tiles)
        ctx.meta = meta
        ctx.save_for_backward(x if any(ctx.needs_input_grad[4:4 + 2 * n]) else None, weight, s, A_stack, B_stack,
                              *adapter_tensors[:2 * n])
        return y

    @staticmethod
    def backward(ctx, dy):
        from ..kernels import lora_mixed as kernels
        refuse_double_backward("lora_linear_mixed", "run one adapter at a time (lora_linear), or ")
        meta = ctx.meta
        n = len(meta.scalings)
        x, weight, s, A_stack, B_stack, *adapter_tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, da, db, dbias = kernels.lora_mixed_bwd(dy, x, weight, A_stack, B_stack, s, meta.scalings,
                                                   meta.dropout_ps, meta.seed, meta.tiles, needs[0],
                                                   any(needs[4:4 + 2 * n]), needs[2])
        grads_A = [da[a, :t.shape[0]].to(t.dtype) if needs[4 + a] else None
                   for a, t in enumerate(adapter_tensors[:n])]
        grads_B = [db[a, :, :t.shape[1]].to(t.dtype) if needs[4 + n + a] else None
                   for a, t in enumerate(adapter_tensors[n:2 * n])]
        return (dx, None, dbias, None, *grads_A, *grads_B, *([None] * n))


def _stacked(lora_As, lora_Bs, dtype):
    """(n, R, K) and (n, N, R) stacks of the adapters in ``dtype``, ranks zero-padded to the largest R."""
    r_max = max(a.shape[0] for a in lora_As)
    A_stack = torch.zeros((len(lora_As), r_max, lora_As[0].shape[1]), dtype=dtype, device=lora_As[0].device)
    B_stack = torch.zeros((len(lora_Bs), lora_Bs[0].shape[0], r_max), dtype=dtype, device=lora_Bs[0].device)
    for a, (A, B) in enumerate(zip(lora_As, lora_Bs, strict=True)):
        A_stack[a, :A.shape[0]] = A.detach()
        B_stack[a, :, :B.shape[1]] = B.detach()
    return A_stack, B_stack


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
        return dataclasses.replace(call, x=call.x.to(dtype), weight=call.weight.to(dtype),
                                   bias=None if call.bias is None else call.bias.to(dtype))

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

    def function(self, name, call):
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
    if not isinstance(adapter_index, Tensor):
        raise TypeError(f"adapter_index must be an integer tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"adapter_index must be an integer tensor, got {adapter_index.dtype}")
    if tuple(adapter_index.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"adapter_index must have x's leading shape {tuple(x.shape[:-1])} (one adapter per row), got "
                         f"{tuple(adapter_index.shape)}")
    if adapter_index.numel() and not torch.compiler.is_compiling():  # (a compiled graph cannot read values)
        low, high = int(adapter_index.min()), int(adapter_index.max())
        if low < BASE_INDEX or high >= n:
            raise ValueError(f"adapter_index values must be in [-1, {n - 1}] (-1: the base alone; {n} adapters), got "
                             f"values from {low} to {high}")


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
