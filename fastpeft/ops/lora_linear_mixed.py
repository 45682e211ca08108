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

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import (
    Backend,
    refuse_double_backward,
    select_backend,
)
from ..checks import check_finite_number, check_probability, check_same_device
from ..nf4 import NF4Weight
from .lora_linear import (
    DROPOUT_SEED_LIMIT,
    _check_inputs,
    _dora_norm_on,
    _magnitude_grad,
    _seed_to_use,
    dora_scale,
    lora_linear_reference,
    torch_drop_mask,
    torch_uniform16,
)

BASE_INDEX = -1  # rows that take no adapter


def lora_linear_mixed_reference(x, weight, bias, lora_As, lora_Bs, scalings, adapter_index, keep_masks=None,
                                dropout_ps=None, magnitudes=None):
    """Each row through :func:`lora_linear_reference` with its own adapter (plain autograd ops; run it in float64).

    keep_masks: None, or per adapter None / a bool keep-mask of x's shape (True = keep) applied to that adapter's
    rows. An :class:`fastpeft.nf4.NF4Weight` is dequantised (to its dtype), as by :func:`lora_linear_reference`."""
    if isinstance(weight, NF4Weight):
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
                    dm = _magnitude_grad(part, meta.norms[a], magnitudes[a].dtype)
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
class _Call:
    """One mixed-batch call, its arguments checked: x as 2-D rows, each row's adapter (``index``), dropout
    probabilities already 0 outside training."""

    x2d: Tensor
    weight: Tensor
    bias: Tensor | None
    lora_As: list
    lora_Bs: list
    magnitudes: list
    scalings: list
    ps: list
    seed: int
    index: Tensor
    adapter_index: Tensor

    def dora_norms(self):
        """Each DoRA adapter's row norms and column scale (None for plain LoRA adapters)."""
        n = len(self.lora_As)
        norms, scales = [None] * n, [None] * n
        for a, m in enumerate(self.magnitudes):
            if m is not None:
                norms[a] = _dora_norm_on("torch", self.weight, self.lora_As[a].detach(), self.lora_Bs[a].detach(),
                                         self.scalings[a])
                scales[a] = dora_scale(m.detach(), norms[a])
        return norms, scales


def _cuda_mixed(call: _Call) -> Tensor:
    return _decode(call.x2d, call.weight, call.bias, call.lora_As, call.lora_Bs, call.scalings, call.index)


def _triton_mixed(call: _Call) -> Tensor:
    from ..kernels import lora_mixed as kernels
    n = len(call.lora_As)
    norms, scales = call.dora_norms()
    meta = _Meta([], call.scalings, call.ps, call.seed, scales, norms,
                 tiles=kernels.mixed_tiles(call.index, n, call.x2d.device))
    return _MixedLoraLinearTriton.apply(call.x2d, call.weight, call.bias, meta, *call.lora_As, *call.lora_Bs,
                                       *call.magnitudes)


def _torch_mixed(call: _Call) -> Tensor:
    norms, scales = call.dora_norms()
    args = (call.x2d, call.weight, call.bias)
    adapters = (*call.lora_As, *call.lora_Bs, *call.magnitudes)
    if all(m is None for m in call.magnitudes) and bool((call.index != BASE_INDEX).any()):
        block = sample_blocks(call.adapter_index)
        if block is not None:  # one adapter per sample of >= MIN_BLOCK_ROWS rows: batched GEMMs
            samples = call.adapter_index.reshape(call.adapter_index.shape[0], -1)[:, 0].to(torch.long)
            meta = _Meta([], call.scalings, call.ps, call.seed, scales, norms, block, samples)
            return _MixedLoraLinearBlocks.apply(*args, meta, *adapters)
    meta = _Meta(group_rows(call.index), call.scalings, call.ps, call.seed, scales, norms)
    return _MixedLoraLinear.apply(*args, meta, *adapters)


def _triton_mixed_reasons(x2d, lora_As, index, dropout, dora) -> list[str]:
    return ["DoRA adapters in a mixed batch run on the torch backend"] if dora else []


