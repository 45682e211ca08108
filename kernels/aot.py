"""Ahead-of-time compilation of every Triton kernel config for sm_80 and sm_90, with no GPU needed.

    python -m fastpeft.kernels.aot [--arch 80 90] [--jobs N] [--json]

Each kernel is compiled for a typical training launch (bf16 base, fp32 adapters, M=8192, K=N=4096, r=16),
with the argument specializations Triton's launcher would make for it (16-byte aligned pointers, sizes and
strides divisible by 16, unit strides as constants), so the software pipelining and the tensor-core
instructions are those a real launch gets. The report gives, per kernel, config and arch: shared memory,
whether the PTX uses ``wgmma`` (Hopper) or ``mma.sync`` (Ampere) and TMA copies, registers and spill bytes
(``ptxas -v`` on the PTX, with the first ptxas found that reads its PTX version: Triton's own, then CUDA's; None
when none does), and compile seconds. Must run without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# Opt-in shared memory per block (bytes): A100 for sm_80, H100 for sm_90.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

M, K, N, R = 8192, 4096, 4096, 16
ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "i8": 1, "u8": 1, "i32": 4}


def _launches():
    """(kernel name, profile, {arg: example value}, [configs]) for every kernel and launch profile.

    Example values: a string names a pointer's element type, an int or float stands for a scalar argument,
    anything under "constexprs" is a compile-time constant, "options" holds the launch's compile options.
    """
    import triton.language as tl

    from . import adapter_bottleneck as adapter
    from . import lora_tuning as lora
    from .lora_dora import NORM_BLOCKS

    # the base weight's quantisation arguments: none (dense), or NF4 with double-quantised absmaxes
    dense_weight = dict(absmax_ptr="fp32", code_ptr="fp32", absmax_code_ptr="fp32", absmax_scale_ptr="fp32",
                        absmax_offset_ptr="fp32")
    dense = dict(NF4=False, NESTED=False, QBLOCK=64, QBLOCK2=256, ALIGNED=0)
    nf4_weight = dict(dense_weight, b_ptr="u8", absmax_ptr="u8")
    nf4 = dict(NF4=True, NESTED=True, QBLOCK=64, QBLOCK2=256, ALIGNED=1)
    bf16_gemm_fwd = dict(
        a_ptr="bf16", b_ptr="bf16", l_ptr="fp32", u_ptr="fp32", bias_ptr="bf16", out_ptr="bf16", scale_ptr="fp32",
        pre_ptr="bf16", rows_ptr="i32", tile_adapter_ptr="i32", tile_scale_ptr="fp32", tile_p_ptr="fp32",
        **dense_weight, M=M, N=N, K=K, R=R, M_BUCKET=M, TILED_M=M,
        stride_am=K, stride_ak=1, stride_bk=1, stride_bn=K, stride_lm=R, stride_lr=1, stride_ur=1, stride_un=R,
        stride_ua=N * R, stride_om=N, stride_on=1, lr_scale=2.0, seed=0, p=0.0,
        constexprs=dict(HAS_BIAS=True, DROPOUT=False, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", BLOCK_R=16,
                        EVEN_K=True, LOWRANK_LAST=False, BASE_IN_OUT=False, COL_SCALE=False, STORE_PRE=False,
                        MIXED=False, **dense))
    # a 4-bit (NF4, double-quantised) base: W's packed codes dequantised as the K loop loads them
    exact_absmax = dict(enable_fp_fusion=False)  # the launch options of NF4 kernels (see lora_nf4._exact_absmax)
    nf4_gemm_fwd = dict(bf16_gemm_fwd, **nf4_weight, constexprs=dict(bf16_gemm_fwd["constexprs"], **nf4),
                        options=exact_absmax)
    # a mixed-adapter batch: row tiles read through the tables, each tile's adapter from the stack
    mixed_gemm_fwd = dict(bf16_gemm_fwd, TILED_M=M + 64 * 63, constexprs=dict(bf16_gemm_fwd["constexprs"], MIXED=True))
    # DoRA: the column scale in the epilogue, the unscaled product kept for dm
    dora_gemm_fwd = dict(bf16_gemm_fwd, constexprs=dict(bf16_gemm_fwd["constexprs"], COL_SCALE=True, STORE_PRE=True))
    epilogue_gemm_fwd = dict(bf16_gemm_fwd, constexprs=dict(bf16_gemm_fwd["constexprs"], LOWRANK_LAST=True))
    # The "cublas" variant's own launch: cuBLAS did the base product, the low-rank term is added onto out.
    lowrank_pass = dict(bf16_gemm_fwd, constexprs=dict(bf16_gemm_fwd["constexprs"], HAS_BIAS=False,
                                                            BASE_IN_OUT=True))
    rank64_gemm_fwd = dict(bf16_gemm_fwd, R=64, stride_lm=64, stride_un=64,
                           constexprs=dict(bf16_gemm_fwd["constexprs"], BLOCK_R=64))
    bf16_gemm_dx = dict(
        a_ptr="bf16", b_ptr="bf16", l_ptr="fp32", u_ptr="fp32", bias_ptr="bf16", out_ptr="bf16", scale_ptr="fp32",
        pre_ptr="bf16", rows_ptr="i32", tile_adapter_ptr="i32", tile_scale_ptr="fp32", tile_p_ptr="fp32",
        **dense_weight, M=M, N=K, K=N, R=R, M_BUCKET=M, TILED_M=M,
        stride_am=N, stride_ak=1, stride_bk=K, stride_bn=1, stride_lm=R, stride_lr=1, stride_ur=K, stride_un=1,
        stride_ua=R * K, stride_om=K, stride_on=1, lr_scale=1.25, seed=12345, p=0.2,
        constexprs=dict(HAS_BIAS=False, DROPOUT=True, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", BLOCK_R=16,
                        EVEN_K=True, LOWRANK_LAST=False, BASE_IN_OUT=False, COL_SCALE=False, STORE_PRE=False,
                        MIXED=False, **dense))
    nf4_gemm_dx = dict(bf16_gemm_dx, **nf4_weight,
                       constexprs=dict(bf16_gemm_dx["constexprs"], **dict(nf4, ALIGNED=2)), options=exact_absmax)
    mixed_gemm_dx = dict(bf16_gemm_dx, TILED_M=M + 64 * 63, constexprs=dict(bf16_gemm_dx["constexprs"], MIXED=True))
    shrink = dict(
        x_ptr="bf16", a_ptr="fp32", s_ptr="fp32", rows_ptr="i32", tile_adapter_ptr="i32", tile_p_ptr="fp32",
        M=M, K=K, R=R, M_BUCKET=M, stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_aa=R * K,
        seed=12345, p=0.1, keep_scale=1.1,
        constexprs=dict(DROPOUT=True, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", BLOCK_R=16, MIXED=False))
    bwd_dy = dict(
        dy_ptr="bf16", b_ptr="fp32", s_ptr="fp32", ds_part_ptr="fp32", db_part_ptr="fp32", dbias_part_ptr="fp32",
        scale_ptr="fp32", pre_ptr="bf16", dm_part_ptr="fp32", dz_ptr="bf16", rows_ptr="i32", tile_adapter_ptr="i32",
        tile_scale_ptr="fp32",
        M=M, N=N, R=R, M_BUCKET=M, cols_per_split=2048, stride_dym=N, stride_dyn=1, stride_bn=R, stride_br=1,
        stride_ba=N * R, scaling=2.0,
        constexprs=dict(HAS_DBIAS=True, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", BLOCK_M=lora.DY_BLOCK_M,
                        BLOCK_R=16, COL_SCALE=False, HAS_DM=False, WRITE_DZ=False, MIXED=False))
    dora_bwd_dy = dict(bwd_dy, constexprs=dict(bwd_dy["constexprs"], COL_SCALE=True, HAS_DM=True, WRITE_DZ=True))
    mixed_bwd_dy = dict(bwd_dy, constexprs=dict(bwd_dy["constexprs"], BLOCK_M=lora.MIXED_TILE, MIXED=True))
    dora_norm = dict(w_ptr="bf16", a_ptr="fp32", b_ptr="fp32", sq_part_ptr="fp32", N=N, K=K, R=R, cols_per_split=512,
                     stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1, stride_bn=R, stride_br=1, scaling=2.0,
                     constexprs=dict(DOT_PRECISION="ieee", BLOCK_R=16, **NORM_BLOCKS))
    bwd_da = dict(
        x_ptr="bf16", ds_ptr="fp32", da_part_ptr="fp32", rows_ptr="i32", tile_adapter_ptr="i32", tile_p_ptr="fp32",
        M=M, K=K, R=R, M_BUCKET=M, rows_per_split=1024, stride_xm=K, stride_xk=1, seed=12345, p=0.1, keep_scale=1.1,
        constexprs=dict(DROPOUT=True, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", BLOCK_R=16, MIXED=False))
    # the mixed batch's fixed launches: one tile per program (lora_mixed_fwd / lora_mixed_bwd)
    mixed_shrink = dict(shrink, constexprs=dict(shrink["constexprs"], MIXED=True))
    mixed_da = dict(bwd_da, rows_per_split=lora.MIXED_TILE, constexprs=dict(bwd_da["constexprs"], MIXED=True))
    mixed_fixed = [dict(kwargs=dict(BLOCK_M=lora.MIXED_TILE, BLOCK_K=64), num_warps=4, num_stages=3)]
    mask = dict(out_ptr="i8", M=M, K=K, seed=12345, p=0.1, constexprs=dict(BLOCK_M=64, BLOCK_K=128))
    # the "cublas" variant's chunks of an NF4 W, dequantised for cuBLAS
    nf4_dequant = dict(packed_ptr="u8", absmax_ptr="u8", code_ptr="fp32", absmax_code_ptr="fp32",
                       absmax_scale_ptr="fp32", absmax_offset_ptr="fp32", out_ptr="bf16", start=N * K // 4,
                       count=N * K // 4, constexprs=dict(COMPUTE=tl.bfloat16, NESTED=True, QBLOCK=64, QBLOCK2=256,
                                                         BLOCK=1024), options=dict(enable_fp_fusion=False))
    # Bottleneck adapter, d=4096, m=64: forward's down GEMM (bias; pre and GELU(pre) written), up GEMM (bias, scale,
    # residual epilogue), backward's dpre GEMM (×act'(pre) epilogue, fp32 out) and dh GEMM (fp32 dpre · bf16 W_d).
    d, m = 4096, 64
    adapter_down = dict(
        a_ptr="bf16", b_ptr="bf16", bias_ptr="bf16", res_ptr="bf16", aux_ptr="bf16", out_ptr="bf16",
        M=M, N=m, K=d, M_BUCKET=M, stride_am=d, stride_ak=1, stride_bk=1, stride_bn=d, stride_rm=0, stride_rn=0,
        stride_xm=m, stride_xn=1, stride_om=m, stride_on=1, scale=1.0,
        constexprs=dict(ACT=1, STORE_ACT=True, HAS_BIAS=True, HAS_RES=False, TIMES_ACT_GRAD=False,
                        COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", EVEN_K=True))
    adapter_up = dict(
        a_ptr="bf16", b_ptr="bf16", bias_ptr="bf16", res_ptr="bf16", aux_ptr="bf16", out_ptr="bf16",
        M=M, N=d, K=m, M_BUCKET=M, stride_am=m, stride_ak=1, stride_bk=1, stride_bn=m, stride_rm=d, stride_rn=1,
        stride_xm=0, stride_xn=0, stride_om=d, stride_on=1, scale=2.0,
        constexprs=dict(ACT=1, STORE_ACT=False, HAS_BIAS=True, HAS_RES=True, TIMES_ACT_GRAD=False,
                        COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", EVEN_K=True))
    adapter_dpre = dict(
        a_ptr="bf16", b_ptr="bf16", bias_ptr="fp32", res_ptr="fp32", aux_ptr="bf16", out_ptr="fp32",
        M=M, N=m, K=d, M_BUCKET=M, stride_am=d, stride_ak=1, stride_bk=m, stride_bn=1, stride_rm=0, stride_rn=0,
        stride_xm=m, stride_xn=1, stride_om=m, stride_on=1, scale=2.0,
        constexprs=dict(ACT=2, STORE_ACT=False, HAS_BIAS=False, HAS_RES=False, TIMES_ACT_GRAD=True,
                        COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", EVEN_K=True))
    adapter_dh = dict(adapter_dpre, a_ptr="fp32", b_ptr="bf16", out_ptr="bf16", N=d, K=m, stride_am=m, stride_bk=d,
                      stride_xm=0, stride_xn=0, stride_om=d,
                      constexprs=dict(adapter_dpre["constexprs"], ACT=0, TIMES_ACT_GRAD=False))

    # The "tma" variant (Hopper only): a and b as TMA descriptors (``("desc", dtype, block dims)``), forward over W
    # as stored and the dX GEMM with dropout over W as (K, N) rows.
    tma_fwd = {k: v for k, v in bf16_gemm_fwd.items()
               if k not in ("a_ptr", "b_ptr", "stride_am", "stride_ak", "stride_bk", "stride_bn")}
    tma_fwd.update(a_desc=("desc", "bf16", ("BLOCK_M", "BLOCK_K")), b_desc=("desc", "bf16", ("BLOCK_N", "BLOCK_K")),
                   constexprs=dict(HAS_BIAS=True, DROPOUT=False, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee",
                                   BLOCK_R=16, B_KN=False, COL_SCALE=False, STORE_PRE=False))
    tma_dora_fwd = dict(tma_fwd, constexprs=dict(tma_fwd["constexprs"], COL_SCALE=True, STORE_PRE=True))
    tma_dx = {k: v for k, v in bf16_gemm_dx.items()
              if k not in ("a_ptr", "b_ptr", "stride_am", "stride_ak", "stride_bk", "stride_bn")}
    tma_dx.update(a_desc=("desc", "bf16", ("BLOCK_M", "BLOCK_K")), b_desc=("desc", "bf16", ("BLOCK_K", "BLOCK_N")),
                  constexprs=dict(HAS_BIAS=False, DROPOUT=True, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee",
                                  BLOCK_R=16, B_KN=True, COL_SCALE=False, STORE_PRE=False))

    mask_config = [dict(kwargs={}, num_warps=4, num_stages=1)]
    as_dicts = lambda configs: [dict(kwargs=c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)  # noqa: E731
                                for c in configs]
    return [
        ("_lora_gemm_kernel", "forward", bf16_gemm_fwd, as_dicts(lora.GEMM_CONFIGS)),
        ("_lora_gemm_kernel", "forward r=64", rank64_gemm_fwd, as_dicts(lora.GEMM_CONFIGS)),
        ("_lora_gemm_kernel", "forward, low-rank term last", epilogue_gemm_fwd, as_dicts(lora.GEMM_CONFIGS)),
        ("_lora_gemm_kernel", "forward, DoRA", dora_gemm_fwd, as_dicts(lora.GEMM_CONFIGS)),
        ("_lora_gemm_kernel", "forward, mixed adapters", mixed_gemm_fwd, as_dicts(lora.MIXED_GEMM_CONFIGS)),
        ("_lora_gemm_kernel", "backward dX, mixed adapters", mixed_gemm_dx, as_dicts(lora.MIXED_GEMM_CONFIGS)),
        ("_lora_gemm_kernel", "backward dX", bf16_gemm_dx, as_dicts(lora.GEMM_CONFIGS)),  # with dropout
        ("_lora_gemm_kernel", "forward, NF4 base", nf4_gemm_fwd, as_dicts(lora.NF4_GEMM_CONFIGS)),
        ("_lora_gemm_kernel", "backward dX, NF4 base", nf4_gemm_dx, as_dicts(lora.NF4_GEMM_CONFIGS)),
        ("_lora_gemm_kernel", "low-rank pass onto cuBLAS", lowrank_pass, as_dicts(lora.LOWRANK_PASS_CONFIGS)),
        ("_lora_gemm_tma_kernel", "forward, tma", tma_fwd, as_dicts(lora.TMA_GEMM_CONFIGS)),
        ("_lora_gemm_tma_kernel", "forward, DoRA, tma", tma_dora_fwd, as_dicts(lora.TMA_GEMM_CONFIGS)),
        ("_lora_gemm_tma_kernel", "backward dX, tma", tma_dx, as_dicts(lora.TMA_GEMM_CONFIGS)),
        ("_lora_shrink_kernel", "forward", shrink, as_dicts(lora.SHRINK_CONFIGS)),
        ("_lora_bwd_dy_kernel", "backward", bwd_dy, as_dicts(lora.DY_CONFIGS)),
        ("_lora_bwd_dy_kernel", "backward, DoRA", dora_bwd_dy, as_dicts(lora.DY_CONFIGS)),
        ("_lora_bwd_dy_kernel", "backward, mixed adapters", mixed_bwd_dy, as_dicts(lora.DY_CONFIGS)),
        ("_lora_shrink_kernel", "forward, mixed adapters", mixed_shrink, mixed_fixed),
        ("_lora_bwd_da_kernel", "backward, mixed adapters", mixed_da, mixed_fixed),
        ("_dora_norm_kernel", "DoRA norm", dora_norm, [dict(kwargs={}, num_warps=4, num_stages=3)]),
        ("_lora_bwd_da_kernel", "backward", bwd_da, as_dicts(lora.DA_CONFIGS)),
        ("_dropout_mask_kernel", "mask", mask, mask_config),
        ("_nf4_dequant_kernel", "NF4 chunk for cuBLAS", nf4_dequant, mask_config),
        ("_adapter_gemm_kernel", "adapter down", adapter_down, as_dicts(adapter.ADAPTER_GEMM_CONFIGS)),
        ("_adapter_gemm_kernel", "adapter up", adapter_up, as_dicts(adapter.ADAPTER_GEMM_CONFIGS)),
        ("_adapter_gemm_kernel", "adapter dpre", adapter_dpre, as_dicts(adapter.ADAPTER_GEMM_CONFIGS)),
        ("_adapter_gemm_kernel", "adapter dh", adapter_dh, as_dicts(adapter.ADAPTER_GEMM_CONFIGS)),
    ]


def _specialize(kernel, example: dict, config: dict):
    """signature, constexprs and attrs for ``kernel`` as Triton's launcher would build them for ``example``."""
    signature, constexprs, attrs = {}, {}, {}
    fixed = {**example["constexprs"], **config["kwargs"]}
    unspecialized = {kernel.arg_names[i] if isinstance(i, int) else i
                     for i in getattr(kernel, "do_not_specialize", ())}
    for index, name in enumerate(kernel.arg_names):
        if name in fixed:
            signature[name], constexprs[name] = "constexpr", fixed[name]
            continue
        value = example[name]
        if name in unspecialized:  # do_not_specialize: neither a constant nor a divisibility hint, any value
            signature[name] = "fp32" if isinstance(value, float) else "i32"
            continue
        if isinstance(value, tuple):  # a TMA descriptor: its block shape is the config's tiles
            _, dtype, dims = value
            signature[name] = f"tensordesc<{dtype}[{', '.join(str(fixed[d]) for d in dims)}]>"
        elif isinstance(value, str):  # a pointer: torch's allocations are 16-byte aligned
            signature[name] = "*" + value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # Triton specializes integer arguments equal to 1 into constants
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _ptxas_candidates() -> list[str]:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    found = [os.path.join(bundled, name) for name in ("ptxas-blackwell", "ptxas")]
    found += [shutil.which("ptxas") or "", os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas")]
    return [p for p in dict.fromkeys(found) if p and os.access(p, os.X_OK)]


def ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill bytes: stores + loads) that ``ptxas -v`` reports for the PTX; (None, None) when no ptxas here
    accepts it."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for ptxas in _ptxas_candidates():
            target = f"-arch=sm_{arch}{'a' if arch == 90 else ''}"
            done = subprocess.run([ptxas, "-v", target, f.name, "-o", os.devnull], capture_output=True, text=True)
            if done.returncode == 0:
                log = done.stdout + done.stderr
                registers = re.search(r"Used (\d+) registers", log)
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
                return (int(registers.group(1)) if registers else None,
                        int(spills.group(1)) + int(spills.group(2)) if spills else 0)
        return None, None
    finally:
        os.unlink(f.name)


