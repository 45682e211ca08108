"""Launch configurations of the LoRA kernels: autotuning configs and defaults, the interpreter's configs, the
shared-memory models and spill rules the autotuner's pruner applies, and the autotuned kernels.

Tensors on the CPU run through Triton's interpreter (``TRITON_INTERPRET=1``, for tests) with one small fixed
configuration; CUDA tensors use autotuned configs for Ampere and Hopper, pruned to what fits the device's shared
memory (the AOT compile, ``kernels/aot.py``, checks every config on both archs).
"""
from __future__ import annotations

import torch
import triton

from .common import (
    GEMM_CONFIGS,
    GEMM_KEY,
    autotuned,
    config,
    even_k,
    register_shared_memory,
    register_spilling,
)
from .lora_gemm import _lora_gemm_kernel, _lora_gemm_tma_kernel
from .lora_lowrank import _lora_bwd_da_kernel, _lora_bwd_dy_kernel, _lora_shrink_kernel

# None of these spills registers on sm_80 or sm_90 with dropout (the AOT tests check every one).
SHRINK_CONFIGS = [
    config(w, s, BLOCK_M=bm, BLOCK_K=bk)
    for bm, bk, w, s in [(32, 128, 4, 4), (64, 128, 8, 4), (64, 64, 4, 5), (128, 64, 8, 4), (64, 256, 8, 3)]
]
DY_BLOCK_M = 128  # fixed: it sets the number of dB partials, allocated before the launch
DY_CONFIGS = [config(w, s, BLOCK_N=bn) for bn, w, s in [(64, 4, 3), (64, 8, 3), (128, 8, 3), (32, 4, 4)]]
DA_CONFIGS = [
    config(w, s, BLOCK_M=bm, BLOCK_K=bk)
    for bm, bk, w, s in [(64, 64, 4, 4), (128, 64, 8, 2), (64, 128, 4, 3), (128, 128, 4, 3)]
]

# The "cublas" variant's pass adding the low-rank term onto out: no K loop (BLOCK_K unused), no pipeline.
LOWRANK_PASS_CONFIGS = [config(w, 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, GROUP_M=8)
                        for bm, bn, w in [(64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8)]]



def _tma_blocks(args):
    """Autotune pre-hook: a config's tiles are the descriptors' block shapes."""
    bm, bn, bk = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    args["a_desc"].block_shape = [bm, bk]
    args["b_desc"].block_shape = [bk, bn] if args["B_KN"] else [bn, bk]


# The "tma" variant's tiles: Hopper's (BLOCK_K=64 for wgmma), each setting the descriptors' block shapes.
TMA_GEMM_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8), num_warps=w, num_stages=s,
                  pre_hook=_tma_blocks)
    # (128×128 with 4 warps spilled in the dX GEMM with dropout under Triton 3.6, the GPU image's)
    for bm, bn, w, s in [(128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 4)]
]

# Without autotuning: configs that fit every supported GPU's shared memory, fp32 included.
TMA_GEMM_DEFAULT = TMA_GEMM_CONFIGS[3]  # 128×64: fits a Hopper with fp32 operands too
LOWRANK_PASS_DEFAULT = LOWRANK_PASS_CONFIGS[2]
SHRINK_DEFAULT = SHRINK_CONFIGS[2]
DY_DEFAULT = DY_CONFIGS[0]
DA_DEFAULT = DA_CONFIGS[0]

# The interpreter runs one small configuration: blocks ≥ 16 for tl.dot, few programs for speed.
INTERPRET_SHRINK = dict(BLOCK_M=32, BLOCK_K=32)
INTERPRET_DY = dict(BLOCK_N=32)
INTERPRET_DY_BLOCK_M = 32
INTERPRET_DA = dict(BLOCK_M=32, BLOCK_K=32)


