"""Triton kernels of the fused LoRA linear ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``, and their launchers.

Forward, split at the small tensor ``S = drop(x) Aᵀ`` (M×r, fp32):
  1. ``_lora_shrink_kernel``  S = drop(x) Aᵀ — reads x once; the dropout mask is drawn in-kernel (Philox)
     and never stored.
  2. ``_lora_gemm_kernel``    Y = x Wᵀ + s·S Bᵀ + b — ONE GEMM whose accumulator is seeded with the low-rank
     product, so the update costs one small dot per output tile and no M×N temporary.
Backward (W is frozen, so there is no dW):
  3. ``_lora_bwd_dy_kernel``  one pass over dY: partial sums of dS = s·dY B (per column split) and of
     dB = s·dYᵀ S and db (per row block).
  4. ``_lora_bwd_da_kernel``  dA = dSᵀ drop(x), the mask regenerated from the seed; split over rows, partials.
  5. ``_lora_gemm_kernel``    dX = dY W + (dS A) ⊙ mask/(1-p) — the forward GEMM kernel again, roles swapped.
Partial sums are reduced with ``torch.sum`` (no float atomics), so results are deterministic.

The dropout keep-decision of element (m, k) of x is ``uniform_i(seed, m·⌈K/4⌉ + k//4) >= p`` in every kernel,
where ``uniform_i`` is the (k mod 4)-th of the four numbers one Philox call draws; this is
what lets the mask be regenerated instead of saved. The GEMM kernel is written as a low-rank prologue, the base
K loop and an epilogue, the seams where the LoRA-family variants plug in as constexpr switches (see
``kernels/common.py``): DoRA scales columns in the epilogue, mixed-adapter batches pick each row tile's adapter in
the prologue, a 4-bit base dequantises W tiles as the K loop loads them.

Tensors on the CPU run through Triton's interpreter (``TRITON_INTERPRET=1``, for tests) with one small fixed
configuration; CUDA tensors use autotuned configs for Ampere and Hopper, pruned to what fits the device's shared
memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastpeft.checks import GEMM_VARIANT_ENV, GEMM_VARIANTS, gemm_variant_env
from fastpeft.nf4 import nf4_code, nf4_matmul, nf4_matmul_t

from .common import (
    GEMM_CONFIGS,
    GEMM_DEFAULT,
    GEMM_KEY,
    INTERPRET_GEMM,
    autotuned,
    compute_dtype,
    config,
    dot_precision,
    even_k,
    gemm_k_loop,
    launch,
    new_output,
    nf4_absmax,
    nf4_tile,
    register_shared_memory,
    register_spilling,
    tile_indices,
)


@triton.jit
def _dropout_keep(seed, p, rows, col0, n_cols, BLOCK_COLS: tl.constexpr):
    """Keep-decisions (True = keep) of elements (rows × [col0, col0 + BLOCK_COLS)) of a matrix with ``n_cols``
    columns; ``col0`` is a multiple of 4. One Philox call draws the four decisions of a group of 4 neighbouring
    columns (a call costs ~60 instructions: one per element made the dropout kernels spill)."""
    groups = col0 // 4 + tl.arange(0, BLOCK_COLS // 4)
    offsets = rows[:, None].to(tl.int64) * tl.cdiv(n_cols, 4) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, offsets)
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # column 4g + i takes r_i of group g
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                        out_ptr, start, count, COMPUTE: tl.constexpr, NESTED: tl.constexpr, QBLOCK: tl.constexpr,
                        QBLOCK2: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = element start + i of an NF4 weight, dequantised (as ``fastpeft.nf4``: bit for bit), i < count: the
    "cublas" variant's chunks of W, dequantised once for cuBLAS."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < count
    idx = start + offs
    absmax = nf4_absmax(idx // QBLOCK, ok, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, NESTED,
                        QBLOCK2)
    tl.store(out_ptr + offs, nf4_tile(packed_ptr, idx, ok, absmax, code_ptr, out_ptr.dtype.element_ty, COMPUTE),
             mask=ok)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Materialize the keep-mask (1 = keep) the other kernels use for ``seed`` — for tests and references."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _dropout_keep(seed, p, rm, tl.program_id(1) * BLOCK_K, K, BLOCK_K)
    ptrs = out_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    tl.store(ptrs, tl.where(keep, 1, 0).to(tl.int8), mask=(rm < M)[:, None] & (rk < K)[None, :])


@triton.jit(do_not_specialize=["seed"])
def _lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, rows_ptr, tile_adapter_ptr, tile_p_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_aa,
    seed, p, keep_scale,
    DROPOUT: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, MIXED: tl.constexpr,
):
    """S (M, R) fp32 = drop(x (M, K)) · A (R, K)ᵀ; one program per BLOCK_M rows, looping over K.
    MIXED (a mixed-adapter batch): program i takes the rows listed for tile i (-1: padding), adapter
    ``tile_adapter[i]`` (A at a_ptr + adapter·stride_aa; -1: the base, whose S is 0) and its dropout rate."""
    if MIXED:
        rows, m_ok, adapter = _mixed_tile(rows_ptr, tile_adapter_ptr, tl.program_id(0), BLOCK_M)
        rm = tl.where(m_ok, rows, 0)
        a_ptr += tl.maximum(adapter, 0).to(tl.int64) * stride_aa
        p = tl.load(tile_p_ptr + tl.program_id(0))
        keep_scale = 1.0 / (1.0 - p)
    else:
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    r_ok = rr < R
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    a_ptrs = a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak  # the (BLOCK_K, BLOCK_R) tile of Aᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(COMPUTE)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(COMPUTE)
        if DROPOUT:
            x = tl.where(_dropout_keep(seed, p, rm, k0, K, BLOCK_K), x, 0.0)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if DROPOUT:
        acc = acc * keep_scale
    if MIXED:
        acc = tl.where(adapter >= 0, acc, 0.0)
    tl.store(s_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _mixed_tile(rows_ptr, tile_adapter_ptr, tile, BLOCK_M: tl.constexpr):
    """A mixed batch's row tile ``tile``: its rows (int64; -1 pads), which of them exist, its adapter (-1: base)."""
    rows = tl.load(rows_ptr + tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return rows, rows >= 0, tl.load(tile_adapter_ptr + tile)


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_kernel(
    a_ptr, b_ptr, l_ptr, u_ptr, bias_ptr, out_ptr, scale_ptr, pre_ptr,
    rows_ptr, tile_adapter_ptr, tile_scale_ptr, tile_p_ptr,
    absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
    M, N, K, R, M_BUCKET, TILED_M,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_lm, stride_lr, stride_ur, stride_un, stride_ua,
    stride_om, stride_on,
    lr_scale, seed, p,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, LOWRANK_LAST: tl.constexpr, BASE_IN_OUT: tl.constexpr,
    COL_SCALE: tl.constexpr, STORE_PRE: tl.constexpr, MIXED: tl.constexpr,
    NF4: tl.constexpr, NESTED: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, ALIGNED: tl.constexpr,
):
    """out (M, N) = [scale (N) ⊙] (a (M, K) · b (K, N) + lr_scale · [mask ⊙] (l (M, R) · u (R, N)) [+ out]) + bias (N).

    Forward: a = x, b = Wᵀ, l = S, u = Bᵀ, lr_scale = s. Backward: a = dY, b = W, l = dS, u = A,
    lr_scale = 1/(1-p), and the dropout mask on the low-rank term. ``M_BUCKET`` is only an autotune key.
    LOWRANK_LAST picks the variant: False seeds the accumulator with the low-rank dot before the K loop; True loads
    the low-rank operands before the loop but adds their dot after it, so the pipeline's first loads wait on
    nothing (which one is faster is for a GPU to measure: see ``GEMM_VARIANTS``). BASE_IN_OUT: out already holds
    the base product (the "cublas" variant: cuBLAS wrote it), so there is no K loop and the term is added onto out.
    COL_SCALE (DoRA): the columns are scaled (fp32 scale) before the bias, and STORE_PRE writes the unscaled sum to
    pre (out's shape and strides), which backward's dm needs.
    MIXED (a mixed-adapter batch, prologue order): the grid walks TILED_M rows of tiles; tile i holds the rows
    listed at rows_ptr (-1 pads) and one adapter, ``tile_adapter[i]`` (u at u_ptr + adapter·stride_ua, scale
    ``tile_scale[i]``, dropout rate ``tile_p[i]``; -1: the base alone), so a and out are read and written by row.
    NF4 (a 4-bit base W): b_ptr holds W's packed codes, its tiles dequantised as the K loop loads them (the absmax
    and code-book pointers, NESTED for double-quantised absmaxes, QBLOCK and QBLOCK2 the block sizes, ALIGNED how
    the absmaxes are loaded: see ``common.nf4_b_tile``).
    """
    if MIXED:
        pid_m, pid_n, rm, rn, rm_load, rn_load = tile_indices(tl.program_id(0), TILED_M, N, BLOCK_M, BLOCK_N,
                                                              GROUP_M)
        rows, m_ok, adapter = _mixed_tile(rows_ptr, tile_adapter_ptr, pid_m, BLOCK_M)
        rm = tl.where(m_ok, rows, M)  # padding rows fall outside the epilogue's store mask
        rm_load = tl.where(m_ok, rows, 0)
        p = tl.load(tile_p_ptr + pid_m)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if adapter >= 0:
            lo, up = _lowrank_operands(l_ptr, u_ptr + adapter.to(tl.int64) * stride_ua, rm_load, rn_load, R,
                                       stride_lm, stride_lr, stride_ur, stride_un, tl.load(tile_scale_ptr + pid_m),
                                       COMPUTE, BLOCK_R)
            acc = _lowrank_term(lo, up, rm, pid_n * BLOCK_N, N, seed, p, DROPOUT, DOT_PRECISION, BLOCK_N)
    else:
        _, pid_n, rm, rn, rm_load, rn_load = tile_indices(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        lo, up = _lowrank_operands(l_ptr, u_ptr, rm_load, rn_load, R, stride_lm, stride_lr, stride_ur, stride_un,
                                   lr_scale, COMPUTE, BLOCK_R)
        if LOWRANK_LAST:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = _lowrank_term(lo, up, rm, pid_n * BLOCK_N, N, seed, p, DROPOUT, DOT_PRECISION, BLOCK_N)

    if not BASE_IN_OUT:  # the base K loop (NF4: W's tiles dequantised as they load)
        acc = gemm_k_loop(acc, a_ptr, b_ptr, rm_load, rn_load, K, stride_am, stride_ak, stride_bk, stride_bn,
                          COMPUTE, DOT_PRECISION, BLOCK_K, EVEN_K, absmax_ptr, code_ptr, absmax_code_ptr,
                          absmax_scale_ptr, absmax_offset_ptr, NF4, NESTED, QBLOCK, QBLOCK2, ALIGNED)
    if LOWRANK_LAST and not MIXED:
        acc += _lowrank_term(lo, up, rm, pid_n * BLOCK_N, N, seed, p, DROPOUT, DOT_PRECISION, BLOCK_N)

    _gemm_epilogue(acc, bias_ptr, out_ptr, scale_ptr, pre_ptr, rm, rn, rn_load, M, N, stride_om, stride_on, HAS_BIAS,
                   BASE_IN_OUT, COL_SCALE, STORE_PRE)


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_tma_kernel(
    a_desc, b_desc, l_ptr, u_ptr, bias_ptr, out_ptr, scale_ptr, pre_ptr,
    M, N, K, R, M_BUCKET,
    stride_lm, stride_lr, stride_ur, stride_un,
    stride_om, stride_on,
    lr_scale, seed, p,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, B_KN: tl.constexpr, COL_SCALE: tl.constexpr, STORE_PRE: tl.constexpr,
):
    """The "tma" variant of ``_lora_gemm_kernel`` (same result, Hopper only): a persistent grid, each program
    walking output tiles, with a and b read by the Tensor Memory Accelerator through descriptors (a over (M, K); b
    over (K, N) when B_KN, else over (N, K), i.e. W as stored, transposed in registers for free). Descriptors
    zero-fill past the edges, so the K loop needs no masks; the low-rank term seeds the accumulator as in the
    prologue variant."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n, rm, rn, rm_load, rn_load = tile_indices(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        lo, up = _lowrank_operands(l_ptr, u_ptr, rm_load, rn_load, R, stride_lm, stride_lr, stride_ur, stride_un,
                                   lr_scale, COMPUTE, BLOCK_R)
        acc = _lowrank_term(lo, up, rm, pid_n * BLOCK_N, N, seed, p, DROPOUT, DOT_PRECISION, BLOCK_N)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            if B_KN:
                b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
            else:
                b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K]).T
            acc = tl.dot(a.to(COMPUTE), b.to(COMPUTE), acc, input_precision=DOT_PRECISION)
        _gemm_epilogue(acc, bias_ptr, out_ptr, scale_ptr, pre_ptr, rm, rn, rn_load, M, N, stride_om, stride_on,
                       HAS_BIAS, False, COL_SCALE, STORE_PRE)


@triton.jit
def _lowrank_operands(l_ptr, u_ptr, rm_load, rn_load, R, stride_lm, stride_lr, stride_ur, stride_un, lr_scale,
                      COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr):
    """This output tile's low-rank operands, lr_scale · l (BLOCK_M × R) and u (R × BLOCK_N), in the compute dtype
    (a mixed batch passes its tile's adapter's u and scale, read from the tile tables)."""
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    lo = tl.load(l_ptr + rm_load[:, None] * stride_lm + rr[None, :] * stride_lr, mask=r_ok[None, :], other=0.0)
    up = tl.load(u_ptr + rr[:, None] * stride_ur + rn_load[None, :] * stride_un, mask=r_ok[:, None], other=0.0)
    return (lo * lr_scale).to(COMPUTE), up.to(COMPUTE)


@triton.jit
def _lowrank_term(lo, up, rm, n0, N, seed, p, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """[mask ⊙] (lo · up) for the tile: one (BLOCK_M×R)·(R×BLOCK_N) dot, fp32."""
    term = tl.dot(lo, up, input_precision=DOT_PRECISION)
    if DROPOUT:
        term = tl.where(_dropout_keep(seed, p, rm, n0, N, BLOCK_N), term, 0.0)
    return term


@triton.jit
def _gemm_epilogue(acc, bias_ptr, out_ptr, scale_ptr, pre_ptr, rm, rn, rn_load, M, N, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, ADD_OUT: tl.constexpr, COL_SCALE: tl.constexpr, STORE_PRE: tl.constexpr):
    """What out holds, DoRA's column scale (the unscaled tile kept in pre first), the bias, then the store."""
    in_bounds = (rm < M)[:, None] & (rn < N)[None, :]
    offsets = rm[:, None].to(tl.int64) * stride_om + rn[None, :].to(tl.int64) * stride_on
    if ADD_OUT:
        acc += tl.load(out_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if COL_SCALE:
        if STORE_PRE:
            tl.store(pre_ptr + offsets, acc.to(pre_ptr.dtype.element_ty), mask=in_bounds)
        acc = acc * tl.load(scale_ptr + rn_load)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _lora_bwd_dy_kernel(
    dy_ptr, b_ptr, s_ptr, ds_part_ptr, db_part_ptr, dbias_part_ptr, scale_ptr, pre_ptr, dm_part_ptr, dz_ptr,
    rows_ptr, tile_adapter_ptr, tile_scale_ptr,
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
    MIXED: row block i is the mixed batch's tile i (its listed rows, its adapter's B at b_ptr + adapter·stride_ba and
    scale; base tiles give dS = 0 and dB partials 0), so the dB partials sum per adapter."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    if MIXED:
        rows, m_ok, adapter = _mixed_tile(rows_ptr, tile_adapter_ptr, pid_m, BLOCK_M)
        rm = tl.where(m_ok, rows, 0)
        b_ptr += tl.maximum(adapter, 0).to(tl.int64) * stride_ba
        scaling = tl.where(adapter >= 0, tl.load(tile_scale_ptr + pid_m), 0.0)
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
            dz = dy_in.to(tl.float32) * tl.load(scale_ptr + n0 + rn, mask=n_ok, other=0.0)[None, :]
            if WRITE_DZ:
                tl.store(dz_ptr + own, dz.to(dz_ptr.dtype.element_ty), mask=tile_ok)
            dy = dz.to(COMPUTE)
        else:
            dy = dy_in.to(COMPUTE)
        b = tl.load(b_ptr + (n0 + rn).to(tl.int64)[:, None] * stride_bn + rr[None, :] * stride_br,
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


@triton.jit
def _dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, sq_part_ptr,
    N, K, R, cols_per_split,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """DoRA's squared row norms ‖W_i + s·B_i A‖², partial over split ``program_id(1)`` of K, for BLOCK_N rows:
    W + s·BA is formed tile by tile in registers (never in memory), squared and summed in fp32."""
    split = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    r_ok = rr < R
    b = tl.load(b_ptr + rn[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32) * scaling
    k_begin = split * cols_per_split
    k_end = tl.minimum(k_begin + cols_per_split, K)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = rk < k_end - k0
        cols = (k0 + rk).to(tl.int64)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        v = tl.dot(b, a, w, input_precision=DOT_PRECISION)  # W + s·B A, this tile
        sq += tl.sum(v * v, axis=1)
    tl.store(sq_part_ptr + split.to(tl.int64) * N + rn, sq, mask=n_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------

# None of these spills registers on sm_80 or sm_90 with dropout (the AOT tests check every one).
SHRINK_CONFIGS = [
    config(w, s, BLOCK_M=bm, BLOCK_K=bk)
    for bm, bk, w, s in [(32, 128, 4, 4), (64, 128, 8, 4), (64, 64, 4, 5), (128, 64, 8, 4), (64, 256, 8, 3)]
]
DY_BLOCK_M = 128  # fixed: it sets the number of dB partials, allocated before the launch
DY_CONFIGS = [config(w, s, BLOCK_N=bn) for bn, w, s in [(64, 4, 3), (64, 8, 3), (128, 8, 3), (32, 4, 4)]]
DA_CONFIGS = [
    config(w, s, BLOCK_M=bm, BLOCK_K=bk)
    for bm, bk, w, s in [(64, 64, 4, 4), (128, 64, 8, 2), (64, 128, 4, 3), (128, 128, 4, 3)]
]

# The "cublas" variant's pass adding the low-rank term onto out: no K loop (BLOCK_K unused), no pipeline.
LOWRANK_PASS_CONFIGS = [config(w, 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, GROUP_M=8)
                        for bm, bn, w in [(64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8)]]



def _tma_blocks(args):
    """Autotune pre-hook: a config's tiles are the descriptors' block shapes."""
    bm, bn, bk = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    args["a_desc"].block_shape = [bm, bk]
    args["b_desc"].block_shape = [bk, bn] if args["B_KN"] else [bn, bk]


# The "tma" variant's tiles: Hopper's (BLOCK_K=64 for wgmma), each setting the descriptors' block shapes.
TMA_GEMM_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8), num_warps=w, num_stages=s,
                  pre_hook=_tma_blocks)
    # (128×128 with 4 warps spilled in the dX GEMM with dropout under Triton 3.6, the GPU image's)
    for bm, bn, w, s in [(128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 4)]
]

# Without autotuning: configs that fit every supported GPU's shared memory, fp32 included.
TMA_GEMM_DEFAULT = TMA_GEMM_CONFIGS[3]  # 128×64: fits a Hopper with fp32 operands too
LOWRANK_PASS_DEFAULT = LOWRANK_PASS_CONFIGS[2]
SHRINK_DEFAULT = SHRINK_CONFIGS[2]
DY_DEFAULT = DY_CONFIGS[0]
DA_DEFAULT = DA_CONFIGS[0]

# The interpreter runs one small configuration: blocks ≥ 16 for tl.dot, few programs for speed.
INTERPRET_SHRINK = dict(BLOCK_M=32, BLOCK_K=32)
INTERPRET_DY = dict(BLOCK_N=32)
INTERPRET_DY_BLOCK_M = 32
INTERPRET_DA = dict(BLOCK_M=32, BLOCK_K=32)


# Shared memory of one config in bytes (see ``register_shared_memory``), fitted to the compiled kernels: the AOT
# tests hold each within 10% or 16 KiB above the real figure of every config, on both archs.
def _gemm_shared(b, sizes, stages, arch):
    if b.get("NF4"):
        # W's tile is staged as its bytes and as the gathered fp32 code-book values (about 5.25 bytes an element with
        # the absmaxes broadcast; the per-element absmaxes of an unaligned W add theirs), beside x's tile; Hopper
        # keeps one more x tile.
        per_element = 5.25 + (0 if b.get("ALIGNED") else (9 if b.get("NESTED") else 4))
        a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_ptr"]
        staged = (stages - 1) * (a_tile + per_element * b["BLOCK_K"] * b["BLOCK_N"])
        return int(staged + (a_tile if arch >= 90 else 0))
    if b.get("BASE_IN_OUT"):  # no K loop: converting the out tile and u's tile
        return b["BLOCK_M"] * b["BLOCK_N"] * sizes["out_ptr"] + b["BLOCK_N"] * b["BLOCK_R"] * 4
    a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_ptr"]
    b_tile = b["BLOCK_K"] * b["BLOCK_N"] * sizes["b_ptr"]
    # The epilogue variant keeps its low-rank operands across the K loop: Triton 3.6 stages them beside the
    # pipeline (2-8 KB more on both archs), Triton 3.9 does not.
    held = (b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_R"] * sizes["a_ptr"] if b.get("LOWRANK_LAST") else 0
    if arch >= 90:  # plus u's (R × BLOCK_N) tile in the compute dtype, for the wgmma of the low-rank term
        return stages * (a_tile + b_tile) + b["BLOCK_N"] * b["BLOCK_R"] * sizes["a_ptr"] + held
    # Ampere: the epilogue's and the low-rank operands' layout conversions reuse the pipeline's space.
    return max((stages - 1) * (a_tile + b_tile) + held, b["BLOCK_M"] * b["BLOCK_N"] * sizes["out_ptr"],
               max(b["BLOCK_M"], b["BLOCK_N"]) * b["BLOCK_R"] * 4)


def _shrink_shared(b, sizes, stages, arch):
    x_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["x_ptr"]
    a_tile = b["BLOCK_K"] * b["BLOCK_R"] * sizes["a_ptr"]  # converted to the compute dtype in registers
    return stages * x_tile + (stages - 1) * a_tile + (b["BLOCK_K"] * b["BLOCK_R"] * sizes["x_ptr"] if arch >= 90 else 0)


def _dy_shared(b, sizes, stages, arch):
    dy_tile = b["BLOCK_M"] * b["BLOCK_N"] * sizes["dy_ptr"]
    s_tile = b["BLOCK_M"] * b["BLOCK_R"] * sizes["dy_ptr"]
    if b.get("MIXED"):  # rows gathered through the tables: S's tile staged too, and on Hopper B's in fp32
        if arch >= 90:
            return stages * dy_tile + s_tile + b["BLOCK_N"] * b["BLOCK_R"] * 4 + 4096
        return (stages - 1) * dy_tile + s_tile
    # plus S's tile in the compute dtype, the operand of dB's wgmma (DoRA's dY, scaled in registers first, is laid
    # out as on Ampere)
    if arch >= 90 and not b.get("COL_SCALE"):
        return stages * dy_tile + b["BLOCK_M"] * b["BLOCK_R"] * sizes["dy_ptr"]
    return (stages - 1) * dy_tile


def _da_shared(b, sizes, stages, arch):
    x_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["x_ptr"]
    if b.get("MIXED"):  # one tile per program: nothing to pipeline
        return x_tile + b["BLOCK_M"] * b["BLOCK_R"] * sizes["ds_ptr"]
    return stages * x_tile + (stages - 1) * b["BLOCK_M"] * b["BLOCK_R"] * sizes["ds_ptr"]


def _gemm_tma_shared(b, sizes, stages, arch):
    a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_desc"]
    b_tile = b["BLOCK_K"] * b["BLOCK_N"] * sizes["b_desc"]
    # plus one 8-byte mbarrier per stage, on which the TMA copies signal their arrival
    return stages * (a_tile + b_tile + 8) + b["BLOCK_N"] * b["BLOCK_R"] * sizes["a_desc"]


def _dora_epilogue_spills(b, num_warps):
    """DoRA's epilogue holds the unscaled tile for pre beside the scaled one: 256-row tiles, and TMA's 128×256, then
    spill 8-80 bytes (ptxas, sm_80 and sm_90); their 128×128 neighbours do not."""
    if b.get("STORE_PRE") and b["BLOCK_M"] * b["BLOCK_N"] >= 128 * 256:
        return "DoRA's pre store spills registers in tiles of 128×256 or more"
    return None


register_spilling("_lora_gemm_kernel", _dora_epilogue_spills)
register_spilling("_lora_gemm_tma_kernel", _dora_epilogue_spills)

for _name, _need in [("_lora_gemm_kernel", _gemm_shared), ("_lora_gemm_tma_kernel", _gemm_tma_shared),
                     ("_lora_shrink_kernel", _shrink_shared),
                     ("_lora_bwd_dy_kernel", _dy_shared), ("_lora_bwd_da_kernel", _da_shared)]:
    register_shared_memory(_name, _need)

_gemm = even_k(_lora_gemm_kernel)
# How the fused GEMM runs (GEMM_VARIANTS): "prologue" seeds the accumulator with the low-rank term before the K
# loop, "epilogue" adds it after (its operands loaded before the loop), "cublas" leaves the base product to torch
# (cuBLAS on a GPU) and adds the term in a second pass over the output (2·M·N more bytes moved; no K loop of ours),
# "tma" is the prologue variant on a persistent grid reading a and b by TMA (Hopper; operands TMA cannot address,
# and older GPUs, run "prologue"). All are exact; which is fastest is for a GPU to measure (``auto`` times them, the
# GPU check's headline too).


def gemm_variant(variant=None) -> str:
    """The fused GEMM's variant: the argument, else ``$FASTPEFT_GEMM_VARIANT``, else "prologue"."""
    source = "variant"
    if variant is None:
        variant, source = gemm_variant_env() or "prologue", GEMM_VARIANT_ENV
    if variant not in GEMM_VARIANTS:
        raise ValueError(f"{source} must be one of {', '.join(GEMM_VARIANTS)}, got {variant!r}")
    return variant


# Tuned once per size class (M_BUCKET: M's next power of two), never per sequence length. The GEMM also keys on
# dropout and on the operands' layout, so backward's dX (W untransposed, masked) never inherits forward's winner.
_gemm_tuned = autotuned(_gemm, GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "LOWRANK_LAST", "BASE_IN_OUT", "stride_ak",
                                                        "stride_bk"], "_lora_gemm_kernel")
_tma_tuned = autotuned(_lora_gemm_tma_kernel, TMA_GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "B_KN"], "_lora_gemm_tma_kernel")
_lowrank_pass_tuned = autotuned(_gemm, LOWRANK_PASS_CONFIGS, GEMM_KEY + ["DROPOUT", "BASE_IN_OUT"], "_lora_gemm_kernel")
# A 4-bit base: the dequantising load holds more registers and stages more per element (see ``_gemm_shared``); the
# tiles kept are those that neither spill nor overflow an A100 (ptxas: 64-deep tiles of 128×256 and 256×128, and
# 128×128 tiles on 4 warps, spill up to 11 KB, the dX GEMM's most).
NF4_GEMM_CONFIGS = [c for c in GEMM_CONFIGS
                    if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128 or c.num_warps == 8
                    and (c.kwargs["BLOCK_K"] == 32 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128 * 128)]
NF4_GEMM_DEFAULT = next(c for c in NF4_GEMM_CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (64, 128))
_nf4_gemm_tuned = autotuned(_gemm, NF4_GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "LOWRANK_LAST", "stride_ak", "stride_bk",
                                                                "NESTED", "ALIGNED"], "_lora_gemm_kernel")
# Mixed batches: the GEMM's row tiles are the tables' tiles, so its configs share one BLOCK_M, MIXED_TILE.
MIXED_TILE = 64
MIXED_GEMM_CONFIGS = [c for c in GEMM_CONFIGS if c.kwargs["BLOCK_M"] == MIXED_TILE]
MIXED_GEMM_DEFAULT = MIXED_GEMM_CONFIGS[0]
_mixed_gemm_tuned = autotuned(_gemm, MIXED_GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "MIXED", "stride_ak", "stride_bk"],
                              "_lora_gemm_kernel")
