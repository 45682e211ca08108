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


def test_every_config_compiles_for_both_archs(report):
    from fastpeft.kernels import common
    from fastpeft.kernels import lora_linear as lora
    expected = {"_lora_gemm_kernel": lora.GEMM_CONFIGS, "_lora_shrink_kernel": lora.SHRINK_CONFIGS,
                "_lora_bwd_dy_kernel": lora.DY_CONFIGS, "_lora_bwd_da_kernel": lora.DA_CONFIGS,
                "_adapter_gemm_kernel": common.GEMM_CONFIGS}
    for arch in (80, 90):
        for name, configs in expected.items():
            compiled = [(r["config"], r["num_warps"], r["num_stages"]) for r in report
                        if r["kernel"] == name and r["arch"] == arch]
            for c in configs:
                assert (c.kwargs, c.num_warps, c.num_stages) in compiled, (name, arch, c)
        assert any(r["kernel"] == "_dropout_mask_kernel" and r["arch"] == arch for r in report)
        assert any(r["kernel"] == "_lora_gemm_kernel" and r["profile"] == "backward dX" and r["arch"] == arch
                   for r in report)


def test_gemm_uses_wgmma_on_hopper_and_mma_sync_on_ampere(report):
    gemm = [r for r in report if r["kernel"] == "_lora_gemm_kernel"
            or (r["kernel"] == "_adapter_gemm_kernel" and r["profile"] == "adapter dpre")]
    assert gemm and all(r["wgmma"] for r in gemm if r["arch"] == 90)
    assert all(r["mma_sync"] and not r["wgmma"] for r in gemm if r["arch"] == 80)


def test_shared_memory_fits_and_the_pruner_estimate_bounds_it(report):
    from fastpeft.kernels import adapter_bottleneck, lora_linear  # noqa: F401  (they register their kernels)
    from fastpeft.kernels.common import shared_memory_estimate
    for r in report:
        assert r["shared"] <= r["shared_limit"], r
        if r["kernel"] != "_dropout_mask_kernel":
            blocks = {**r["config"], "BLOCK_R": r["block_r"] or 16, "BLOCK_M": r["config"].get("BLOCK_M", 128)}
            estimate = shared_memory_estimate(r["kernel"], blocks, r["num_stages"], 2, r["arch"])
            assert estimate >= r["shared"], r
            if r["kernel"] == "_lora_gemm_kernel" and r["arch"] == 90:  # tight where it decides Hopper's tiles
                assert estimate <= 1.1 * r["shared"], (estimate, r)


def test_seeds_never_specialize_and_tuning_keys_on_size_classes():
    """A seed divisible by 16 (or equal to 1) must not compile a kernel of its own, and a new sequence length must
    not re-tune: the autotuners key on M's size class, and the GEMM on dropout and layout (dX is not forward)."""
    import ast
    import inspect

    from fastpeft.kernels import lora_linear as lora
    # Read from the source: under the interpreter triton.jit keeps no specialization settings.
    seeded = 0
    for node in ast.walk(ast.parse(inspect.getsource(lora))):
        if isinstance(node, ast.FunctionDef) and "seed" in [a.arg for a in node.args.args] and node.decorator_list:
            decorator = ast.unparse(node.decorator_list[0])
            if decorator.startswith("triton.jit") and node.name.endswith("_kernel"):
                seeded += 1
                assert "do_not_specialize=['seed']" in decorator, (node.name, decorator)
    assert seeded == 4
    for tuned in (lora._gemm_tuned, lora._shrink_tuned, lora._dy_tuned, lora._da_tuned):
        assert "M_BUCKET" in tuned.keys and "M" not in tuned.keys
    assert {"DROPOUT", "stride_ak", "stride_bk"} <= set(lora._gemm_tuned.keys)


def test_the_lora_gemm_never_spills(report):
    """ptxas -v on the PTX of every config of the fused GEMM, forward and the dX GEMM with dropout, both archs: no
    spills. Drawing one Philox number per element spilled 7-20 KB in 14 of the 20 dropout builds; four a call, none.
    (Other kernels are reported by ``python -m fastpeft.kernels.aot``; some still spill, see the README.)"""
    gemm = [r for r in report if r["kernel"] == "_lora_gemm_kernel"]
    if all(r["spills"] is None for r in gemm):
        pytest.skip("no ptxas here reads Triton's PTX version")
    assert len(gemm) == 4 * 2 * 10 and all(r["spills"] is not None for r in gemm)
    # The "epilogue" variant keeps its low-rank operands in registers across the K loop: on Ampere, where mma.sync
    # reads registers, large tiles spill 144-192 bytes; it is a candidate for Hopper (wgmma), measured there.
    spilling = [(r["profile"], r["arch"], r["config"], r["num_warps"], r["registers"], r["spills"]) for r in gemm
                if r["spills"] and not (r["profile"] == "forward, low-rank term last" and r["arch"] == 80)]
    assert not spilling, spilling
