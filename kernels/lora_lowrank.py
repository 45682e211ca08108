"""The LoRA kernels around the fused GEMM, over the small low-rank tensors (r columns, fp32):

  ``_lora_shrink_kernel``  forward's S = drop(x) Aᵀ (M×r): reads x once, the dropout mask drawn in-kernel.
  ``_lora_bwd_dy_kernel``  one pass over dY: partial sums of dS = s·dY B (per column split) and of dB = s·dYᵀ S and
                           db (per row block); DoRA's dm partials and dZ beside them.
  ``_lora_bwd_da_kernel``  dA = dSᵀ drop(x), the mask regenerated from the seed; split over rows, partials.

Partial sums are reduced with ``torch.sum`` by the launchers (no float atomics), so results are deterministic. Each
kernel also runs a mixed-adapter batch (MIXED), its row tiles read through the tables (``_mixed_tile``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .lora_dropout import _dropout_keep
from .lora_gemm import _mixed_tile


@triton.jit(do_not_specialize=["seed"])
def _lora_shrink_kernel(
    x_ptr, lora_a_ptr, s_ptr, rows_ptr, tile_adapter_ptr, tile_p_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_aa,
    seed, p, keep_scale,
    DROPOUT: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, MIXED: tl.constexpr,
):
    """S (M, R) fp32 = drop(x (M, K)) · A (R, K)ᵀ; one program per BLOCK_M rows, looping over K.
    MIXED (a mixed-adapter batch): program i takes the rows listed for tile i (-1: padding), adapter
    ``tile_adapter[i]`` (A at lora_a_ptr + adapter·stride_aa; -1: the base, whose S is 0) and its dropout rate."""
    if MIXED:
        rows, m_ok, adapter = _mixed_tile(rows_ptr, tile_adapter_ptr, tl.program_id(0), BLOCK_M)
        rm = tl.where(m_ok, rows, 0)
        lora_a_ptr += tl.maximum(adapter, 0).to(tl.int64) * stride_aa
        p = tl.load(tile_p_ptr + tl.program_id(0))
        keep_scale = 1.0 / (1.0 - p)
    else:
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    r_ok = rr < R
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    lora_a_ptrs = lora_a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak  # the (BLOCK_K, BLOCK_R) tile of Aᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(COMPUTE)
        a = tl.load(lora_a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(COMPUTE)
        if DROPOUT:
            x = tl.where(_dropout_keep(seed, p, rm, k0, K, BLOCK_K), x, 0.0)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        lora_a_ptrs += BLOCK_K * stride_ak
    if DROPOUT:
        acc = acc * keep_scale
    if MIXED:
        acc = tl.where(adapter >= 0, acc, 0.0)
    tl.store(s_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_bwd_dy_kernel(
    dy_ptr, lora_b_ptr, s_ptr, ds_part_ptr, db_part_ptr, dbias_part_ptr, col_scale_ptr, pre_ptr, dm_part_ptr, dz_ptr,
    rows_ptr, tile_adapter_ptr, tile_lowrank_scale_ptr,
    M, N, R, M_BUCKET, cols_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_ba,
    scaling,
    HAS_DBIAS: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    COL_SCALE: tl.constexpr, HAS_DM: tl.constexpr, WRITE_DZ: tl.constexpr, MIXED: tl.constexpr,
):
    """One pass over dY (M, N). Program (row block i, column split j) reads its dY tile once and writes
    ds_part[j] = s·dY[i, j]·B[j] (M, R) and this row block's partials db_part[i] = s·dY[i, j]ᵀ·S[i] (N, R) and
    dbias_part[i] = Σ_m dY[i, j] (N); summing the partials gives dS, dB and db.
    COL_SCALE (DoRA): dS and dB are taken of dZ = dY ⊙ scale (the bias's gradient of dY itself); HAS_DM adds the
    partials dm_part[i] = Σ_m dY ⊙ pre (N), WRITE_DZ writes dZ (M, N contiguous, dY's dtype) for the dX GEMM.
    MIXED: row block i is the mixed batch's tile i (its listed rows, its adapter's B at lora_b_ptr + adapter·stride_ba
    and scale; base tiles give dS = 0 and dB partials 0), so the dB partials sum per adapter."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    if MIXED:
        rows, m_ok, adapter = _mixed_tile(rows_ptr, tile_adapter_ptr, pid_m, BLOCK_M)
        rm = tl.where(m_ok, rows, 0)
        lora_b_ptr += tl.maximum(adapter, 0).to(tl.int64) * stride_ba
        scaling = tl.where(adapter >= 0, tl.load(tile_lowrank_scale_ptr + pid_m), 0.0)
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
    rr = tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    r_ok = rr < R
    # Rows past M load as zero, so they add nothing to dB or db.
    s = tl.load(s_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    s = (s * scaling).to(COMPUTE)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_begin = split * cols_per_split
    n_end = tl.minimum(n_begin + cols_per_split, N)
    dy_ptrs = dy_ptr + rm[:, None].to(tl.int64) * stride_dym + (n_begin + rn).to(tl.int64)[None, :] * stride_dyn
    part = pid_m.to(tl.int64) * N
    for n0 in range(n_begin, n_end, BLOCK_N):
        n_ok = rn < n_end - n0
        tile_ok = m_ok[:, None] & n_ok[None, :]
        dy_in = tl.load(dy_ptrs, mask=tile_ok, other=0.0)
        if HAS_DBIAS:
            tl.store(dbias_part_ptr + part + n0 + rn, tl.sum(dy_in.to(tl.float32), axis=0), mask=n_ok)
        if COL_SCALE:
            own = rm[:, None].to(tl.int64) * N + (n0 + rn)[None, :]  # pre and dZ: (M, N) contiguous
            if HAS_DM:
                pre = tl.load(pre_ptr + own, mask=tile_ok, other=0.0).to(tl.float32)
                tl.store(dm_part_ptr + part + n0 + rn, tl.sum(dy_in.to(tl.float32) * pre, axis=0), mask=n_ok)
            dz = dy_in.to(tl.float32) * tl.load(col_scale_ptr + n0 + rn, mask=n_ok, other=0.0)[None, :]
            if WRITE_DZ:
                tl.store(dz_ptr + own, dz.to(dz_ptr.dtype.element_ty), mask=tile_ok)
            dy = dz.to(COMPUTE)
        else:
            dy = dy_in.to(COMPUTE)
        b = tl.load(lora_b_ptr + (n0 + rn).to(tl.int64)[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(COMPUTE)
        ds = tl.dot(dy, b, ds, input_precision=DOT_PRECISION)
        db = tl.dot(tl.trans(dy), s, input_precision=DOT_PRECISION)
        tl.store(db_part_ptr + (part + n0 + rn)[:, None] * R + rr[None, :], db, mask=n_ok[:, None] & r_ok[None, :])
        dy_ptrs += BLOCK_N * stride_dyn
    ds_ptrs = ds_part_ptr + split.to(tl.int64) * M * R + rm[:, None].to(tl.int64) * R + rr[None, :]
    tl.store(ds_ptrs, ds * scaling, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["seed"])
def _lora_bwd_da_kernel(
    x_ptr, ds_ptr, da_part_ptr, rows_ptr, tile_adapter_ptr, tile_p_ptr,
    M, K, R, M_BUCKET, rows_per_split,
    stride_xm, stride_xk,
    seed, p, keep_scale,
    DROPOUT: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, MIXED: tl.constexpr,
):
    """Partial dA (R, BLOCK_K) = dSᵀ · drop(x) over split ``program_id(1)`` of the rows, into da_part[split].
    MIXED: split i is the mixed batch's tile i (rows_per_split = BLOCK_M = the tile), at its adapter's dropout rate;
    the partials then sum per adapter (a base tile's dS is 0)."""
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    k_ok = rk < K
    r_ok = rr < R
    m_begin = split * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    if MIXED:
        p = tl.load(tile_p_ptr + split)
        keep_scale = 1.0 / (1.0 - p)
        m_end = m_begin + BLOCK_M
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        if MIXED:
            rows, m_ok, _ = _mixed_tile(rows_ptr, tile_adapter_ptr, split, BLOCK_M)
            rm = tl.where(m_ok, rows, 0)
        else:
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < m_end
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk.to(tl.int64)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(COMPUTE)
        if DROPOUT:
            x = tl.where(_dropout_keep(seed, p, rm, pid_k * BLOCK_K, K, BLOCK_K), x, 0.0)
        ds = tl.load(ds_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(ds.to(COMPUTE)), x, acc, input_precision=DOT_PRECISION)
    if DROPOUT:
        acc = acc * keep_scale
    out = da_part_ptr + split.to(tl.int64) * R * K + rr[:, None].to(tl.int64) * K + rk[None, :]
    tl.store(out, acc, mask=r_ok[:, None] & k_ok[None, :])
