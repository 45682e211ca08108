"""The fused (IA)³ linear: its launchers, and the column sums its backward needs.

(IA)³ is a feature of the fused LoRA GEMM (``lora_gemm._lora_gemm_kernel`` with its low-rank term off), not a kernel
of its own:
  forward, output scale   y = (x Wᵀ + b) ⊙ l   — the epilogue adds the bias, keeps the unscaled tile (``pre``, for
                                                  dl) and scales the columns;
  forward, input scale    y = (x ⊙ l) Wᵀ + b   — x's tiles scaled as the K loop loads them (no scaled copy of x);
  backward, output scale  dX = (dY ⊙ l) W      — dY's tiles scaled in the K loop; dl = Σ_rows dY ⊙ pre and
                                                  Σ_rows dY (db = l ⊙ that) by ``_ia3_col_sums_kernel``;
  backward, input scale   dX = (dY W) ⊙ l      — the column scale in the epilogue, and before it dl's partial column
                                                  sums of (dY W) ⊙ x, where the product is at hand.
Mixed batches (inference) gather each row's vector from a table by a row index, in the same places.
Partial sums are reduced with ``torch.sum`` (no float atomics): results are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AOT_M, AOT_N, new_output
from .lora_gemm import DOT_ROWS
from .lora_linear import ScaleLaunch, lora_gemm
from .lora_nf4 import _weight_operand

# Rows per partial of the column sums (fixed: the partials are allocated before the launch), and its column tile.
COL_SUMS_BLOCK_M, COL_SUMS_BLOCK_N = 256, 128
INTERPRET_COL_SUMS = dict(BLOCK_M=32, BLOCK_N=32)


@triton.jit
def _ia3_col_sums_kernel(a_ptr, b_ptr, ab_part_ptr, a_part_ptr, M, N, stride_am, stride_an, stride_bm, stride_bn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """Over the BLOCK_M rows of row block ``program_id(0)``: ab_part[block, n] = Σ a ⊙ b and a_part[block, n] = Σ a,
    in fp32 (a and b (M, N), any strides), ROWS rows at a time."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    cols = rn.to(tl.int64)[None, :]
    sum_ab = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, BLOCK_M, ROWS):
        rm = pid_m * BLOCK_M + i + tl.arange(0, ROWS)
        ok = (rm < M)[:, None] & n_ok[None, :]
        rows = rm.to(tl.int64)[:, None]
        a = tl.load(a_ptr + rows * stride_am + cols * stride_an, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows * stride_bm + cols * stride_bn, mask=ok, other=0.0).to(tl.float32)
        sum_ab += tl.sum(a * b, axis=0)
        sum_a += tl.sum(a, axis=0)
    tl.store(ab_part_ptr + pid_m * N + rn, sum_ab, mask=n_ok)
    tl.store(a_part_ptr + pid_m * N + rn, sum_a, mask=n_ok)


def column_sums(a, b):
    """(Σ_rows a ⊙ b, Σ_rows a), both (N,) fp32, for a and b of one shape (M, N): one pass over both."""
    M, N = a.shape
    on_cpu = a.device.type == "cpu"
    block_m, block_n = ((INTERPRET_COL_SUMS["BLOCK_M"], INTERPRET_COL_SUMS["BLOCK_N"]) if on_cpu
                        else (COL_SUMS_BLOCK_M, COL_SUMS_BLOCK_N))
    blocks = triton.cdiv(M, block_m)
    ab_part = new_output((blocks, N), torch.float32, a.device)
    a_part = new_output((blocks, N), torch.float32, a.device)
    _ia3_col_sums_kernel[(blocks, triton.cdiv(N, block_n))](
        a, b, ab_part, a_part, M, N, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, ROWS=min(32, block_m), num_warps=4)
    return ab_part.sum(0), a_part.sum(0)


def _scale_tables(scale, scale_rows):
    """The scale as the kernels read it: fp32, contiguous (a vector, or with ``scale_rows`` a table), and the row
    index as int32."""
    scale = scale.to(torch.float32).contiguous()
    return scale, (None if scale_rows is None else scale_rows.to(torch.int32).contiguous())