_shrink_tuned = autotuned(_lora_shrink_kernel, SHRINK_CONFIGS, ["M_BUCKET", "K", "DROPOUT"], "_lora_shrink_kernel")
_dy_tuned = autotuned(_lora_bwd_dy_kernel, DY_CONFIGS, ["M_BUCKET", "N"], "_lora_bwd_dy_kernel")
_da_tuned = autotuned(_lora_bwd_da_kernel, DA_CONFIGS, ["M_BUCKET", "K", "DROPOUT"], "_lora_bwd_da_kernel")


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few row splits, so tests exercise the partial-sum reduction


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

@dataclass
class NF4Operand:
    """A 4-bit base W (N, K) (a ``fastpeft.nf4.NF4Weight``) as a GEMM's b operand: Wᵀ (K, N) when ``transposed``
    (forward), else W (backward's dX). Shape and strides are those of the dense W's view, which the kernel turns
    into each element's flat index in the packed codes."""
    weight: object
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.weight.shape
        return (k, n) if self.transposed else (n, k)

    def stride(self, dim: int) -> int:
        k = self.weight.shape[1]
        return ((1, k) if self.transposed else (k, 1))[dim]

    def pointers(self) -> tuple:
        """The kernel's absmax, code book, absmax code book, absmax scale and offset arguments."""
        w = self.weight
        code = nf4_code(w.device)
        if not w.nested:
            return w.absmax, code, code, code, code
        return w.absmax, code, w.absmax_code, w.absmax_scale, w.absmax_offset

    def constexprs(self) -> dict:
        w = self.weight
        # W's rows start on block boundaries and every config's BLOCK_K (<= 64) and BLOCK_N divide or are multiples
        # of the blocksize: the absmaxes load once per block (see ``common.nf4_b_tile``).
        aligned = w.shape[1] % w.blocksize == 0 and w.blocksize >= 64
        return dict(NF4=True, NESTED=w.nested, QBLOCK=w.blocksize, QBLOCK2=w.absmax_blocksize,
                    ALIGNED=(1 if self.transposed else 2) if aligned else 0)


