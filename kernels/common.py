"""What the Triton kernels of every op share: the GEMM tile configurations, autotuning and its shared-memory pruner,
the launch switch (interpreter / autotuned / default config), the grouped tile order, and the dtype an op computes
in. An op's modules (the ``lora_*.py`` of the LoRA linear, ``adapter_bottleneck.py``) hold its kernels and launchers,
register the shared-memory need of each kernel here and declare their ahead-of-time compile launches
(``aot_launches``).

How a LoRA-family member plugs in (DoRA, mixed-adapter batches, a 4-bit base): as constexpr switches of the same
kernels, not copies. ``_lora_gemm_kernel`` is split into seams for that: a prologue that seeds the accumulator with
the low-rank product (MIXED: each row tile's rows and adapter read from tables), the K loop whose W tile load is the
place a dequantising load goes, and an epilogue that scales, adds the bias and stores (COL_SCALE: DoRA's per-column
scale).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from fastpeft.checks import new_output  # noqa: F401  (the kernels' launchers allocate through it)
from fastpeft.environment import AUTOTUNE_ENV, env_switch

# The ahead-of-time compile (kernels/aot.py) builds every kernel for a typical training launch: bf16 base, fp32
# adapters, these sizes. Each kernel module lists its launches in ``aot_launches()``: (kernel name, profile,
# {arg: example value}, [configs]); an example value that is a string names a pointer's element type, an int or float
# stands for a scalar argument, anything under "constexprs" is a compile-time constant, "options" holds the launch's
# compile options.
AOT_M, AOT_K, AOT_N, AOT_R = 8192, 4096, 4096, 16


def aot_configs(configs) -> list[dict]:
    """Autotuning configs as the ahead-of-time compile takes them."""
    return [dict(kwargs=c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]


# FASTPEFT_AUTOTUNE=0 launches each kernel's default config instead of autotuning (tests: fewer compiles); read once,
# when the kernels are first imported (a bad value is refused there).
AUTOTUNE = env_switch(AUTOTUNE_ENV)


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
def nf4_absmax(block, mask, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, NESTED: tl.constexpr,
               QBLOCK2: tl.constexpr):
    """The fp32 absmax of NF4 blocks ``block`` (any shape); NESTED: absmax_code[q2] · absmax_scale[block // QBLOCK2]
    + offset, in fp32 (as ``NF4Weight.block_absmax``)."""
    if NESTED:
        q2 = tl.load(absmax_ptr + block, mask=mask, other=0)
        absmax = tl.load(absmax_code_ptr + q2) * tl.load(absmax_scale_ptr + block // QBLOCK2, mask=mask, other=0.0)
        absmax += tl.load(absmax_offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def nf4_tile(packed_ptr, idx, mask, absmax, code_ptr, W_DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
    """The elements at flat indices ``idx`` (int64, row-major in W) of an NF4 weight, ``absmax`` their blocks' (fp32,
    broadcastable), dequantised as ``fastpeft.nf4`` does: code[q] · absmax in fp32, rounded to W_DTYPE (so a tile
    equals the same elements of ``NF4Weight.dequantize()`` bit for bit). Element i is nibble ``1 - i % 2`` (high
    first) of byte i // 2."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0)
    nibble = (byte >> ((1 - (idx & 1)) * 4).to(tl.uint8)) & 15
    return rounded(tl.load(code_ptr + nibble) * absmax, W_DTYPE, COMPUTE)