# Shared memory of one config in bytes (see ``register_shared_memory``), fitted to the compiled kernels: the AOT
# tests hold each within 10% or 16 KiB above the real figure of every config, on both archs.
def _gemm_shared(b, sizes, stages, arch):
    if b.get("NF4"):
        # W's tile is staged as its bytes and as the gathered fp32 code-book values (about 5.25 bytes an element with
        # the absmaxes broadcast; the per-element absmaxes of an unaligned W add theirs), beside x's tile; Hopper
        # keeps one more x tile.
        per_element = 5.25 + (0 if b.get("ALIGNED") else (9 if b.get("NESTED") else 4))
        a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_ptr"]
        staged = (stages - 1) * (a_tile + per_element * b["BLOCK_K"] * b["BLOCK_N"])
        return int(staged + (a_tile if arch >= 90 else 0))
    if b.get("BASE_IN_OUT"):  # no K loop: converting the out tile and u's tile
        return b["BLOCK_M"] * b["BLOCK_N"] * sizes["out_ptr"] + b["BLOCK_N"] * b["BLOCK_R"] * 4
    a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_ptr"]
    b_tile = b["BLOCK_K"] * b["BLOCK_N"] * sizes["b_ptr"]
    # The epilogue variant keeps its low-rank operands across the K loop: Triton 3.6 stages them beside the
    # pipeline (2-8 KB more on both archs), Triton 3.9 does not.
    held = (b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_R"] * sizes["a_ptr"] if b.get("LOWRANK_LAST") else 0
    if arch >= 90:  # plus u's (R × BLOCK_N) tile in the compute dtype, for the wgmma of the low-rank term
        return stages * (a_tile + b_tile) + b["BLOCK_N"] * b["BLOCK_R"] * sizes["a_ptr"] + held
    # Ampere: the epilogue's and the low-rank operands' layout conversions reuse the pipeline's space.
    return max((stages - 1) * (a_tile + b_tile) + held, b["BLOCK_M"] * b["BLOCK_N"] * sizes["out_ptr"],
               max(b["BLOCK_M"], b["BLOCK_N"]) * b["BLOCK_R"] * 4)


def _shrink_shared(b, sizes, stages, arch):
    x_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["x_ptr"]
    a_tile = b["BLOCK_K"] * b["BLOCK_R"] * sizes["a_ptr"]  # converted to the compute dtype in registers
    return stages * x_tile + (stages - 1) * a_tile + (b["BLOCK_K"] * b["BLOCK_R"] * sizes["x_ptr"] if arch >= 90 else 0)


def _dy_shared(b, sizes, stages, arch):
    dy_tile = b["BLOCK_M"] * b["BLOCK_N"] * sizes["dy_ptr"]
    s_tile = b["BLOCK_M"] * b["BLOCK_R"] * sizes["dy_ptr"]
    if b.get("MIXED"):  # rows gathered through the tables: S's tile staged too, and on Hopper B's in fp32
        if arch >= 90:
            return stages * dy_tile + s_tile + b["BLOCK_N"] * b["BLOCK_R"] * 4 + 4096
        return (stages - 1) * dy_tile + s_tile
    # plus S's tile in the compute dtype, the operand of dB's wgmma (DoRA's dY, scaled in registers first, is laid
    # out as on Ampere)
    if arch >= 90 and not b.get("COL_SCALE"):
        return stages * dy_tile + b["BLOCK_M"] * b["BLOCK_R"] * sizes["dy_ptr"]
    return (stages - 1) * dy_tile


def _da_shared(b, sizes, stages, arch):
    x_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["x_ptr"]
    if b.get("MIXED"):  # one tile per program: nothing to pipeline
        return x_tile + b["BLOCK_M"] * b["BLOCK_R"] * sizes["ds_ptr"]
    return stages * x_tile + (stages - 1) * b["BLOCK_M"] * b["BLOCK_R"] * sizes["ds_ptr"]


def _gemm_tma_shared(b, sizes, stages, arch):
    a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_desc"]
    b_tile = b["BLOCK_K"] * b["BLOCK_N"] * sizes["b_desc"]
    # plus one 8-byte mbarrier per stage, on which the TMA copies signal their arrival
    return stages * (a_tile + b_tile + 8) + b["BLOCK_N"] * b["BLOCK_R"] * sizes["a_desc"]


def _dora_epilogue_spills(b, num_warps):
    """DoRA's epilogue holds the unscaled tile for pre beside the scaled one: 256-row tiles, and TMA's 128×256, then
    spill 8-80 bytes (ptxas, sm_80 and sm_90); their 128×128 neighbours do not."""
    if b.get("STORE_PRE") and b["BLOCK_M"] * b["BLOCK_N"] >= 128 * 256:
        return "DoRA's pre store spills registers in tiles of 128×256 or more"
    return None


register_spilling("_lora_gemm_kernel", _dora_epilogue_spills)
register_spilling("_lora_gemm_tma_kernel", _dora_epilogue_spills)

for _name, _need in [("_lora_gemm_kernel", _gemm_shared), ("_lora_gemm_tma_kernel", _gemm_tma_shared),
                     ("_lora_shrink_kernel", _shrink_shared),
                     ("_lora_bwd_dy_kernel", _dy_shared), ("_lora_bwd_da_kernel", _da_shared)]:
    register_shared_memory(_name, _need)

_gemm = even_k(_lora_gemm_kernel)


# Tuned once per size class (M_BUCKET: M's next power of two), never per sequence length. The GEMM also keys on
# dropout and on the operands' layout, so backward's dX (W untransposed, masked) never inherits forward's winner.
_gemm_tuned = autotuned(_gemm, GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "LOWRANK_LAST", "BASE_IN_OUT", "stride_ak",
                                                        "stride_bk"], "_lora_gemm_kernel")
