"""Triton kernels of the bottleneck adapter ``out = residual + s · (act(h W_dᵀ + b_d) W_uᵀ + b_u)``.

One GEMM kernel with fused epilogue options serves all four big products:
  forward   pre  = h · W_dᵀ + b_d, and act(pre)             (pre saved for backward; both M×m, written together)
            out  = res + s · (act(pre) · W_uᵀ + b_u)
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
    AOT_M,
    GEMM_KEY,
    INTERPRET_GEMM,
    aot_configs,
    autotuned,
    compute_dtype,
    config,
    dot_precision,
    even_k,
    gemm_k_loop,
    launch,
    new_output,
    register_shared_memory,
    tile_indices,
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
    ACT: tl.constexpr, STORE_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    TIMES_ACT_GRAD: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """out (M, N) = [res +] scale · (a (M, K) · b (K, N) [+ bias]) [⊙ act'(aux)].

    aux (M, N): with TIMES_ACT_GRAD the pre-activation, read; with STORE_ACT it receives act(out), written with out
    (the activation is applied once per element here, not once per column tile by the GEMM that reads it).
    ``M_BUCKET`` is only an autotune key.
    """
    _, _, rm, rn, rm_load, rn_load = tile_indices(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = gemm_k_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptr, b_ptr, rm_load, rn_load, K,
                      stride_am, stride_ak, stride_bk, stride_bn, COMPUTE, DOT_PRECISION, BLOCK_K, EVEN_K)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
    acc = acc * scale
    if TIMES_ACT_GRAD:
        pre = tl.load(aux_ptr + rm_load[:, None] * stride_xm + rn_load[None, :] * stride_xn).to(tl.float32)
        acc = acc * _act_grad(pre, ACT)
    if HAS_RES:
        acc += tl.load(res_ptr + rm_load[:, None] * stride_rm + rn_load[None, :] * stride_rn).to(tl.float32)
    in_bounds = (rm < M)[:, None] & (rn < N)[None, :]
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :].to(tl.int64) * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_bounds)
    if STORE_ACT:
        act_ptrs = aux_ptr + rm[:, None].to(tl.int64) * stride_xm + rn[None, :].to(tl.int64) * stride_xn
        tl.store(act_ptrs, _act(acc, ACT).to(aux_ptr.dtype.element_ty), mask=in_bounds)


def _gemm_shared(b, sizes, stages, arch):
    """Shared memory of one config in bytes (see ``register_shared_memory``), fitted to the compiled kernels. The a
    tile passes through registers when it is converted (fp32 dpre times a bf16 weight)."""
    a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_ptr"]
    b_tile = b["BLOCK_K"] * b["BLOCK_N"] * sizes["b_ptr"]
    epilogue = b["BLOCK_M"] * b["BLOCK_N"] * sizes["out_ptr"]
    if arch < 90:
        return max((stages - 1) * (a_tile + b_tile), epilogue)
    return stages * b_tile + (stages - 1 if sizes["a_ptr"] != sizes["b_ptr"] else stages) * a_tile


register_shared_memory("_adapter_gemm_kernel", _gemm_shared)
# The adapter's own tiles: its epilogues (activation, its derivative, the residual) need registers beside the
# accumulator, so at most 64 accumulator values a thread; the 128×256 tiles of the LoRA GEMM spilled here, and 16
# warps cap a thread at 128 registers, which spills too. None of these spills on sm_80 or sm_90 (the AOT tests).
ADAPTER_GEMM_CONFIGS = [
    config(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 5),
    ]
]
ADAPTER_GEMM_DEFAULT = ADAPTER_GEMM_CONFIGS[1]  # fits every supported GPU's shared memory, fp32 included
_gemm = even_k(_adapter_gemm_kernel)
_gemm_tuned = autotuned(_gemm, ADAPTER_GEMM_CONFIGS, GEMM_KEY, "_adapter_gemm_kernel")


def adapter_gemm(a, b, out, *, bias=None, res=None, aux=None, act_out=None, scale=1.0, activation="relu"):
    """``out = [res +] scale · (a · b [+ bias]) [⊙ act'(aux)]`` for a (M, K), b (K, N), out/res/aux (M, N), any
    strides (transposed views are free), and ``act_out = act(out)`` when given. Returns ``out``."""
    if aux is not None and act_out is not None:
        raise ValueError("adapter_gemm: aux (read) and act_out (written) share the kernel's aux argument")
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    on_cpu = a.device.type == "cpu"
    dtype = b.dtype
    side = aux if aux is not None else act_out  # the kernel's aux argument: read (aux) or written (act_out)
    args = (a, b, bias, res, side, out, M, N, K, triton.next_power_of_2(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            *(res.stride() if res is not None else (0, 0)), *(side.stride() if side is not None else (0, 0)),
            out.stride(0), out.stride(1), float(scale))
    meta = dict(ACT=ACTIVATION_CODES[activation], STORE_ACT=act_out is not None, HAS_BIAS=bias is not None,
                HAS_RES=res is not None, TIMES_ACT_GRAD=aux is not None, COMPUTE=compute_dtype(dtype, on_cpu),
                DOT_PRECISION=dot_precision(dtype))
    launch(_gemm_tuned, _gemm, ADAPTER_GEMM_DEFAULT, INTERPRET_GEMM,
           lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),), on_cpu, *args, **meta)
    return out


def adapter_fwd(h, w_down, b_down, w_up, b_up, residual, scaling, activation):
    """Forward on 2-D h (M, d): returns (out (M, d) in h's dtype, pre (M, m) in h's dtype)."""
    M, d = h.shape
    m = w_down.shape[0]
    act = new_output((M, m), h.dtype, h.device)
    pre = adapter_gemm(h, w_down.t(), new_output((M, m), h.dtype, h.device), bias=b_down, act_out=act,
                       activation=activation)
    out = adapter_gemm(act, w_up.t(), new_output((M, d), h.dtype, h.device), bias=b_up,
                       res=h if residual is None else residual, scale=scaling)
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


def aot_launches() -> list:
    """The adapter's GEMM as the ahead-of-time compile builds it, d=4096, m=64 (see ``common.AOT_M``): forward's
    down GEMM (bias; pre and GELU(pre) written), up GEMM (bias, scale, residual epilogue), backward's dpre GEMM
    (×act'(pre) epilogue, fp32 out) and dh GEMM (fp32 dpre · bf16 W_d)."""
    M, d, m = AOT_M, 4096, 64
    adapter_down = dict(
        a_ptr="bf16", b_ptr="bf16", bias_ptr="bf16", res_ptr=None, aux_ptr="bf16", out_ptr="bf16",
        M=M, N=m, K=d, M_BUCKET=M, stride_am=d, stride_ak=1, stride_bk=1, stride_bn=d, stride_rm=0, stride_rn=0,
        stride_xm=m, stride_xn=1, stride_om=m, stride_on=1, scale=1.0,
        constexprs=dict(ACT=1, STORE_ACT=True, HAS_BIAS=True, HAS_RES=False, TIMES_ACT_GRAD=False,
                        COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", EVEN_K=True))
    adapter_up = dict(
        a_ptr="bf16", b_ptr="bf16", bias_ptr="bf16", res_ptr="bf16", aux_ptr=None, out_ptr="bf16",
        M=M, N=d, K=m, M_BUCKET=M, stride_am=m, stride_ak=1, stride_bk=1, stride_bn=m, stride_rm=d, stride_rn=1,
        stride_xm=0, stride_xn=0, stride_om=d, stride_on=1, scale=2.0,
        constexprs=dict(ACT=1, STORE_ACT=False, HAS_BIAS=True, HAS_RES=True, TIMES_ACT_GRAD=False,
                        COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", EVEN_K=True))
    adapter_dpre = dict(
        a_ptr="bf16", b_ptr="bf16", bias_ptr=None, res_ptr=None, aux_ptr="bf16", out_ptr="fp32",
        M=M, N=m, K=d, M_BUCKET=M, stride_am=d, stride_ak=1, stride_bk=m, stride_bn=1, stride_rm=0, stride_rn=0,
        stride_xm=m, stride_xn=1, stride_om=m, stride_on=1, scale=2.0,
        constexprs=dict(ACT=2, STORE_ACT=False, HAS_BIAS=False, HAS_RES=False, TIMES_ACT_GRAD=True,
                        COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", EVEN_K=True))
    adapter_dh = dict(adapter_dpre, a_ptr="fp32", b_ptr="bf16", aux_ptr=None, out_ptr="bf16", N=d, K=m, stride_am=m,
                      stride_bk=d,
                      stride_xm=0, stride_xn=0, stride_om=d,
                      constexprs=dict(adapter_dpre["constexprs"], ACT=0, TIMES_ACT_GRAD=False))
    configs = aot_configs(ADAPTER_GEMM_CONFIGS)
    return [("_adapter_gemm_kernel", profile, example, configs)
            for profile, example in [("adapter down", adapter_down), ("adapter up", adapter_up),
                                     ("adapter dpre", adapter_dpre), ("adapter dh", adapter_dh)]]