@triton.jit
def rounded(v, DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
    """fp32 ``v`` rounded to DTYPE (to nearest even), held in COMPUTE: DTYPE itself on a GPU; under the interpreter,
    which computes bf16 in fp32 and whose fp32 -> bf16 cast truncates, rounded by hand so the bits are a GPU's."""
    if DTYPE == tl.bfloat16 and COMPUTE == tl.float32:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    else:
        out = v.to(DTYPE)
    return out


@triton.jit
def nf4_b_tile(b_ptr, k0, rk, rn_load, n0, k_ok, stride_bk, stride_bn, absmax_ptr, code_ptr, absmax_code_ptr,
               absmax_scale_ptr, absmax_offset_ptr, W_DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
               NESTED: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, ALIGNED: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """A GEMM's b tile (BLOCK_K, BLOCK_N) at rows k0 + rk, columns rn_load (from n0, wrapped) of b = Wᵀ or W, W in
    NF4 and dequantised. ALIGNED: 0, one absmax load per element; when W's rows span whole blocks (QBLOCK >= 64 >=
    BLOCK_K, and a multiple of BLOCK_N or of QBLOCK), the absmaxes are loaded once per block and broadcast: 1, b = Wᵀ,
    one per column of the tile; 2, b = W, one per row of the tile and QBLOCK columns."""
    idx = (k0 + rk).to(tl.int64)[:, None] * stride_bk + rn_load[None, :] * stride_bn
    if ALIGNED == 0:
        absmax = nf4_absmax(idx // QBLOCK, k_ok[:, None], absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                            absmax_offset_ptr, NESTED, QBLOCK2)
    elif ALIGNED == 1:  # Wᵀ: column n of the tile is row n of W, within one block
        absmax = nf4_absmax((rn_load * stride_bn + k0) // QBLOCK, rn_load >= 0, absmax_ptr, absmax_code_ptr,
                            absmax_scale_ptr, absmax_offset_ptr, NESTED, QBLOCK2)[None, :]
    elif BLOCK_N <= QBLOCK:  # W: each row of the tile within one block (the valid columns; the rest are not stored)
        absmax = nf4_absmax(((k0 + rk).to(tl.int64) * stride_bk + n0) // QBLOCK, k_ok, absmax_ptr,
                            absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, NESTED, QBLOCK2)[:, None]
    else:  # W: each row of the tile spans BLOCK_N // QBLOCK whole blocks (those past the row's end are not loaded)
        group = n0 // QBLOCK + tl.arange(0, BLOCK_N // QBLOCK)
        groups = (k0 + rk).to(tl.int64)[:, None] * (stride_bk // QBLOCK) + group[None, :]
        absmax = nf4_absmax(groups, k_ok[:, None] & (group < stride_bk // QBLOCK)[None, :], absmax_ptr,
                            absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, NESTED, QBLOCK2)
        absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (BLOCK_K, BLOCK_N // QBLOCK, QBLOCK)),
                            (BLOCK_K, BLOCK_N))
    return nf4_tile(b_ptr, idx, k_ok[:, None], absmax, code_ptr, W_DTYPE, COMPUTE)


@triton.jit
def gemm_k_loop(acc, a_ptr, b_ptr, rm_load, rn_load, K, stride_am, stride_ak, stride_bk, stride_bn,
                COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                absmax_ptr=None, code_ptr=None, absmax_code_ptr=None, absmax_scale_ptr=None, absmax_offset_ptr=None,
                NF4: tl.constexpr = False, NESTED: tl.constexpr = False, QBLOCK: tl.constexpr = 64,
                QBLOCK2: tl.constexpr = 256, ALIGNED: tl.constexpr = 0,
                in_scale_ptr=None, scale_rows_load=None, stride_st=0, IN_SCALE: tl.constexpr = 0):
    """acc += a[rm_load, :K] · b[:K, rn_load], tiles multiplied in COMPUTE, accumulated in fp32: the K loop of every
    GEMM kernel here (rm_load/rn_load are int64 row and column indices, wrapped into range so that loads need no
    row or column masks; EVEN_K: K is a multiple of BLOCK_K, so they need no K masks either).
    NF4 (a 4-bit base): b_ptr is the packed codes of W, and b's tile is dequantised as it loads (:func:`nf4_b_tile`);
    b is Wᵀ or W with the strides a dense contiguous W would have, which are what give each element's flat index.
    IN_SCALE ((IA)³ on a feed-forward layer): a's columns are scaled as its tiles load, a ⊙ s rounded to a's dtype
    (what PEFT's scaled copy of x holds) — 1: s = in_scale (K,) for every row; 2: each row its own, row
    ``scale_rows_load[i]`` of the table at in_scale_ptr (rows ``stride_st`` apart; -1: no scale).
    """
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm_load[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn_load[None, :] * stride_bn
    n0 = 0
    if NF4:  # the tile's first column (a multiple of BLOCK_N; its valid columns are n0 .. max)
        n0 = tl.max(rn_load) // rn_load.shape[0] * rn_load.shape[0]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - k * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if IN_SCALE == 1:
            scale = tl.load(in_scale_ptr + k * BLOCK_K + rk, mask=k_ok, other=0.0)[None, :]
            a = rounded(a.to(tl.float32) * scale, a_ptr.dtype.element_ty, COMPUTE)
        elif IN_SCALE == 2:
            scale = tl.load(in_scale_ptr + scale_rows_load[:, None] * stride_st + (k * BLOCK_K + rk)[None, :],
                            mask=(scale_rows_load >= 0)[:, None] & k_ok[None, :], other=1.0)  # (rows: int64)
            a = rounded(a.to(tl.float32) * scale, a_ptr.dtype.element_ty, COMPUTE)
        if NF4:
            b = nf4_b_tile(b_ptr, k * BLOCK_K, rk, rn_load, n0, k_ok, stride_bk, stride_bn, absmax_ptr, code_ptr,
                           absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, a_ptr.dtype.element_ty, COMPUTE,
                           NESTED, QBLOCK, QBLOCK2, ALIGNED, BLOCK_K, rn_load.shape[0])
        elif EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(COMPUTE), b.to(COMPUTE), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


# kernel name -> need(blocks, sizes, num_stages, arch) -> bytes; each op registers its own kernels.
_SHARED_MEMORY = {}
# kernel name -> spills(blocks, num_warps) -> a reason when a config spills registers for that launch, else None
_SPILLING = {}


@dataclass(frozen=True)
class Member:
    """A LoRA-family member (DoRA, a mixed-adapter batch, a 4-bit base, (IA)³) as a feature of an op's shared kernels,
    declared once: what the tuning side and the ahead-of-time compile know of it derives from this.

    ``switch``: the constexpr that marks the member on, in every kernel it touches. ``launches``: kernel name ->
    the kernel's base AOT profile ("forward") -> what the member changes in that launch (``constexprs`` and any other
    example argument); the compile builds each, named with the member after the profile's first part ("forward,
    DoRA", "forward, DoRA, tma"). ``configs``: kernel name -> the configs its launches run, where not the kernel's
    own. ``shared_memory``: kernel name -> its shared-memory model (see ``register_shared_memory``) where the member
    changes the kernel's. ``spills``: ``(blocks, num_warps) -> reason or None``, the configs that spill registers
    with the member on. The autotune key takes every constexpr a launch sets (``autotuned``), so a member's launches
    never inherit another's winner.
    """
    name: str
    switch: str
    launches: dict
    configs: dict = field(default_factory=dict)
    shared_memory: dict = field(default_factory=dict)
    spills: object = None
    inverted: bool = False  # on where the switch is off ((IA)³: LOWRANK, the GEMM without its low-rank term)

    def on(self, blocks: dict) -> bool:
        return bool(blocks.get(self.switch, self.inverted)) != self.inverted  # (absent: off)

    def profile(self, base: str) -> str:
        first, _, rest = base.partition(", ")
        return ", ".join(p for p in (first, self.name, rest) if p)

    def example(self, base_example: dict, change: dict) -> dict:
        """The base launch's example with this member on."""
        change = dict(change)
        constexprs = dict(base_example["constexprs"], **change.pop("constexprs", {}))
        return dict(base_example, **change, constexprs=constexprs)


def declare_members(members, models: dict) -> None:
    """Register each kernel's shared-memory model (``models``: kernel name -> the base model) and spill rules with
    the members' own folded in: a member's model replaces the base where the member is on."""
    for kernel, base in models.items():
        own = [(m, m.shared_memory[kernel]) for m in members if kernel in m.shared_memory]

        def need(blocks, sizes, stages, arch, base=base, own=own):
            model = next((f for m, f in own if m.on(blocks)), base)
            return model(blocks, sizes, stages, arch)
        register_shared_memory(kernel, need)
    for kernel in {k for m in members for k in m.launches}:
        rules = [m for m in members if m.spills is not None and kernel in m.launches]
        if rules:
            def spills(blocks, num_warps, rules=rules):
                return next((r for m in rules if m.on(blocks) and (r := m.spills(blocks, num_warps))), None)
            register_spilling(kernel, spills)


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


def launch_constexprs(kernel, configs) -> list[str]:
    """The constexpr parameters of ``kernel`` (a JIT function, or one under ``triton.heuristics``) that its launches
    set, rather than its ``configs``."""
    tuned = {name for config in configs for name in config.kwargs}
    while not inspect.isfunction(kernel):  # down through heuristics and the JIT (or interpreter) wrapper
        kernel = kernel.fn
    # (annotations are strings in modules with postponed evaluation)
    return [name for name, p in inspect.signature(kernel).parameters.items()
            if name not in tuned and (p.annotation is tl.constexpr or str(p.annotation).endswith("constexpr"))]


def autotuned(kernel, configs, key, kernel_name):
    """``kernel`` autotuned over ``configs`` per ``key``, and per every constexpr its launches set: each value of one
    compiles another kernel, and the pruner's shared-memory and spill models read them, so no launch (DoRA's column
    scale, a mixed batch) inherits a winner measured for another, least of all one its pruner drops. (A constexpr
    a heuristic sets is not among the launch's arguments; the autotuner skips it.)"""
    key = list(dict.fromkeys([*key, *launch_constexprs(kernel, configs)]))
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