_DENSE = dict(NF4=False, NESTED=False, QBLOCK=64, QBLOCK2=256, ALIGNED=0)


def lora_gemm(a, b, lo, up, bias, out, lr_scale: float, seed: int = 0, dropout_p: float = 0.0, variant=None, *,
              col_scale=None, pre=None, mixed: MixedLaunch | None = None):
    """out (M, N) = a (M, K) · b (K, N) + lr_scale · [keep ⊙] (lo (M, R) · up (R, N)) + bias — any strides, so
    transposed views (Wᵀ, Bᵀ) cost nothing. The keep-mask of ``seed`` applies when ``dropout_p`` > 0.
    ``variant``: one of ``GEMM_VARIANTS``; None takes ``$FASTPEFT_GEMM_VARIANT`` (default "prologue").
    DoRA: ``col_scale`` (N,) fp32 scales the columns before the bias; ``pre`` (out's shape and strides), if given,
    receives the unscaled sum. ``mixed``: a mixed-adapter batch's tiles (``up`` is then adapter 0's of a stack,
    ``lr_scale`` and ``dropout_p`` per tile; prologue order). ``b`` may be an :class:`NF4Operand` (a 4-bit base),
    dequantised tile by tile in the K loop; "cublas" dequantises it instead a chunk of W's rows at a time
    (``NF4_GPU_CHUNK`` elements) for cuBLAS, and "tma", which needs a dense b, runs "prologue".
    """
    variant = gemm_variant(variant)
    M, K = a.shape
    N, R = b.shape[1], lo.shape[1]
    on_cpu = a.device.type == "cpu"
    quant, quant_args, b_arg = _DENSE, (out,) * 5, b
    if isinstance(b, NF4Operand):
        quant, quant_args, b_arg = b.constexprs(), b.pointers(), b.weight.packed
        variant = "prologue" if variant == "tma" else variant
    if pre is not None and (pre.shape != out.shape or pre.stride() != out.stride()):
        raise ValueError("lora_gemm: pre must have out's shape and strides")
    dora = dict(COL_SCALE=col_scale is not None, STORE_PRE=pre is not None)
    scale_arg = col_scale if col_scale is not None else out
    pre_arg = pre if pre is not None else out
    if mixed is not None:
        variant = "prologue"
    if variant == "tma":
        if _tma_addressable(a, b):
            return _lora_gemm_tma(a, b, lo, up, bias, out, lr_scale, seed, dropout_p, scale_arg, pre_arg, dora)
        variant = "prologue"  # what TMA cannot address runs the default variant
    tuned, default = (_gemm_tuned, GEMM_DEFAULT) if mixed is None else (_mixed_gemm_tuned, MIXED_GEMM_DEFAULT)
    if quant["NF4"]:
        tuned, default = _nf4_gemm_tuned, NF4_GEMM_DEFAULT
    tables = (mixed.rows, mixed.tile_adapter, mixed.tile_scale, mixed.tile_p) if mixed is not None else (out,) * 4
    tiled_m = mixed.tiles * mixed.tile if mixed is not None else M
    if variant == "cublas":  # the base product (and bias) by torch into out; the kernel adds the low-rank term
        fold_bias = bias is not None and col_scale is None  # a scaled output gets its bias after the scale
        _base_product(a, b, out, bias if fold_bias else None)
        bias = None if fold_bias else bias
        tuned, default = _lowrank_pass_tuned, LOWRANK_PASS_DEFAULT
        quant, quant_args, b_arg = _DENSE, (out,) * 5, out  # (no K loop: b is not read)
    launch(tuned, _gemm, default, INTERPRET_GEMM,
            lambda c: (triton.cdiv(tiled_m, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),), on_cpu,
            a, b_arg, lo, up, bias.contiguous() if bias is not None else out, out, scale_arg, pre_arg, *tables,
            *quant_args, M, N, K, R, triton.next_power_of_2(M), tiled_m,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), lo.stride(0), lo.stride(1),
            up.stride(0), up.stride(1), mixed.stride_ua if mixed is not None else 0, out.stride(0), out.stride(1),
            lr_scale, seed, dropout_p,
            HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, COMPUTE=compute_dtype(a.dtype, on_cpu),
            DOT_PRECISION=dot_precision(a.dtype), BLOCK_R=_rank_block(R), LOWRANK_LAST=variant == "epilogue",
            BASE_IN_OUT=variant == "cublas", MIXED=mixed is not None, **dora, **quant, **_exact_absmax(quant["NF4"]))


