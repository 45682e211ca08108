"""Every Triton kernel config compiles ahead of time for sm_80 and sm_90 on this CPU, with the right MMA path."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report():
    # The interpreter replaces the compiler, so the compile runs in a process without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fastpeft.kernels.aot", "--json"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_config_compiles_for_both_archs(report):
    from fastpeft.kernels import adapter_bottleneck as adapter
    from fastpeft.kernels import lora_tuning as lora
    expected = {"_lora_gemm_kernel": lora.GEMM_CONFIGS + lora.LOWRANK_PASS_CONFIGS,
                "_lora_gemm_tma_kernel": lora.TMA_GEMM_CONFIGS,
                "_lora_shrink_kernel": lora.SHRINK_CONFIGS, "_lora_bwd_dy_kernel": lora.DY_CONFIGS,
                "_lora_bwd_da_kernel": lora.DA_CONFIGS,
                "_adapter_gemm_kernel": adapter.ADAPTER_GEMM_CONFIGS}
    for arch in (80, 90):
        for name, configs in expected.items():
            if name == "_lora_gemm_tma_kernel" and arch < 90:
                continue  # TMA is Hopper's
            compiled = [(r["config"], r["num_warps"], r["num_stages"]) for r in report
                        if r["kernel"] == name and r["arch"] == arch]
            for c in configs:
                assert (c.kwargs, c.num_warps, c.num_stages) in compiled, (name, arch, c)
        assert any(r["kernel"] == "_dropout_mask_kernel" and r["arch"] == arch for r in report)
        assert any(r["kernel"] == "_dora_norm_kernel" and r["arch"] == arch for r in report)
        assert any(r["kernel"] == "_lora_gemm_kernel" and r["profile"] == "backward dX" and r["arch"] == arch
                   for r in report)


@pytest.mark.slow
def test_gemm_uses_wgmma_on_hopper_and_mma_sync_on_ampere(report):
    gemm = [r for r in report if r["kernel"] in ("_lora_gemm_kernel", "_lora_gemm_tma_kernel", "_adapter_gemm_kernel")]
    assert gemm and all(r["wgmma"] for r in gemm if r["arch"] == 90)
    assert all(r["mma_sync"] and not r["wgmma"] for r in gemm if r["arch"] == 80)
    tma = [r for r in report if r["kernel"] == "_lora_gemm_tma_kernel"]
    assert len(tma) == 3 * 4 and all(r["arch"] == 90 and r["tma"] for r in tma)  # Hopper only, reading by TMA
    assert not any(r["tma"] for r in gemm if r["kernel"] != "_lora_gemm_tma_kernel")


@pytest.mark.slow
def test_shared_memory_fits_and_the_pruner_estimate_is_tight(report):
    """The pruner's estimate of every config (fp32 operands included, via the adapter's dh GEMM) is never below the
    compiled kernel's shared memory, so nothing it keeps fails to fit, and never more than 10% or 16 KiB above it,
    so it prunes no config that fits (it once estimated 245,760 B for a 180,224 B Hopper config, and 3x for bf16
    adapter configs)."""
    estimated = [r for r in report
                 if r["kernel"] not in ("_dropout_mask_kernel", "_dora_norm_kernel", "_nf4_dequant_kernel",
                                        "_ia3_col_sums_kernel")]  # untuned
    assert {r["kernel"] for r in estimated} == {"_lora_gemm_kernel", "_lora_gemm_tma_kernel", "_lora_shrink_kernel",
                                                "_lora_bwd_dy_kernel", "_lora_bwd_da_kernel", "_adapter_gemm_kernel"}
    assert any(r["profile"] == "adapter dh" for r in estimated)
    for r in report:
        assert r["shared"] <= r["shared_limit"], r
    for r in estimated:
        assert r["shared"] <= r["shared_estimate"] <= max(1.1 * r["shared"], r["shared"] + 16384), r


def test_seeds_never_specialize_and_tuning_keys_on_size_classes():
    """A seed divisible by 16 (or equal to 1) must not compile a kernel of its own, and a new sequence length must
    not re-tune: the autotuners key on M's size class, and the GEMM on dropout and layout (dX is not forward)."""
    import ast
    import inspect

    from fastpeft.kernels import aot
    from fastpeft.kernels import lora_tuning as lora
    # Read from the source: under the interpreter triton.jit keeps no specialization settings.
    seeded = 0
    nodes = [node for module in aot.kernel_modules() for node in ast.walk(ast.parse(inspect.getsource(module)))]
    for node in nodes:
        if isinstance(node, ast.FunctionDef) and "seed" in [a.arg for a in node.args.args] and node.decorator_list:
            decorator = ast.unparse(node.decorator_list[0])
            if decorator.startswith("triton.jit") and node.name.endswith("_kernel"):
                seeded += 1
                assert "do_not_specialize=['seed']" in decorator, (node.name, decorator)
    assert seeded == 5
    for tuned in (lora._gemm_tuned, lora._tma_tuned, lora._lowrank_pass_tuned, lora._shrink_tuned, lora._dy_tuned,
                  lora._da_tuned):
        assert "M_BUCKET" in tuned.keys and "M" not in tuned.keys
    assert {"DROPOUT", "stride_ak", "stride_bk"} <= set(lora._gemm_tuned.keys)


