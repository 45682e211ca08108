"""The torch and Triton autograd Functions of a mixed-adapter batch (``lora_linear_mixed``'s backends): the rows of
each adapter grouped (contiguous runs used in place, or sorted and gathered once), samples of one adapter each in
batched GEMMs, and the Triton kernels' MIXED tiles (``kernels/lora_mixed.py``) over the adapters stacked. Each
Function's forward takes ``(x, weight, bias, meta, *lora_As, *lora_Bs, *magnitudes)`` on 2-D x.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import refuse_double_backward
from .lora_checks import BASE_INDEX  # (rows that take no adapter)
from .lora_dora import magnitude_grad
from .lora_dropout import DROPOUT_SEED_LIMIT, torch_drop_mask, torch_uniform16

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