def _exact_absmax(nf4: bool) -> dict:
    """Launch options of a kernel dequantising NF4: no fused multiply-add, so a double-quantised absmax is code · scale
    rounded, then + offset rounded, as ``fastpeft.nf4`` and bitsandbytes compute it (a GPU build fuses them into
    one FMA otherwise, one ulp off in about 7% of the blocks)."""
    return dict(enable_fp_fusion=False) if nf4 else {}


# The "cublas" variant over a 4-bit base dequantises W this many elements at a time (a row chunk on a block boundary,
# 8 MiB in bf16) for cuBLAS, so the layer is never whole in full precision.
NF4_GPU_CHUNK = 1 << 22


def _base_product(a, b, out, bias=None):
    """out = a · b (+ bias) by torch (cuBLAS on a GPU); an NF4 b dequantised a chunk of W's rows at a time by
    ``_nf4_dequant_kernel``: columns of out for b = Wᵀ, a sum over chunks for b = W."""
    if not isinstance(b, NF4Operand):
        torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
    elif b.transposed:
        nf4_matmul(a, b.weight, bias, out, max_elements=NF4_GPU_CHUNK, dequantize_rows=nf4_dequantize_rows)
    else:
        nf4_matmul_t(a, b.weight, out.zero_(), max_elements=NF4_GPU_CHUNK, dequantize_rows=nf4_dequantize_rows)