@pytest.mark.slow
def test_no_kernel_spills(report):
    """ptxas -v on the PTX of every config of every kernel, both archs, in the launches that need the most registers
    (dropout, activation epilogues): no spills. Drawing one Philox number per element spilled 7-20 KB in 14 of the
    20 dropout builds of the dX GEMM; four a call, none. The adapter's 128x256 tiles spilled up to 2.6 KB beside
    its epilogues; it has tiles of its own."""
    if all(r["spills"] is None for r in report):
        pytest.skip("no ptxas here reads Triton's PTX version")
    assert all(r["spills"] is not None for r in report)
    # (the base launches, the cublas pass, NF4, mixed batches, (IA)³'s K-loop scale and its epilogue scale)
    assert len([r for r in report if r["kernel"] == "_lora_gemm_kernel"]) == (
        5 * 2 * 10 + 2 * 4 + 2 * 2 * 2 + 2 * 2 * 6 + 2 * 2 * 10 + 2 * 2 * 4)
    # The "epilogue" schedule keeps its low-rank operands in registers across the K loop: on Ampere, where mma.sync
    # reads registers, large tiles spill 112-288 bytes; it is a candidate for Hopper (wgmma), measured there.
    # DoRA's epilogue (pre stored beside the scaled tile) spills in its largest tiles: the pruner drops those for
    # DoRA launches (``register_spilling``), and only those; (IA)³'s epilogue launches compile only the configs its
    # rule keeps.
    spilling = [(r["kernel"], r["profile"], r["arch"], r["config"], r["num_warps"], r["registers"], r["spills"])
                for r in report
                if r["spills"] and not r["pruned"]
                and not (r["profile"] == "forward, low-rank term last" and r["arch"] == 80)]
    assert not spilling, spilling
    pruned = [r for r in report if r["pruned"]]
    assert pruned and all("DoRA" in r["profile"] for r in pruned)
    assert any(r["spills"] for r in pruned)


