"""The LoRA kernels' dropout: keep-decisions drawn in-kernel by Philox and never stored.

The keep-decision of element (m, k) of an (M, K) matrix is ``uniform_i(seed, m·⌈K/4⌉ + k//4) >= p`` in every kernel,
where ``uniform_i`` is the (k mod 4)-th of the four numbers one Philox call draws; this is what lets the mask be
regenerated from the seed (backward, the dX GEMM's low-rank term) instead of saved.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AOT_K, AOT_M, new_output


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


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Materialize the keep-mask (1 = keep) the other kernels use for ``seed`` — for tests and references."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _dropout_keep(seed, p, rm, tl.program_id(1) * BLOCK_K, K, BLOCK_K)
    ptrs = out_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    tl.store(ptrs, tl.where(keep, 1, 0).to(tl.int8), mask=(rm < M)[:, None] & (rk < K)[None, :])


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device) -> torch.Tensor:
    """The (M, K) bool keep-mask the kernels draw for ``seed`` and drop probability ``p``."""
    M, K = shape
    out = new_output((M, K), torch.int8, device)
    if M and K:
        cfg = dict(BLOCK_M=64, BLOCK_K=256) if torch.device(device).type == "cpu" else dict(BLOCK_M=64, BLOCK_K=128)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))
        _dropout_mask_kernel[grid](out, M, K, seed, p, **cfg)
    return out.bool()


def aot_launches() -> list:
    """The mask kernel as the ahead-of-time compile builds it (see ``common.AOT_M``)."""
    mask = dict(out_ptr="i8", M=AOT_M, K=AOT_K, seed=12345, p=0.1, constexprs=dict(BLOCK_M=64, BLOCK_K=128))
    return [("_dropout_mask_kernel", "mask", mask, [dict(kwargs={}, num_warps=4, num_stages=1)])]
