"""What the Triton kernels of every op share: the GEMM tile configurations, autotuning and its shared-memory pruner,
the launch switch (interpreter / autotuned / default config), the grouped tile order, and the dtype an op computes
in. An op's module (``lora_linear.py``, ``adapter_bottleneck.py``) holds its kernels and launchers and registers the
shared-memory need of each kernel here.

How a LoRA-family variant plugs in (DoRA, mixed-adapter batches, a 4-bit base): as constexpr switches of the same
kernels, not copies. ``_lora_gemm_kernel`` is split into seams for that: a prologue that seeds the accumulator with
the low-rank product (MIXED: each row tile's rows and adapter read from tables), the K loop whose W tile load is the
place a dequantising load goes, and an epilogue that scales, adds the bias and stores (COL_SCALE: DoRA's per-column
scale).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastpeft.checks import new_output  # noqa: F401  (the kernels' launchers allocate through it)

# FASTPEFT_AUTOTUNE=0 launches each kernel's default config instead of autotuning (tests: fewer compiles).
AUTOTUNE = os.environ.get("FASTPEFT_AUTOTUNE", "1") != "0"


def config(num_warps, num_stages, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# The GEMM tiles, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): BLOCK_K=64 suits Hopper's wgmma, BLOCK_K=32 Ampere's
# mma.sync; the 64-wide tiles serve small or odd shapes.
GEMM_CONFIGS = [
    config(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    for bm, bn, bk, w, s in [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (128, 128, 32, 4, 4), (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4), (64, 64, 32, 4, 5),
    ]
]
# Without autotuning: a config that fits every supported GPU's shared memory, fp32 included.
GEMM_DEFAULT = GEMM_CONFIGS[6]  # 128×128×32, 4 warps, 4 stages
# The interpreter runs one small configuration: blocks ≥ 16 for tl.dot, few programs for speed.
INTERPRET_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
GEMM_KEY = ["M_BUCKET", "N", "K"]  # M_BUCKET = next power of two of M: one tuning per size class

# Kernels whose K may not be a multiple of BLOCK_K get EVEN_K, so the common case loads without masks.
even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})


@triton.jit
def grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile number ``tile`` (a program id, or a persistent program's step) in
    grouped order: GROUP_M row tiles share each column tile of the right-hand operand while it is hot in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (tile // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (tile % pids_per_group) % group_rows, (tile % pids_per_group) // group_rows


@triton.jit
def tile_indices(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n, rm, rn, rm_load, rn_load) of output tile number ``tile`` (see :func:`grouped_tile`): its tile
    coordinates, row and column indices, and the same wrapped into range as int64 for loads, which then need no row
    or column masks (the store masks the extra lanes)."""
    pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, rm, rn, (rm % M).to(tl.int64), (rn % N).to(tl.int64)