def nf4_dequantize_rows(weight, start: int, stop: int) -> torch.Tensor:
    """Rows ``start`` .. ``stop`` of an NF4 weight in its dtype, by ``_nf4_dequant_kernel`` (``start`` on a block
    boundary, as ``NF4Weight.row_chunks`` gives)."""
    k = weight.shape[1]
    out = new_output((stop - start, k), weight.dtype, weight.device)
    count = out.numel()
    if count:
        absmax, code, absmax_code, absmax_scale, absmax_offset = NF4Operand(weight, False).pointers()
        block = 1024
        _nf4_dequant_kernel[(triton.cdiv(count, block),)](
            weight.packed, absmax, code, absmax_code, absmax_scale, absmax_offset, out, start * k, count,
            COMPUTE=compute_dtype(weight.dtype, out.device.type == "cpu"), NESTED=weight.nested,
            QBLOCK=weight.blocksize, QBLOCK2=weight.absmax_blocksize, BLOCK=block, **_exact_absmax(True))
    return out


def _weight_operand(weight, transposed: bool):
    """W (a tensor, or a 4-bit base's NF4Weight) as a GEMM's b: Wᵀ when ``transposed``."""
    if isinstance(weight, torch.Tensor):
        return weight.t() if transposed else weight
    return NF4Operand(weight, transposed)