_tma_tuned = autotuned(_lora_gemm_tma_kernel, TMA_GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "B_KN"], "_lora_gemm_tma_kernel")
_lowrank_pass_tuned = autotuned(_gemm, LOWRANK_PASS_CONFIGS, GEMM_KEY + ["DROPOUT", "BASE_IN_OUT"], "_lora_gemm_kernel")
# A 4-bit base: the dequantising load holds more registers and stages more per element (see ``_gemm_shared``); the
# tiles kept are those that neither spill nor overflow an A100 (ptxas: 64-deep tiles of 128×256 and 256×128, and
# 128×128 tiles on 4 warps, spill up to 11 KB, the dX GEMM's most).
NF4_GEMM_CONFIGS = [c for c in GEMM_CONFIGS
                    if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128 or c.num_warps == 8
                    and (c.kwargs["BLOCK_K"] == 32 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128 * 128)]
NF4_GEMM_DEFAULT = next(c for c in NF4_GEMM_CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (64, 128))
_nf4_gemm_tuned = autotuned(_gemm, NF4_GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "LOWRANK_LAST", "stride_ak", "stride_bk",
                                                                "NESTED", "ALIGNED"], "_lora_gemm_kernel")
# Mixed batches: the GEMM's row tiles are the tables' tiles, so its configs share one BLOCK_M, MIXED_TILE.
MIXED_TILE = 64
MIXED_GEMM_CONFIGS = [c for c in GEMM_CONFIGS if c.kwargs["BLOCK_M"] == MIXED_TILE]
MIXED_GEMM_DEFAULT = MIXED_GEMM_CONFIGS[0]
_mixed_gemm_tuned = autotuned(_gemm, MIXED_GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "MIXED", "stride_ak", "stride_bk"],
                              "_lora_gemm_kernel")
_shrink_tuned = autotuned(_lora_shrink_kernel, SHRINK_CONFIGS, ["M_BUCKET", "K", "DROPOUT"], "_lora_shrink_kernel")
_dy_tuned = autotuned(_lora_bwd_dy_kernel, DY_CONFIGS, ["M_BUCKET", "N"], "_lora_bwd_dy_kernel")
_da_tuned = autotuned(_lora_bwd_da_kernel, DA_CONFIGS, ["M_BUCKET", "K", "DROPOUT"], "_lora_bwd_da_kernel")


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few row splits, so tests exercise the partial-sum reduction


def autotune_winners() -> dict[str, str]:
    """The config autotuning chose last for each tuned kernel (for the GPU check's report)."""
    tuned = {"_lora_gemm_kernel": _gemm_tuned, "_lora_gemm_tma_kernel": _tma_tuned,
             "low-rank pass (cublas variant)": _lowrank_pass_tuned,
             "_lora_shrink_kernel": _shrink_tuned, "_lora_bwd_dy_kernel": _dy_tuned,
             "_lora_bwd_da_kernel": _da_tuned}
    return {name: str(getattr(kernel, "best_config", None)) for name, kernel in tuned.items()}