def ia3_fwd(x, weight, bias, scale, feedforward: bool, keep_pre: bool = False, scale_rows=None):
    """Forward of the fused (IA)³ linear: ``(y, pre)``.

    x (M, K) fp16/bf16/fp32, any strides; weight (N, K) (or a 4-bit base's NF4Weight), bias (N,) in x's dtype or
    None; scale: l (N,) (output scale) or (K,) (``feedforward``: input scale), any float dtype; or with
    ``scale_rows`` (M,) a table (T, N or K) whose row scale_rows[i] scales row i (-1: none).
    y (M, N) in x's dtype; pre = x Wᵀ + b (M, N), the unscaled output dl needs, when ``keep_pre`` (output scale),
    else None.
    """
    M, N = x.shape[0], weight.shape[0]
    y = new_output((M, N), x.dtype, x.device)
    pre = new_output((M, N), x.dtype, x.device) if keep_pre and not feedforward else None
    if M == 0:
        return y, pre
    scale, rows = _scale_tables(scale, scale_rows)
    w = _weight_operand(weight, True)
    if feedforward:
        lora_gemm(x, w, None, None, bias, y, 1.0, scales=ScaleLaunch(in_scale=scale, scale_rows=rows))
    else:
        lora_gemm(x, w, None, None, bias, y, 1.0, col_scale=scale, pre=pre,
                  scales=ScaleLaunch(scale_rows=rows, bias_first=True))
    return y, pre


def ia3_bwd(dy, x, weight, scale, feedforward: bool, pre, needs_dx: bool, needs_dl: bool, needs_dbias: bool):
    """Backward of the fused (IA)³ linear (one vector l): ``(dx, dl, dbias)``, None where not needed.

    dy (M, N) in x's dtype, any strides; x (M, K) as in forward (read only for an input scale's dl); pre from
    forward (an output scale's dl). dl (l's shape) comes back in fp32, dx and dbias in dy's dtype.
    """
    M, N = dy.shape
    K = weight.shape[1]
    device = dy.device
    scale, _ = _scale_tables(scale, None)
    dx = dl = dbias = None
    if M == 0:
        dx = torch.zeros((0, K), dtype=dy.dtype, device=device) if needs_dx else None
        dl = torch.zeros_like(scale) if needs_dl else None
        dbias = torch.zeros(N, dtype=dy.dtype, device=device) if needs_dbias else None
        return dx, dl, dbias
    w = _weight_operand(weight, False)
    if not feedforward:
        if needs_dx:
            dx = new_output((M, K), dy.dtype, device)
            lora_gemm(dy, w, None, None, None, dx, 1.0, scales=ScaleLaunch(in_scale=scale))
        if needs_dl or needs_dbias:
            if needs_dl:
                dl, dy_sum = column_sums(dy, pre)
            else:
                dy_sum = dy.sum(0, dtype=torch.float32)
            dbias = (dy_sum * scale).to(dy.dtype) if needs_dbias else None
        return dx, dl, dbias
    if needs_dx or needs_dl:
        dx = new_output((M, K), dy.dtype, device)
        dot_part = new_output((triton.cdiv(M, DOT_ROWS), K), torch.float32, device) if needs_dl else None
        lora_gemm(dy, w, None, None, None, dx, 1.0, col_scale=scale,
                  scales=ScaleLaunch(dot=x if needs_dl else None, dot_part=dot_part))
        if needs_dl:
            dl = dot_part.sum(0)
        dx = dx if needs_dx else None
    if needs_dbias:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dl, dbias


def aot_launches() -> list:
    """The column sums' launch for the ahead-of-time compile (the GEMM's (IA)³ launches are the IA3 member's, in
    ``lora_tuning``)."""
    example = dict(a_ptr="bf16", b_ptr="bf16", ab_part_ptr="fp32", a_part_ptr="fp32", M=AOT_M, N=AOT_N,
                   stride_am=AOT_N, stride_an=1, stride_bm=AOT_N, stride_bn=1,
                   constexprs=dict(BLOCK_M=COL_SUMS_BLOCK_M, BLOCK_N=COL_SUMS_BLOCK_N, ROWS=32))
    return [("_ia3_col_sums_kernel", "backward, (IA)³ output scale", example,
             [dict(kwargs={}, num_warps=4, num_stages=3)])]
