"""Triton kernels of the bottleneck adapter ``out = residual + s · (act(h W_dᵀ + b_d) W_uᵀ + b_u)``.

One GEMM kernel with fused prologue/epilogue options serves all four big products:
  forward   pre  = h · W_dᵀ + b_d                          (saved for backward, M×m)
            out  = res + s · (act(pre) · W_uᵀ + b_u)        (activation applied to pre as it is loaded)
  backward  dpre = s · (g · W_u) ⊙ act'(pre)                (fp32, M×m)
            dh   = dpre · W_d [+ g when the residual is h]
The weight and bias gradients (gᵀ·act(pre), dpreᵀ·h and the column sums) are left to torch's GEMMs. CPU tensors
run under Triton's interpreter with one small config; CUDA tensors use autotuned configs pruned by shared memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.checks import ACTIVATION_CODES

from .common import (
    GEMM_CONFIGS,
    GEMM_DEFAULT,
    GEMM_KEY,
    INTERPRET_GEMM,
    autotuned,
    compute_dtype,
    dot_precision,
    even_k,
    grouped_tile,
    launch,
    new_output,
    register_shared_memory,
)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        return z * tl.sigmoid(z)
    else:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return z * tl.sigmoid(2.0 * inner)  # 0.5·z·(1 + tanh(u)) = z·sigmoid(2u)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        sig = tl.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    else:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)


@triton.jit
def _adapter_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, res_ptr, aux_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
    scale,
    ACT: tl.constexpr, ACT_ON_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    TIMES_ACT_GRAD: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """out (M, N) = [res +] scale · (f(a) (M, K) · b (K, N) [+ bias]) [⊙ act'(aux)], with f = act when ACT_ON_A.

    ``M_BUCKET`` is only an autotune key. aux (M, N) is the pre-activation when TIMES_ACT_GRAD.
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_load = (rm % M).to(tl.int64)
    rn_load = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm_load[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn_load[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = rk < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if ACT_ON_A:
            a = _act(a.to(tl.float32), ACT)  # act(0) = 0 for every activation, so K padding stays zero
        acc = tl.dot(a.to(COMPUTE), b.to(COMPUTE), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
    acc = acc * scale
    if TIMES_ACT_GRAD:
        pre = tl.load(aux_ptr + rm_load[:, None] * stride_xm + rn_load[None, :] * stride_xn).to(tl.float32)
        acc = acc * _act_grad(pre, ACT)
    if HAS_RES:
        acc += tl.load(res_ptr + rm_load[:, None] * stride_rm + rn_load[None, :] * stride_rn).to(tl.float32)
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


# Both operands' tiles per stage, counted at 4 bytes an element: an operand may be fp32 (dpre) on any base.
register_shared_memory("_adapter_gemm_kernel",
                       lambda b, es, arch: ((b["BLOCK_M"] * b["BLOCK_K"] + b["BLOCK_K"] * b["BLOCK_N"]) * 4, 0))
_gemm = even_k(_adapter_gemm_kernel)
_gemm_tuned = autotuned(_gemm, GEMM_CONFIGS, GEMM_KEY, "_adapter_gemm_kernel")


def adapter_gemm(a, b, out, *, bias=None, res=None, aux=None, scale=1.0, activation="relu", act_on_a=False):
    """``out = [res +] scale · (f(a) · b [+ bias]) [⊙ act'(aux)]`` for a (M, K), b (K, N), out/res/aux (M, N),
    any strides (transposed views are free). Returns ``out``."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    on_cpu = a.device.type == "cpu"
    dtype = b.dtype
    args = (a, b, bias if bias is not None else out, res if res is not None else out,
            aux if aux is not None else out, out, M, N, K, triton.next_power_of_2(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            *(res.stride() if res is not None else (0, 0)), *(aux.stride() if aux is not None else (0, 0)),
            out.stride(0), out.stride(1), float(scale))
    meta = dict(ACT=ACTIVATION_CODES[activation], ACT_ON_A=act_on_a, HAS_BIAS=bias is not None,
                HAS_RES=res is not None, TIMES_ACT_GRAD=aux is not None, COMPUTE=compute_dtype(dtype, on_cpu),
                DOT_PRECISION=dot_precision(dtype))
    launch(_gemm_tuned, _gemm, GEMM_DEFAULT, INTERPRET_GEMM,
           lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),), on_cpu, *args, **meta)
    return out


def adapter_fwd(h, w_down, b_down, w_up, b_up, residual, scaling, activation):
    """Forward on 2-D h (M, d): returns (out (M, d) in h's dtype, pre (M, m) in h's dtype)."""
    M, d = h.shape
    m = w_down.shape[0]
    pre = adapter_gemm(h, w_down.t(), new_output((M, m), h.dtype, h.device), bias=b_down)
    out = adapter_gemm(pre, w_up.t(), new_output((M, d), h.dtype, h.device), bias=b_up,
                       res=h if residual is None else residual, scale=scaling, activation=activation, act_on_a=True)
    return out, pre


def adapter_bwd_inputs(g, w_down, w_up, pre, scaling, activation, residual_is_h, needs_dh):
    """dpre (M, m) fp32 = s·(g W_u) ⊙ act'(pre), and dh (M, d) = dpre W_d [+ g] when needed."""
    M = g.shape[0]
    m = w_down.shape[0]
    dpre = adapter_gemm(g, w_up, new_output((M, m), torch.float32, g.device), aux=pre, scale=scaling,
                        activation=activation)
    dh = None
    if needs_dh:
        dh = adapter_gemm(dpre, w_down, new_output((M, w_down.shape[1]), g.dtype, g.device),
                          res=g if residual_is_h else None)
    return dpre, dh

