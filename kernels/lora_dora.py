"""DoRA's weight norm: the row norms ‖W + s·B A‖ without forming the (N, K) matrix, and its launcher."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AOT_K, AOT_N, AOT_R, dot_precision, new_output
from .lora_tuning import _num_sms, _rank_block


@triton.jit
def _dora_norm_kernel(
    w_ptr, lora_a_ptr, lora_b_ptr, sq_part_ptr,
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
    b = tl.load(lora_b_ptr + rn[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32) * scaling
    k_begin = split * cols_per_split
    k_end = tl.minimum(k_begin + cols_per_split, K)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = rk < k_end - k0
        cols = (k0 + rk).to(tl.int64)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(lora_a_ptr + rr[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        v = tl.dot(b, a, w, input_precision=DOT_PRECISION)  # W + s·B A, this tile
        sq += tl.sum(v * v, axis=1)
    tl.store(sq_part_ptr + split.to(tl.int64) * N + rn, sq, mask=n_ok)


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


def aot_launches() -> list:
    """This module's kernel as the ahead-of-time compile builds it (see ``common.AOT_M``)."""
    K, N, R = AOT_K, AOT_N, AOT_R
    norm = dict(w_ptr="bf16", lora_a_ptr="fp32", lora_b_ptr="fp32", sq_part_ptr="fp32", N=N, K=K, R=R,
                cols_per_split=512, stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1, stride_bn=R, stride_br=1,
                scaling=2.0,
                constexprs=dict(DOT_PRECISION="ieee", BLOCK_R=16, **NORM_BLOCKS))
    return [("_dora_norm_kernel", "DoRA norm", norm, [dict(kwargs={}, num_warps=4, num_stages=3)])]