@triton.jit
def gemm_k_loop(acc, a_ptr, b_ptr, rm_load, rn_load, K, stride_am, stride_ak, stride_bk, stride_bn,
                COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """acc += a[rm_load, :K] · b[:K, rn_load], tiles multiplied in COMPUTE, accumulated in fp32: the K loop of every
    GEMM kernel here (rm_load/rn_load are int64 row and column indices, wrapped into range so that loads need no
    row or column masks; EVEN_K: K is a multiple of BLOCK_K, so they need no K masks either). Seam: a quantised base
    would dequantise its b tile here, as it loads."""
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm_load[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn_load[None, :] * stride_bn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = rk < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(COMPUTE), b.to(COMPUTE), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


# kernel name -> need(blocks, sizes, num_stages, arch) -> bytes; each op registers its own kernels.
_SHARED_MEMORY = {}
# kernel name -> spills(blocks, num_warps) -> a reason when a config spills registers for that launch, else None
_SPILLING = {}


def register_spilling(kernel_name: str, spills) -> None:
    """Declare the configs of a kernel that spill registers for some launches (its constexprs tell which): the
    autotuner's pruner drops them there, and the AOT report marks them (found with ``ptxas -v``)."""
    _SPILLING[kernel_name] = spills


def spilling_reason(kernel_name: str, blocks: dict, num_warps: int) -> str | None:
    spills = _SPILLING.get(kernel_name)
    return spills(blocks, num_warps) if spills is not None else None


def register_shared_memory(kernel_name: str, need) -> None:
    """Declare the shared memory of a kernel's configs: ``need(blocks, sizes, num_stages, arch)`` returns the bytes
    for the config's ``blocks`` (its constexprs too), the element ``sizes`` of its tensor arguments (argument name
    -> bytes), its pipeline depth and ``arch`` (80: Ampere, 90: Hopper).

    How Triton lays a kernel out: a pipelined operand tile loaded as it is used is kept ``num_stages`` times (on
    Ampere the fused GEMM's, ``num_stages - 1``); one converted in registers first (fp32 adapters in bf16, an
    activated tile) ``num_stages - 1`` times, and on Hopper once more in the MMA's dtype; transient layout
    conversions (the epilogue's tile) reuse that space.
    """
    _SHARED_MEMORY[kernel_name] = need


def shared_memory_estimate(kernel_name: str, blocks: dict, num_stages: int, sizes: dict, arch: int = 90) -> int:
    """Bytes of shared memory a config needs on ``arch``: never less than the compiled kernel's, and within 10% or
    16 KiB of it (the AOT tests compare the two for every config)."""
    return _SHARED_MEMORY[kernel_name](blocks, sizes, num_stages, arch)


def _shared_memory_pruner(kernel_name):
    """An ``early_config_prune`` dropping configs that spill for the launch or do not fit the device's shared
    memory."""
    def prune(configs, named_args, **kwargs):
        # Tensors, and TMA descriptors by the tensor they describe.
        tensors = {k: getattr(v, "base", v) for k, v in named_args.items()
                   if isinstance(getattr(v, "base", v), torch.Tensor)}
        device = next(iter(tensors.values())).device
        limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        arch = 10 * torch.cuda.get_device_capability(device)[0]
        sizes = {k: v.element_size() for k, v in tensors.items()}

        def need(cfg):
            return shared_memory_estimate(kernel_name, {**kwargs, **cfg.kwargs}, cfg.num_stages, sizes, arch)
        kept = [c for c in configs if not spilling_reason(kernel_name, {**kwargs, **c.kwargs}, c.num_warps)] or configs
        fitting = [c for c in kept if need(c) <= limit]
        return fitting or [min(kept, key=need)]
    return prune


def autotuned(kernel, configs, key, kernel_name):
    return triton.autotune(configs=configs, key=key,
                           prune_configs_by={"early_config_prune": _shared_memory_pruner(kernel_name)})(kernel)


def launch(tuned, plain, default, interpret_config, grid, on_cpu, *args, **kwargs):
    """Run a kernel: the interpreter's config for CPU tensors; on a GPU the autotuned kernel, or its ``default``
    config when autotuning is off. ``grid`` maps a config's blocks to the launch grid."""
    if on_cpu:
        plain[grid(interpret_config)](*args, **kwargs, **interpret_config)
    elif AUTOTUNE:
        tuned[grid](*args, **kwargs)
    else:
        plain[grid(default.kwargs)](*args, **kwargs, **default.kwargs, num_warps=default.num_warps,
                                    num_stages=default.num_stages)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def compute_dtype(dtype: torch.dtype, on_cpu: bool):
    """The dtype tiles are multiplied in (accumulation is always fp32).

    On a GPU that is the base dtype, so bf16/fp16 run on tensor cores. Triton's interpreter cannot compute
    in bfloat16 (it keeps bf16 as raw uint16 bits), so there bf16 tiles are widened to fp32 after loading;
    loads, stores and every index are exercised the same.
    """
    if on_cpu and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full fp32 precision unless the user allowed TF32 for matmuls.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
