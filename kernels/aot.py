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

ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "i8": 1, "u8": 1, "i32": 4}


def _launches():
    """(kernel name, profile, {arg: example value}, [configs]) for every kernel and launch profile: what each module
    of the kernels package declares in ``aot_launches()`` (see ``common.AOT_M``)."""
    return [launch for module in kernel_modules() if hasattr(module, "aot_launches")
            for launch in module.aot_launches()]


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
        if value is None:  # an argument a launch leaves out (a feature's pointer, the feature off): a constant
            signature[name], constexprs[name] = "constexpr", None
            continue
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
    from fastpeft.environment import triton_interpreting
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
