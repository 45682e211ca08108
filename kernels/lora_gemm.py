"""The fused LoRA GEMM: ``out = a · b + lowrank_scale · [mask ⊙] (l · u) + bias``, one kernel for forward's Y and
backward's dX.

Written as a low-rank prologue, the base K loop (``common.gemm_k_loop``; a 4-bit base dequantises W's tiles as it
loads them) and an epilogue: the seams where the LoRA-family members plug in as constexpr switches. DoRA scales
columns in the epilogue; (IA)³, with the low-rank term off, scales a's columns in the K loop or out's columns in the
epilogue; mixed-adapter batches pick each row tile's adapter in the prologue; and the
schedules (``GEMM_SCHEDULES``) move the low-rank term after the K loop, leave the base product to cuBLAS, or read the
operands by TMA on a persistent grid (``_lora_gemm_tma_kernel``, Hopper).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import gemm_k_loop, tile_indices
from .lora_dropout import _dropout_keep


@triton.jit
def _mixed_tile(rows_ptr, tile_adapter_ptr, tile, BLOCK_M: tl.constexpr):
    """A mixed batch's row tile ``tile``: its rows (int64; -1 pads), which of them exist, its adapter (-1: base)."""
    rows = tl.load(rows_ptr + tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return rows, rows >= 0, tl.load(tile_adapter_ptr + tile)


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_kernel(
    a_ptr, b_ptr, l_ptr, u_ptr, bias_ptr, out_ptr, col_scale_ptr, pre_ptr,
    rows_ptr, tile_adapter_ptr, tile_lowrank_scale_ptr, tile_p_ptr,
    absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
    in_scale_ptr, scale_rows_ptr, dot_ptr, dot_part_ptr,
    M, N, K, R, M_BUCKET, TILED_M,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_lm, stride_lr, stride_ur, stride_un, stride_ua,
    stride_om, stride_on, stride_st, stride_dm, stride_dn,
    lowrank_scale, seed, p,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, LOWRANK_LAST: tl.constexpr, BASE_IN_OUT: tl.constexpr,
    COL_SCALE: tl.constexpr, STORE_PRE: tl.constexpr, MIXED: tl.constexpr,
    NF4: tl.constexpr, NESTED: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, ALIGNED: tl.constexpr,
    LOWRANK: tl.constexpr, IN_SCALE: tl.constexpr, BIAS_FIRST: tl.constexpr, COL_DOT: tl.constexpr,
):
    """out (M, N) = [scale (N) ⊙] (a (M, K) · b (K, N) + lowrank_scale · [mask ⊙] (l (M, R) · u (R, N)) [+ out])
    + bias (N).

    Forward: a = x, b = Wᵀ, l = S, u = Bᵀ, lowrank_scale = s. Backward: a = dY, b = W, l = dS, u = A,
    lowrank_scale = 1/(1-p), and the dropout mask on the low-rank term. ``M_BUCKET`` is only an autotune key.
    LOWRANK_LAST picks the schedule: False seeds the accumulator with the low-rank dot before the K loop; True loads
    the low-rank operands before the loop but adds their dot after it, so the pipeline's first loads wait on
    nothing (which one is faster is for a GPU to measure: see ``GEMM_SCHEDULES``). BASE_IN_OUT: out already holds
    the base product (the "cublas" schedule: cuBLAS wrote it), so there is no K loop and the term is added onto out.
    COL_SCALE (DoRA): the columns are scaled (fp32 scale) before the bias, and STORE_PRE writes the unscaled sum to
    pre (out's shape and strides), which backward's dm needs.
    MIXED (a mixed-adapter batch, prologue order): the grid walks TILED_M rows of tiles; tile i holds the rows
    listed at rows_ptr (-1 pads) and one adapter, ``tile_adapter[i]`` (u at u_ptr + adapter·stride_ua, scale
    ``tile_lowrank_scale[i]``, dropout rate ``tile_p[i]``; -1: the base alone), so a and out are read and written by
    row.
    NF4 (a 4-bit base W): b_ptr holds W's packed codes, its tiles dequantised as the K loop loads them (the absmax
    and code-book pointers, NESTED for double-quantised absmaxes, QBLOCK and QBLOCK2 the block sizes, ALIGNED how
    the absmaxes are loaded: see ``common.nf4_b_tile``).
    (IA)³, with LOWRANK off (no low-rank term: l, u and their scale are not read): IN_SCALE scales a's columns in the
    K loop (``common.gemm_k_loop``; 2: each row i by row ``scale_rows[i]`` of the table at in_scale_ptr, rows
    ``stride_st`` apart, -1 none); COL_SCALE 2 scales out's columns likewise by rows of the table at col_scale_ptr;
    BIAS_FIRST adds the bias before the scale ((x Wᵀ + b) ⊙ l); COL_DOT writes, before the scale, the column sums of
    acc ⊙ dot (dot of out's shape, strides stride_dm, stride_dn) over each DOT_ROWS rows to dot_part (rows
    ``cdiv(M, DOT_ROWS)``, N columns): dl of an input scale, where dY W is at hand.
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
                                       stride_lm, stride_lr, stride_ur, stride_un,
                                       tl.load(tile_lowrank_scale_ptr + pid_m),
                                       COMPUTE, BLOCK_R)
            acc = _lowrank_term(lo, up, rm, pid_n * BLOCK_N, N, seed, p, DROPOUT, DOT_PRECISION, BLOCK_N)
    else:
        pid_m, pid_n, rm, rn, rm_load, rn_load = tile_indices(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if LOWRANK:
            lo, up = _lowrank_operands(l_ptr, u_ptr, rm_load, rn_load, R, stride_lm, stride_lr, stride_ur, stride_un,
                                       lowrank_scale, COMPUTE, BLOCK_R)
        if LOWRANK_LAST or not LOWRANK:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = _lowrank_term(lo, up, rm, pid_n * BLOCK_N, N, seed, p, DROPOUT, DOT_PRECISION, BLOCK_N)
    scale_rows_load = rm_load
    if IN_SCALE == 2 or COL_SCALE == 2:  # (IA)³ mixed: each row's vector, -1 for none
        scale_rows_load = tl.load(scale_rows_ptr + rm_load).to(tl.int64)

    if not BASE_IN_OUT:  # the base K loop (NF4: W's tiles dequantised as they load)
        acc = gemm_k_loop(acc, a_ptr, b_ptr, rm_load, rn_load, K, stride_am, stride_ak, stride_bk, stride_bn,
                          COMPUTE, DOT_PRECISION, BLOCK_K, EVEN_K, absmax_ptr, code_ptr, absmax_code_ptr,
                          absmax_scale_ptr, absmax_offset_ptr, NF4, NESTED, QBLOCK, QBLOCK2, ALIGNED,
                          in_scale_ptr, scale_rows_load, stride_st, IN_SCALE)
    if LOWRANK_LAST and LOWRANK and not MIXED:
        acc += _lowrank_term(lo, up, rm, pid_n * BLOCK_N, N, seed, p, DROPOUT, DOT_PRECISION, BLOCK_N)
    if COL_DOT:
        _column_dot(acc, dot_ptr, dot_part_ptr, rm, rn, rm_load, rn_load, pid_m, M, N, stride_dm, stride_dn,
                    BLOCK_M)

    _gemm_epilogue(acc, bias_ptr, out_ptr, col_scale_ptr, pre_ptr, rm, rn, rn_load, M, N, stride_om, stride_on,
                   HAS_BIAS, BASE_IN_OUT, COL_SCALE, STORE_PRE, scale_rows_load, stride_st, BIAS_FIRST)


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_tma_kernel(
    a_desc, b_desc, l_ptr, u_ptr, bias_ptr, out_ptr, col_scale_ptr, pre_ptr,
    M, N, K, R, M_BUCKET,
    stride_lm, stride_lr, stride_ur, stride_un,
    stride_om, stride_on,
    lowrank_scale, seed, p,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, B_KN: tl.constexpr, COL_SCALE: tl.constexpr, STORE_PRE: tl.constexpr,
):
    """The "tma" schedule of ``_lora_gemm_kernel`` (same result, Hopper only): a persistent grid, each program
    walking output tiles, with a and b read by the Tensor Memory Accelerator through descriptors (a over (M, K); b
    over (K, N) when B_KN, else over (N, K), i.e. W as stored, transposed in registers for free). Descriptors
    zero-fill past the edges, so the K loop needs no masks; the low-rank term seeds the accumulator as in the
    prologue schedule."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n, rm, rn, rm_load, rn_load = tile_indices(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        lo, up = _lowrank_operands(l_ptr, u_ptr, rm_load, rn_load, R, stride_lm, stride_lr, stride_ur, stride_un,
                                   lowrank_scale, COMPUTE, BLOCK_R)
        acc = _lowrank_term(lo, up, rm, pid_n * BLOCK_N, N, seed, p, DROPOUT, DOT_PRECISION, BLOCK_N)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            if B_KN:
                b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
            else:
                b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K]).T
            acc = tl.dot(a.to(COMPUTE), b.to(COMPUTE), acc, input_precision=DOT_PRECISION)
        _gemm_epilogue(acc, bias_ptr, out_ptr, col_scale_ptr, pre_ptr, rm, rn, rn_load, M, N, stride_om, stride_on,
                       HAS_BIAS, False, COL_SCALE, STORE_PRE)