def _tma_addressable(a, b) -> bool:
    """TMA reads a (M, K) and b (K, N) (or b's transpose, W as stored) when each has a unit inner stride, 16-byte
    aligned rows and base, on a Hopper or later GPU (or the interpreter)."""
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device)[0] < 9:
        return False
    es = a.element_size()
    b_rows = b if b.stride(1) == 1 else b.t()
    return all(t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0 and t.stride(0) > 0
               for t in (a, b_rows))


def _lora_gemm_tma(a, b, lo, up, bias, out, lr_scale, seed, dropout_p, scale_arg, pre_arg, dora):
    from triton.tools.tensor_descriptor import TensorDescriptor
    M, K = a.shape
    N, R = b.shape[1], lo.shape[1]
    on_cpu = a.device.type == "cpu"
    b_kn = b.stride(1) == 1  # b as (K, N) rows (dX: W), else its transpose (N, K) is (forward: W as stored)
    stored = b if b_kn else b.t()
    block = INTERPRET_GEMM if on_cpu else TMA_GEMM_DEFAULT.kwargs  # autotuning's pre-hook resets them per config
    a_desc = TensorDescriptor.from_tensor(a, [block["BLOCK_M"], block["BLOCK_K"]])
    b_desc = TensorDescriptor.from_tensor(stored, [block["BLOCK_K"], block["BLOCK_N"]] if b_kn
                                          else [block["BLOCK_N"], block["BLOCK_K"]])
    if on_cpu:
        sms = 3  # a few programs, so the persistent loop takes several tiles each
    else:
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    launch(_tma_tuned, _lora_gemm_tma_kernel, TMA_GEMM_DEFAULT, INTERPRET_GEMM,
           lambda c: (min(sms, triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])),), on_cpu,
           a_desc, b_desc, lo, up, bias.contiguous() if bias is not None else out, out, scale_arg, pre_arg,
           M, N, K, R, triton.next_power_of_2(M),
           lo.stride(0), lo.stride(1), up.stride(0), up.stride(1), out.stride(0), out.stride(1),
           lr_scale, seed, dropout_p,
           HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, COMPUTE=compute_dtype(a.dtype, on_cpu),
           DOT_PRECISION=dot_precision(a.dtype), BLOCK_R=_rank_block(R), B_KN=b_kn, **dora)
    return out


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device) -> torch.Tensor:
    """The (M, K) bool keep-mask the kernels draw for ``seed`` and drop probability ``p``."""
    M, K = shape
    out = new_output((M, K), torch.int8, device)
    if M and K:
        cfg = dict(BLOCK_M=64, BLOCK_K=256) if torch.device(device).type == "cpu" else dict(BLOCK_M=64, BLOCK_K=128)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))
        _dropout_mask_kernel[grid](out, M, K, seed, p, **cfg)
    return out.bool()


def lora_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int, variant=None, *,
             col_scale=None, keep_pre=False):
    """Forward of the fused LoRA linear.

    x (M, K) fp16/bf16/fp32, any strides; weight (N, K) (or a 4-bit base's NF4Weight) and bias (N,) in x's dtype;
    lora_A (R, K) and
    lora_B (N, R) in any of those dtypes (computed in x's dtype, accumulated in fp32).
    Returns y (M, N) in x's dtype, S = drop(x) Aᵀ (M, R) in fp32, which backward needs, and pre. ``variant``: the
    fused GEMM's (see ``lora_gemm``). DoRA: ``col_scale`` (N,) scales y's columns before the bias; with
    ``keep_pre`` pre is the unscaled x Wᵀ + s·S Bᵀ (M, N), else None.
    """
    M, K = x.shape
    N, R = lora_B.shape
    device, on_cpu = x.device, x.device.type == "cpu"
    s = new_output((M, R), torch.float32, device)
    y = new_output((M, N), x.dtype, device)
    pre = new_output((M, N), x.dtype, device) if keep_pre and col_scale is not None else None
    if M == 0:
        return y, s, pre
    launch(_shrink_tuned, _lora_shrink_kernel, SHRINK_DEFAULT, INTERPRET_SHRINK,
            lambda c: (triton.cdiv(M, c["BLOCK_M"]),), on_cpu,
            x, lora_A, s, s, s, s, M, K, R, triton.next_power_of_2(M), x.stride(0), x.stride(1), lora_A.stride(0),
            lora_A.stride(1), 0,
            seed, dropout_p, 1.0 / (1.0 - dropout_p),
            DROPOUT=dropout_p > 0.0, COMPUTE=compute_dtype(x.dtype, on_cpu), DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_R=_rank_block(R), MIXED=False)
    if col_scale is not None:
        col_scale = col_scale.to(torch.float32).contiguous()
    lora_gemm(x, _weight_operand(weight, True), s, lora_B.t(), bias, y, scaling, variant=variant,
              col_scale=col_scale, pre=pre)
    return y, s, pre