def test_the_pruner_keeps_what_fits_the_device(monkeypatch):
    """The autotuner's pruner on fake A100 / H100 properties: a bf16 r=64 launch keeps Hopper's big tiles (the
    estimate once pruned them), fp32 operands drop the configs that cannot fit an A100, and when none fits the
    smallest is kept."""
    import torch

    from fastpeft.kernels import common

    def run(arch, limit, dtype, configs=common.GEMM_CONFIGS):
        props = type("Props", (), {"shared_memory_per_block_optin": limit})()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (arch // 10, 0))
        x = torch.empty(4, 4, dtype=dtype)
        args = dict(a_ptr=x, b_ptr=x, l_ptr=x.float(), u_ptr=x.float(), bias_ptr=x, out_ptr=x, M=8192)
        prune = common._shared_memory_pruner("_lora_gemm_kernel")
        return prune(configs, args, BLOCK_R=64, HAS_BIAS=False)

    every = common.GEMM_CONFIGS
    assert run(90, 232448, torch.bfloat16) == every
    kept = run(80, 166912, torch.float32)
    assert every[0] not in kept and every[1] not in kept and common.GEMM_DEFAULT in kept
    assert all(common.shared_memory_estimate("_lora_gemm_kernel", {**c.kwargs, "BLOCK_R": 64}, c.num_stages,
                                             {"a_ptr": 4, "b_ptr": 4, "out_ptr": 4}, 80) <= 166912 for c in kept)
    assert run(80, 1024, torch.float32) == [every[-1]]


def test_full_range_indices_meet_strides_in_64_bits():
    """An index that spans a whole dimension (a row, a column of W) times a stride can pass 2**31 on a transposed
    view (K · stride with stride = M), which int32 arithmetic wraps into a wrong address. Read from the kernels'
    source: every product with a ``stride_*`` argument multiplies a value cast to int64 (or named ``*_load``, the
    int64 wrapped indices), a ``BLOCK_*`` constant (a pointer step), or an index bounded by a block (``tl.arange``
    of a ``BLOCK_*``)."""
    import ast
    import inspect

    from fastpeft.kernels import aot

    def bounded(node, local):
        if isinstance(node, ast.Subscript):
            return bounded(node.value, local)
        if isinstance(node, ast.Name):
            if node.id.endswith("_load") or node.id.startswith("BLOCK_"):
                return True
            value = local.get(node.id)
            return value is not None and (
                ast.unparse(value).startswith("tl.arange(0, BLOCK_") or bounded(value, local))
        return ".to(tl.int64)" in ast.unparse(node)

    unsafe = []
    for module in aot.kernel_modules():
        for fn in ast.walk(ast.parse(inspect.getsource(module))):
            if not (isinstance(fn, ast.FunctionDef) and any("triton.jit" in ast.unparse(d)
                                                            for d in fn.decorator_list)):
                continue
            local = {t.id: n.value for n in ast.walk(fn) if isinstance(n, ast.Assign)
                     for t in n.targets if isinstance(t, ast.Name)}
            for node in ast.walk(fn):
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
                    for stride, other in ((node.right, node.left), (node.left, node.right)):
                        if isinstance(stride, ast.Name) and stride.id.startswith("stride_") \
                                and not bounded(other, local):
                            unsafe.append(f"{module.__name__}.{fn.name}: {ast.unparse(node)}")
    assert not unsafe, unsafe


def test_the_interpreter_is_refused_as_triton_reads_it(monkeypatch):
    """The compile refuses to run under the interpreter exactly when Triton would use it: "false" is off and
    compiles, "true" is on and is refused, and a value Triton reads as off but means on is refused by name."""
    from fastpeft.kernels import aot
    monkeypatch.setattr(aot, "_launches", lambda: [])  # nothing to compile: what is checked is the switch
    monkeypatch.setenv("TRITON_INTERPRET", "false")
    assert aot.compile_all(jobs=1) == []
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET off"):
        aot.compile_all(jobs=1)
    monkeypatch.setenv("TRITON_INTERPRET", " yes ")
    with pytest.raises(ValueError, match="TRITON_INTERPRET must be one of"):
        aot.compile_all(jobs=1)


def test_every_autotuned_kernel_tunes_per_constexpr_its_launches_set():
    """A winner is kept per value of every constexpr a launch sets: DoRA's COL_SCALE / STORE_PRE launches never take
    plain LoRA's winner (a config DoRA's pruner drops for spilling), nor a mixed batch a plain GEMM's."""
    import inspect

    from triton.runtime.autotuner import Autotuner, Heuristics

    from fastpeft.kernels import aot
    found = set()
    for module in aot.kernel_modules():
        for name, tuned in vars(module).items():
            if not isinstance(tuned, Autotuner) or id(tuned) in found:
                continue
            found.add(id(tuned))
            tuned_by_configs = {k for c in tuned.configs for k in c.kwargs}
            by_heuristics, fn = set(), tuned.fn
            while not inspect.isfunction(fn):  # down to the kernel's Python function
                if isinstance(fn, Heuristics):
                    by_heuristics |= set(fn.values)
                fn = fn.fn
            constexprs = {n for n, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)}
            launched = constexprs - tuned_by_configs - by_heuristics
            assert "COMPUTE" in constexprs or "BLOCK_R" in constexprs, name
            assert launched <= set(tuned.keys), (name, launched - set(tuned.keys))
    assert len(found) >= 8
    from fastpeft.kernels import lora_tuning
    for tuned in (lora_tuning._gemm_tuned, lora_tuning._tma_tuned):
        assert {"COL_SCALE", "STORE_PRE"} <= set(tuned.keys)