def kernel_modules() -> list:
    """Every module of the kernels package (this one aside), imported."""
    import importlib
    import pkgutil
    return [importlib.import_module(f"{__package__}.{info.name}")
            for info in pkgutil.iter_modules([os.path.dirname(__file__)]) if info.name != "aot"]


def kernel_named(name: str):
    """The Triton kernel called ``name``, from the module of the kernels package that defines it."""
    for module in kernel_modules():
        if name in vars(module):
            return vars(module)[name]
    raise LookupError(f"no kernel named {name!r} in the kernels package")


def compile_one(job):
    """Compile one (kernel, profile, example, config, arch) job; returns its report row."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import common

    name, profile, example, config, arch = job
    kernel = kernel_named(name)
    signature, constexprs, attrs = _specialize(kernel, example, config)
    start = time.perf_counter()
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config["num_warps"], "num_stages": config["num_stages"], **example.get("options", {})})
    ptx = compiled.asm["ptx"]
    registers, spills = ptxas_usage(ptx, arch)
    estimate = None
    if name in common._SHARED_MEMORY:  # the pruner's estimate for the same launch
        sizes = {k: ELEMENT_SIZE[v if isinstance(v, str) else v[1]] for k, v in example.items()
                 if isinstance(v, (str, tuple))}
        estimate = common.shared_memory_estimate(name, {**example["constexprs"], **config["kwargs"]},
                                                 config["num_stages"], sizes, arch)
    return dict(kernel=name, profile=profile, arch=arch, config=config["kwargs"],
                num_warps=config["num_warps"], num_stages=config["num_stages"],
                shared=compiled.metadata.shared, shared_estimate=estimate, shared_limit=SHARED_MEMORY_LIMIT[arch],
                wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx, tma="cp.async.bulk.tensor" in ptx,
                registers=registers, spills=spills,
                pruned=common.spilling_reason(name, {**example["constexprs"], **config["kwargs"]}, config["num_warps"]),
                block_r=example["constexprs"].get("BLOCK_R"),
                seconds=round(time.perf_counter() - start, 2))


def compile_all(archs=(80, 90), jobs=None):
    """Compile every kernel config for every arch, in parallel processes; returns the report rows."""
    from fastpeft.checks import triton_interpreting
    if triton_interpreting():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET off (unset or 0: the interpreter "
                           "replaces the compiler)")
    work = [(name, profile, example, config, arch)
            for name, profile, example, configs in _launches() for config in configs for arch in archs
            if not (name.endswith("_tma_kernel") and arch < 90)]  # TMA is Hopper's
    # Big tiles first, so the slowest compiles do not end up last on one worker.
    work.sort(key=lambda job: -job[0].endswith("gemm_kernel"))
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        return list(pool.map(compile_one, work))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpeft.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    rows = compile_all(args.arch, args.jobs)
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        blocks = " ".join(f"{k}={v}" for k, v in r["config"].items())
        isa = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "no-mma")
        print(f"sm_{r['arch']} {r['kernel']:22s} {r['profile']:12s} {blocks:45s} w{r['num_warps']} s{r['num_stages']} "
              f"{isa:8s} shared {r['shared']:6d}/{r['shared_limit']} B (est. {r['shared_estimate']})  "
              f"regs {r['registers']} spills {r['spills']}  "
              f"{r['seconds']:5.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