def lora_bwd(dy, x, weight, lora_A, lora_B, s, scaling: float, dropout_p: float, seed: int,
             needs_dx: bool, needs_da: bool, needs_db: bool, needs_dbias: bool, variant=None, *,
             col_scale=None, pre=None):
    """Backward of the fused LoRA linear: (dx, dA, dB, dbias, dm_sum), each None where not needed.

    dy (M, N) in the forward's dtype, any strides; x (M, K) as in forward (only read when dA is needed);
    s = S from forward (M, R) fp32. dA, dB come back in the adapters' dtype, dx and dbias in x's dtype. ``variant``:
    the dX GEMM's (see ``lora_gemm``). DoRA: ``col_scale`` (N,) as in forward; with ``pre`` (forward's, M×N),
    dm_sum = Σ_rows dY ⊙ pre (N,) fp32, which divided by the norm is dm.
    """
    M, N = dy.shape
    R, K = lora_A.shape
    device, on_cpu = dy.device, dy.device.type == "cpu"
    dropout = dropout_p > 0.0
    keep_scale = 1.0 / (1.0 - dropout_p)
    precision = dot_precision(dy.dtype)
    compute = compute_dtype(dy.dtype, on_cpu)
    block_r = _rank_block(R)
    dx = da = db = dbias = dm = None
    if M == 0:
        dx = torch.zeros((0, K), dtype=dy.dtype, device=device) if needs_dx else None
        da = torch.zeros_like(lora_A) if needs_da else None
        db = torch.zeros_like(lora_B) if needs_db else None
        dbias = torch.zeros(N, dtype=dy.dtype, device=device) if needs_dbias else None
        dm = torch.zeros(N, dtype=torch.float32, device=device) if pre is not None else None
        return dx, da, db, dbias, dm

    dy_block_m = INTERPRET_DY_BLOCK_M if on_cpu else DY_BLOCK_M
    row_blocks = triton.cdiv(M, dy_block_m)
    # Split the columns too when there are few row blocks, so the pass over dY fills the GPU (dS partials
    # are small: M×r each). cols_per_split is a multiple of every BLOCK_N the kernel may run with.
    quantum = INTERPRET_DY["BLOCK_N"] if on_cpu else max(c.kwargs["BLOCK_N"] for c in DY_CONFIGS)
    col_splits = max(1, min(triton.cdiv(N, quantum), (2 * _num_sms(device)) // row_blocks))
    cols_per_split = triton.cdiv(triton.cdiv(N, col_splits), quantum) * quantum
    col_splits = triton.cdiv(N, cols_per_split)
    ds_part = new_output((col_splits, M, R), torch.float32, device)
    db_part = new_output((row_blocks, N, R), torch.float32, device)
    dbias_part = new_output((row_blocks, N), torch.float32, device) if needs_dbias else db_part
    # DoRA: the pass scales dY's columns, sums dm's partials beside db's, and writes dZ = dY ⊙ scale for dX's GEMM.
    dora = col_scale is not None
    if dora:
        col_scale = col_scale.to(torch.float32).contiguous()
    dm_part = new_output((row_blocks, N), torch.float32, device) if pre is not None else db_part
    dz = new_output((M, N), dy.dtype, device) if dora and needs_dx else None
    launch(_dy_tuned, _lora_bwd_dy_kernel, DY_DEFAULT, INTERPRET_DY, lambda c: (row_blocks, col_splits), on_cpu,
            dy, lora_B, s, ds_part, db_part, dbias_part, col_scale if dora else db_part,
            pre.contiguous() if pre is not None else db_part, dm_part, dz if dz is not None else db_part,
            db_part, db_part, db_part,
            M, N, R, triton.next_power_of_2(M), cols_per_split,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), 0, scaling,
            HAS_DBIAS=needs_dbias, COMPUTE=compute, DOT_PRECISION=precision, BLOCK_M=dy_block_m, BLOCK_R=block_r,
            COL_SCALE=dora, HAS_DM=pre is not None, WRITE_DZ=dz is not None, MIXED=False)
    ds = ds_part.sum(0) if col_splits > 1 else ds_part[0]
    if needs_db:
        db = db_part.sum(0).to(lora_B.dtype)
    if needs_dbias:
        dbias = dbias_part.sum(0).to(dy.dtype)
    if pre is not None:
        dm = dm_part.sum(0)

    if needs_da:
        # Enough (column-block × row-split) programs to fill the GPU about twice; partials summed below.
        col_blocks = triton.cdiv(K, 128)
        splits = max(1, min(triton.cdiv(M, 256), (2 * _num_sms(device)) // col_blocks))
        rows_per_split = triton.cdiv(M, splits)
        da_part = new_output((splits, R, K), torch.float32, device)
        launch(_da_tuned, _lora_bwd_da_kernel, DA_DEFAULT, INTERPRET_DA,
                lambda c: (triton.cdiv(K, c["BLOCK_K"]), splits), on_cpu,
                x, ds, da_part, da_part, da_part, da_part, M, K, R, triton.next_power_of_2(M), rows_per_split,
                x.stride(0), x.stride(1), seed, dropout_p, keep_scale,
                DROPOUT=dropout, COMPUTE=compute, DOT_PRECISION=precision, BLOCK_R=block_r, MIXED=False)
        da = da_part.sum(0).to(lora_A.dtype)

    if needs_dx:
        dx = new_output((M, K), dy.dtype, device)
        lora_gemm(dz if dz is not None else dy, _weight_operand(weight, False), ds, lora_A, None, dx, keep_scale, seed,
                  dropout_p, variant=variant)
    return dx, da, db, dbias, dm


# ----------------------------------------------------------------------------------------------------------
# Mixed-adapter batches: the rows of each adapter (and the base's) in tiles of MIXED_TILE rows, -1 padding each
# adapter's last tile; every kernel takes a tile's rows from the table, so nothing is gathered or sorted in memory.
# ----------------------------------------------------------------------------------------------------------

INTERPRET_MIXED_TILE = INTERPRET_GEMM["BLOCK_M"]  # (= INTERPRET_DY_BLOCK_M)
INTERPRET_MIXED_DA_BLOCK_K = 32
MIXED_DA_BLOCK_K = 64


@dataclass
class MixedTiles:
    rows: torch.Tensor  # (tiles · tile,) int32 row ids, -1 for padding
    tile_adapter: torch.Tensor  # (tiles,) int32, -1: the base alone
    tiles: int
    tile: int
    adapters: list[int]  # tile_adapter on the host, for the per-tile values


@dataclass
class MixedLaunch:
    """One mixed GEMM launch: the tiles, each tile's low-rank scale and dropout rate, and the stride between the
    stacked adapters' ``up`` operands."""
    rows: torch.Tensor
    tile_adapter: torch.Tensor
    tile_scale: torch.Tensor
    tile_p: torch.Tensor
    tiles: int
    tile: int
    stride_ua: int


def mixed_tiles(index: torch.Tensor, n: int, device) -> MixedTiles:
    """Tiles for a mixed batch's per-row adapter index (-1 = base): each adapter's rows in order, padded to whole
    tiles (read on the host once)."""
    tile = INTERPRET_MIXED_TILE if torch.device(device).type == "cpu" else MIXED_TILE
    host = index.cpu().to(torch.int64)
    rows, adapters = [], []
    for a in range(-1, n):
        ids = (host == a).nonzero().flatten().to(torch.int32)
        if ids.numel() == 0:
            continue
        count = -(-ids.numel() // tile)
        rows.append(torch.cat([ids, torch.full((count * tile - ids.numel(),), -1, dtype=torch.int32)]))
        adapters += [a] * count
    rows_t = torch.cat(rows) if rows else torch.empty(0, dtype=torch.int32)
    return MixedTiles(rows_t.to(device), torch.tensor(adapters, dtype=torch.int32, device=device), len(adapters), tile,
                      adapters)


def _per_tile(tiles: MixedTiles, values, device) -> torch.Tensor:
    """A per-adapter value for each tile (0 for base tiles), fp32."""
    return torch.tensor([values[a] if a >= 0 else 0.0 for a in tiles.adapters], dtype=torch.float32, device=device)


def lora_mixed_fwd(x, weight, bias, A_stack, B_stack, scalings, dropout_ps, seed: int, tiles: MixedTiles):
    """Forward of a mixed batch: y (M, N) and S (M, R) fp32, with A_stack (n, R, K) and B_stack (n, N, R) the
    adapters stacked (ranks zero-padded to R), ``scalings`` and ``dropout_ps`` per adapter."""
    M, K = x.shape
    N = weight.shape[0]
    n, R, _ = A_stack.shape
    device, on_cpu = x.device, x.device.type == "cpu"
    s = new_output((M, R), torch.float32, device)
    y = new_output((M, N), x.dtype, device)
    if M == 0:
        return y, s
    tile_p = _per_tile(tiles, dropout_ps, device)
    dropout = max(dropout_ps) > 0.0
    block_k = 32 if on_cpu else 64
    _lora_shrink_kernel[(tiles.tiles,)](
        x, A_stack, s, tiles.rows, tiles.tile_adapter, tile_p, M, K, R, triton.next_power_of_2(M),
        x.stride(0), x.stride(1), A_stack.stride(1), A_stack.stride(2), A_stack.stride(0),
        seed, 0.0, 1.0,
        DROPOUT=dropout, COMPUTE=compute_dtype(x.dtype, on_cpu), DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=tiles.tile, BLOCK_K=block_k, BLOCK_R=_rank_block(R), MIXED=True,
        **({} if on_cpu else dict(num_warps=4, num_stages=3)))
    gemm_tiles = MixedLaunch(tiles.rows, tiles.tile_adapter, _per_tile(tiles, scalings, device), tile_p, tiles.tiles,
                             tiles.tile, B_stack.stride(0))
    lora_gemm(x, weight.t(), s, B_stack[0].t(), bias, y, 1.0, mixed=gemm_tiles)  # (dropout was S's, in the shrink)
    return y, s


def lora_mixed_bwd(dy, x, weight, A_stack, B_stack, s, scalings, dropout_ps, seed: int, tiles: MixedTiles,
                   needs_dx: bool, needs_dab: bool, needs_dbias: bool):
    """Backward of a mixed batch: (dx, dA_stack (n, R, K), dB_stack (n, N, R), dbias), each None where not needed;
    every adapter's gradients summed over its own tiles only."""
    M, N = dy.shape
    n, R, K = A_stack.shape
    device, on_cpu = dy.device, dy.device.type == "cpu"
    precision, compute = dot_precision(dy.dtype), compute_dtype(dy.dtype, on_cpu)
    block_r = _rank_block(R)
    dx = da = db = dbias = None
    if M == 0:
        return (torch.zeros((0, K), dtype=dy.dtype, device=device) if needs_dx else None,
                torch.zeros_like(A_stack, dtype=torch.float32) if needs_dab else None,
                torch.zeros_like(B_stack, dtype=torch.float32) if needs_dab else None,
                torch.zeros(N, dtype=dy.dtype, device=device) if needs_dbias else None)
    dropout = max(dropout_ps) > 0.0
    tile_p = _per_tile(tiles, dropout_ps, device)
    quantum = INTERPRET_DY["BLOCK_N"] if on_cpu else max(c.kwargs["BLOCK_N"] for c in DY_CONFIGS)
    col_splits = max(1, min(triton.cdiv(N, quantum), (2 * _num_sms(device)) // max(1, tiles.tiles)))
    cols_per_split = triton.cdiv(triton.cdiv(N, col_splits), quantum) * quantum
    col_splits = triton.cdiv(N, cols_per_split)
    ds_part = new_output((col_splits, M, R), torch.float32, device)
    db_part = new_output((tiles.tiles, N, R), torch.float32, device)
    dbias_part = new_output((tiles.tiles, N), torch.float32, device) if needs_dbias else db_part
    tile_scale = _per_tile(tiles, scalings, device)
    launch(_dy_tuned, _lora_bwd_dy_kernel, DY_DEFAULT, INTERPRET_DY, lambda c: (tiles.tiles, col_splits), on_cpu,
           dy, B_stack, s, ds_part, db_part, dbias_part, db_part, db_part, db_part, db_part,
           tiles.rows, tiles.tile_adapter, tile_scale,
           M, N, R, triton.next_power_of_2(M), cols_per_split,
           dy.stride(0), dy.stride(1), B_stack.stride(1), B_stack.stride(2), B_stack.stride(0), 1.0,
           HAS_DBIAS=needs_dbias, COMPUTE=compute, DOT_PRECISION=precision, BLOCK_M=tiles.tile, BLOCK_R=block_r,
           COL_SCALE=False, HAS_DM=False, WRITE_DZ=False, MIXED=True)
    ds = ds_part.sum(0) if col_splits > 1 else ds_part[0]
    adapter_of_tile = tiles.tile_adapter.to(torch.long)
    keep = adapter_of_tile >= 0  # the base's tiles add nothing to any adapter
    if needs_dbias:
        dbias = dbias_part.sum(0).to(dy.dtype)
    if needs_dab:
        db = torch.zeros((n, N, R), dtype=torch.float32, device=device).index_add_(
            0, adapter_of_tile[keep], db_part[keep])
        block_k = INTERPRET_MIXED_DA_BLOCK_K if on_cpu else MIXED_DA_BLOCK_K
        da_part = new_output((tiles.tiles, R, K), torch.float32, device)
        _lora_bwd_da_kernel[(triton.cdiv(K, block_k), tiles.tiles)](
            x, ds, da_part, tiles.rows, tiles.tile_adapter, tile_p, M, K, R, triton.next_power_of_2(M), tiles.tile,
            x.stride(0), x.stride(1), seed, 0.0, 1.0,
            DROPOUT=dropout, COMPUTE=compute, DOT_PRECISION=precision, BLOCK_M=tiles.tile, BLOCK_K=block_k,
            BLOCK_R=block_r, MIXED=True, **({} if on_cpu else dict(num_warps=4, num_stages=3)))
        da = torch.zeros((n, R, K), dtype=torch.float32, device=device).index_add_(
            0, adapter_of_tile[keep], da_part[keep])
    if needs_dx:
        dx = new_output((M, K), dy.dtype, device)
        keep_scale = _per_tile(tiles, [1.0 / (1.0 - p) for p in dropout_ps], device)
        launch_dx = MixedLaunch(tiles.rows, tiles.tile_adapter, keep_scale, tile_p, tiles.tiles, tiles.tile,
                                A_stack.stride(0))
        lora_gemm(dy, weight, ds, A_stack[0], None, dx, 1.0, seed, max(dropout_ps), mixed=launch_dx)
    return dx, da, db, dbias


# DoRA's norm runs once per layer and step, reading W once: fixed tiles, the K range split to fill the GPU.
NORM_BLOCKS = dict(BLOCK_N=64, BLOCK_K=64)
INTERPRET_NORM = dict(BLOCK_N=32, BLOCK_K=32)


def dora_norm(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """DoRA's row norms ‖W + scaling·B A‖ (N,) in fp32, without forming the (N, K) matrix; any strides."""
    N, K = weight.shape
    R = lora_A.shape[0]
    device, on_cpu = weight.device, weight.device.type == "cpu"
    blocks = INTERPRET_NORM if on_cpu else NORM_BLOCKS
    row_blocks = triton.cdiv(N, blocks["BLOCK_N"])
    quantum = blocks["BLOCK_K"]
    splits = max(1, min(triton.cdiv(K, quantum), (2 * _num_sms(device)) // row_blocks))
    cols_per_split = triton.cdiv(triton.cdiv(K, splits), quantum) * quantum
    splits = triton.cdiv(K, cols_per_split)
    sq_part = new_output((splits, N), torch.float32, device)
    if N:
        _dora_norm_kernel[(row_blocks, splits)](
            weight, lora_A, lora_B, sq_part, N, K, R, cols_per_split,
            weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0),
            lora_B.stride(1), scaling,
            DOT_PRECISION=dot_precision(torch.float32), BLOCK_R=_rank_block(R), **blocks,
            **({} if on_cpu else dict(num_warps=4, num_stages=3)))
    return sq_part.sum(0).sqrt_()


def autotune_winners() -> dict[str, str]:
    """The config autotuning chose last for each tuned kernel (for the GPU check's report)."""
    tuned = {"_lora_gemm_kernel": _gemm_tuned, "_lora_gemm_tma_kernel": _tma_tuned,
             "low-rank pass (cublas variant)": _lowrank_pass_tuned,
             "_lora_shrink_kernel": _shrink_tuned, "_lora_bwd_dy_kernel": _dy_tuned,
             "_lora_bwd_da_kernel": _da_tuned}
    return {name: str(getattr(kernel, "best_config", None)) for name, kernel in tuned.items()}