@triton.jit
def _lowrank_operands(l_ptr, u_ptr, rm_load, rn_load, R, stride_lm, stride_lr, stride_ur, stride_un, lowrank_scale,
                      COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr):
    """This output tile's low-rank operands, lowrank_scale · l (BLOCK_M × R) and u (R × BLOCK_N), in the compute dtype
    (a mixed batch passes its tile's adapter's u and scale, read from the tile tables)."""
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    lo = tl.load(l_ptr + rm_load[:, None] * stride_lm + rr[None, :] * stride_lr, mask=r_ok[None, :], other=0.0)
    up = tl.load(u_ptr + rr[:, None] * stride_ur + rn_load[None, :] * stride_un, mask=r_ok[:, None], other=0.0)
    return (lo * lowrank_scale).to(COMPUTE), up.to(COMPUTE)


@triton.jit
def _lowrank_term(lo, up, rm, n0, N, seed, p, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """[mask ⊙] (lo · up) for the tile: one (BLOCK_M×R)·(R×BLOCK_N) dot, fp32."""
    term = tl.dot(lo, up, input_precision=DOT_PRECISION)
    if DROPOUT:
        term = tl.where(_dropout_keep(seed, p, rm, n0, N, BLOCK_N), term, 0.0)
    return term


# The rows each partial of COL_DOT's column sums covers: every config's BLOCK_M is a multiple, so every config writes
# every partial (the buffer is sized before autotuning picks one, and no stale partial survives a config change).
DOT_ROWS = 32
_DOT_ROWS = tl.constexpr(DOT_ROWS)  # (the kernels' copy)


@triton.jit
def _column_dot(acc, dot_ptr, dot_part_ptr, rm, rn, rm_load, rn_load, pid_m, M, N, stride_dm, stride_dn,
                BLOCK_M: tl.constexpr):
    """dot_part[pid_m·(BLOCK_M/DOT_ROWS) + j, n] = Σ over rows j·DOT_ROWS.. of this tile of acc ⊙ dot (fp32)."""
    other = tl.load(dot_ptr + rm_load[:, None] * stride_dm + rn_load[None, :] * stride_dn).to(tl.float32)
    product = tl.where((rm < M)[:, None], acc * other, 0.0)
    parts = tl.sum(tl.reshape(product, (BLOCK_M // _DOT_ROWS, _DOT_ROWS, product.shape[1])), axis=1)
    prow = pid_m * (BLOCK_M // _DOT_ROWS) + tl.arange(0, BLOCK_M // _DOT_ROWS)
    tl.store(dot_part_ptr + prow[:, None].to(tl.int64) * N + rn[None, :], parts,
             mask=(prow < tl.cdiv(M, _DOT_ROWS))[:, None] & (rn < N)[None, :])


@triton.jit
def _gemm_epilogue(acc, bias_ptr, out_ptr, col_scale_ptr, pre_ptr, rm, rn, rn_load, M, N, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, ADD_OUT: tl.constexpr, COL_SCALE: tl.constexpr, STORE_PRE: tl.constexpr,
                   scale_rows_load=None, stride_st=0, BIAS_FIRST: tl.constexpr = False):
    """What out holds, the column scale (DoRA's, or (IA)³'s: 2 gathers each row's from a table, row
    ``scale_rows_load[i]`` (int64) for row i; the unscaled tile kept in pre first), the bias (BIAS_FIRST: before the
    scale), then the store."""
    in_bounds = (rm < M)[:, None] & (rn < N)[None, :]
    offsets = rm[:, None].to(tl.int64) * stride_om + rn[None, :].to(tl.int64) * stride_on
    if ADD_OUT:
        acc += tl.load(out_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_BIAS and BIAS_FIRST:
        acc += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
    if COL_SCALE:
        if STORE_PRE:
            tl.store(pre_ptr + offsets, acc.to(pre_ptr.dtype.element_ty), mask=in_bounds)
        if COL_SCALE == 2:
            acc = acc * tl.load(col_scale_ptr + scale_rows_load[:, None] * stride_st + rn_load[None, :],
                                mask=(scale_rows_load >= 0)[:, None], other=1.0).to(tl.float32)
        else:
            acc = acc * tl.load(col_scale_ptr + rn_load).to(tl.float32)[None, :]
    if HAS_BIAS and not BIAS_FIRST:
        acc += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=in_bounds)
