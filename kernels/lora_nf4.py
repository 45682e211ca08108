"""A 4-bit (NF4) base weight in the LoRA GEMM: the operand that describes it to the kernel (its tiles are dequantised
by the K loop's load, ``common.nf4_b_tile``), and the kernel that dequantises W a chunk of rows at a time for the
"cublas" schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastpeft.nf4 import nf4_code

from .common import AOT_K, AOT_N, compute_dtype, new_output, nf4_absmax, nf4_tile


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                        out_ptr, start, count, COMPUTE: tl.constexpr, NESTED: tl.constexpr, QBLOCK: tl.constexpr,
                        QBLOCK2: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = element start + i of an NF4 weight, dequantised (as ``fastpeft.nf4``: bit for bit), i < count: the
    "cublas" schedule's chunks of W, dequantised once for cuBLAS."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < count
    idx = start + offs
    absmax = nf4_absmax(idx // QBLOCK, ok, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, NESTED,
                        QBLOCK2)
    tl.store(out_ptr + offs, nf4_tile(packed_ptr, idx, ok, absmax, code_ptr, out_ptr.dtype.element_ty, COMPUTE),
             mask=ok)


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
        if not w.nested:  # (the double quantisation's tables: none)
            return w.absmax, code, None, None, None
        return w.absmax, code, w.absmax_code, w.absmax_scale, w.absmax_offset

    def constexprs(self) -> dict:
        w = self.weight
        # W's rows start on block boundaries and every config's BLOCK_K (<= 64) and BLOCK_N divide or are multiples
        # of the blocksize: the absmaxes load once per block (see ``common.nf4_b_tile``).
        aligned = w.shape[1] % w.blocksize == 0 and w.blocksize >= 64
        return dict(NF4=True, NESTED=w.nested, QBLOCK=w.blocksize, QBLOCK2=w.absmax_blocksize,
                    ALIGNED=(1 if self.transposed else 2) if aligned else 0)


_DENSE = dict(NF4=False, NESTED=False, QBLOCK=64, QBLOCK2=256, ALIGNED=0)


def _exact_absmax(nf4: bool) -> dict:
    """Launch options of a kernel dequantising NF4: no fused multiply-add, so a double-quantised absmax is code · scale
    rounded, then + offset rounded, as ``fastpeft.nf4`` and bitsandbytes compute it (a GPU build fuses them into
    one FMA otherwise, one ulp off in about 7% of the blocks)."""
    return dict(enable_fp_fusion=False) if nf4 else {}


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


def aot_launches() -> list:
    """The "cublas" schedule's chunks of an NF4 W, dequantised for cuBLAS, as the ahead-of-time compile builds them."""
    chunk = AOT_N * AOT_K // 4
    dequant = dict(packed_ptr="u8", absmax_ptr="u8", code_ptr="fp32", absmax_code_ptr="fp32",
                   absmax_scale_ptr="fp32", absmax_offset_ptr="fp32", out_ptr="bf16", start=chunk, count=chunk,
                   constexprs=dict(COMPUTE=tl.bfloat16, NESTED=True, QBLOCK=64, QBLOCK2=256, BLOCK=1024),
                   options=_exact_absmax(True))
    return [("_nf4_dequant_kernel", "NF4 chunk for cuBLAS", dequant, [dict(kwargs={}, num_warps=4, num_stages=1)])]