# The mixed op's backends, chosen by select_backend like every op's. auto on CUDA tensors takes the first that can
# run the call, in backends.CUDA_PREFERENCE: the decode kernel for a few inference rows, the fused kernels, torch.
# (The table's backward entries only mark which backends train: each forward builds its own autograd node.)
MIXED_BACKENDS = {
    "torch": Backend(forward=_torch_mixed, backward=_torch_mixed),
    "triton": Backend(forward=_triton_mixed, backward=_triton_mixed, reasons=_triton_mixed_reasons),
    "cuda": Backend(forward=_cuda_mixed, reasons=_decode_reasons),
}


# ----------------------------------------------------------------------------------------------------------
# Checks and the public function
# ----------------------------------------------------------------------------------------------------------

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
    if adapter_index.numel():
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
        backend: "auto", "torch" (any device) or "triton" (the fused kernels, reading each tile's rows and adapter
            from tables; not with DoRA adapters); auto takes triton for CUDA tensors where it can run. None reads
            ``$FASTPEFT_BACKEND``.
    Returns (..., N). Differentiable in x, bias and every adapter's tensors; rows of adapter a update adapter a only.
    """
    if not isinstance(lora_As, (list, tuple)) or not isinstance(lora_Bs, (list, tuple)):
        raise TypeError("lora_As and lora_Bs must be lists of tensors, one per adapter")
    if isinstance(weight, NF4Weight):  # (before autocast's cast, which an NF4Weight does not take)
        raise ValueError("weight is a 4-bit NF4Weight: mixed-adapter batches over a 4-bit base are not supported; "
                         "run one adapter at a time (fastpeft.lora_linear takes an NF4Weight)")
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):  # as lora_linear does
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    n = len(lora_As)
    if n == 0 or len(lora_Bs) != n:
        raise ValueError(f"lora_As and lora_Bs must hold one tensor per adapter, at least one; got {len(lora_As)} "
                         f"and {len(lora_Bs)}")
    scalings = _as_list("scalings", scalings, n)
    dropout_ps = _as_list("dropout_ps", dropout_ps, n, 0.0)
    magnitudes = _as_list("magnitudes", magnitudes, n)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a Python bool, got {type(training).__name__}")
    if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, numbers.Integral)
                                     or not 0 <= dropout_seed < DROPOUT_SEED_LIMIT):
        raise ValueError(f"dropout_seed must be None or an integer in [0, 2**32), got {dropout_seed!r}")
    for a in range(n):  # each adapter as lora_linear would check it, named by its position
        try:
            check_finite_number("scaling", scalings[a])
            check_probability("dropout_p", dropout_ps[a])
            _check_inputs(x, weight, bias, lora_As[a], lora_Bs[a], scalings[a], dropout_ps[a], magnitudes[a],
                          check_values=not _trained_magnitudes)
        except (TypeError, ValueError) as err:
            raise type(err)(f"adapter {a}: {err}") from None
    _check_index(adapter_index, x, n)
    check_same_device({"x": x, "adapter_index": adapter_index})
    tensors = [x, weight, *lora_As, *lora_Bs] + ([bias] if bias is not None else [])
    dora = any(m is not None for m in magnitudes)
    x2d = x.reshape(-1, x.shape[-1])
    index = adapter_index.reshape(-1).to(torch.long)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (x, bias, *lora_As, *lora_Bs, *magnitudes))
    ps = [float(p) if training else 0.0 for p in dropout_ps]
    name = select_backend(backend, tensors, MIXED_BACKENDS, call=(x2d, lora_As, index, max(ps) > 0.0, dora),
                          needs_grad=needs_grad)
    call = _Call(x2d, weight, bias, list(lora_As), list(lora_Bs), list(magnitudes), [float(s) for s in scalings], ps,
                 _seed_to_use(-1 if dropout_seed is None else int(dropout_seed), max(ps)), index, adapter_index)
    y = MIXED_BACKENDS[name].forward(call)
    return y.reshape(*x.shape[:-1], weight.shape[0])
