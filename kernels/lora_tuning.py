"""Launch configurations of the LoRA kernels: autotuning configs and defaults, the interpreter's configs, the
shared-memory models and spill rules the autotuner's pruner applies, the autotuned kernels, and the launches the
ahead-of-time compile builds of the fused GEMM and the low-rank kernels (``aot_launches``).

Tensors on the CPU run through Triton's interpreter (``TRITON_INTERPRET=1``, for tests) with one small fixed
configuration; CUDA tensors use autotuned configs for Ampere and Hopper, pruned to what fits the device's shared
memory (the AOT compile, ``kernels/aot.py``, checks every config on both archs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    AOT_K,
    AOT_M,
    AOT_N,
    AOT_R,
    GEMM_CONFIGS,
    GEMM_KEY,
    Member,
    aot_configs,
    autotuned,
    config,
    declare_members,
    even_k,
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

# The "cublas" schedule's pass adding the low-rank term onto out: no K loop (BLOCK_K unused), no pipeline.
LOWRANK_PASS_CONFIGS = [config(w, 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, GROUP_M=8)
                        for bm, bn, w in [(64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8)]]



def _tma_blocks(args):
    """Autotune pre-hook: a config's tiles are the descriptors' block shapes."""
    bm, bn, bk = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    args["a_desc"].block_shape = [bm, bk]
    args["b_desc"].block_shape = [bk, bn] if args["B_KN"] else [bn, bk]


# The "tma" schedule's tiles: Hopper's (BLOCK_K=64 for wgmma), each setting the descriptors' block shapes.
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
    if b.get("BASE_IN_OUT"):  # no K loop: converting the out tile and u's tile
        return b["BLOCK_M"] * b["BLOCK_N"] * sizes["out_ptr"] + b["BLOCK_N"] * b["BLOCK_R"] * 4
    a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_ptr"]
    b_tile = b["BLOCK_K"] * b["BLOCK_N"] * sizes["b_ptr"]
    # The epilogue schedule keeps its low-rank operands across the K loop: Triton 3.6 stages them beside the
    # pipeline (2-8 KB more on both archs), Triton 3.9 does not.
    held = (b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_R"] * sizes["a_ptr"] if b.get("LOWRANK_LAST") else 0
    if arch >= 90:  # plus u's (R × BLOCK_N) tile in the compute dtype, for the wgmma of the low-rank term
        return stages * (a_tile + b_tile) + b["BLOCK_N"] * b["BLOCK_R"] * sizes["a_ptr"] + held
    # Ampere: the epilogue's and the low-rank operands' layout conversions reuse the pipeline's space.
    return max((stages - 1) * (a_tile + b_tile) + held, b["BLOCK_M"] * b["BLOCK_N"] * sizes["out_ptr"],
               max(b["BLOCK_M"], b["BLOCK_N"]) * b["BLOCK_R"] * 4)


def _shrink_shared(b, sizes, stages, arch):
    x_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["x_ptr"]
    a_tile = b["BLOCK_K"] * b["BLOCK_R"] * sizes["lora_a_ptr"]  # converted to the compute dtype in registers
    return stages * x_tile + (stages - 1) * a_tile + (b["BLOCK_K"] * b["BLOCK_R"] * sizes["x_ptr"] if arch >= 90 else 0)


def _dy_shared(b, sizes, stages, arch):
    dy_tile = b["BLOCK_M"] * b["BLOCK_N"] * sizes["dy_ptr"]
    if arch >= 90:  # plus S's tile in the compute dtype, the operand of dB's wgmma
        return stages * dy_tile + b["BLOCK_M"] * b["BLOCK_R"] * sizes["dy_ptr"]
    return (stages - 1) * dy_tile


def _da_shared(b, sizes, stages, arch):
    x_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["x_ptr"]
    return stages * x_tile + (stages - 1) * b["BLOCK_M"] * b["BLOCK_R"] * sizes["ds_ptr"]


def _gemm_tma_shared(b, sizes, stages, arch):
    a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_desc"]
    b_tile = b["BLOCK_K"] * b["BLOCK_N"] * sizes["b_desc"]
    # plus one 8-byte mbarrier per stage, on which the TMA copies signal their arrival
    return stages * (a_tile + b_tile + 8) + b["BLOCK_N"] * b["BLOCK_R"] * sizes["a_desc"]


# ----------------------------------------------------------------------------------------------------------
# The LoRA-family members of these kernels, each declared once (``common.Member``): the switches each turns on in
# which launch, the configs those run, where each changes a kernel's shared memory, and what spills with it on. The
# pruner, the autotune key and the ahead-of-time compile's launches all derive from these declarations.
# ----------------------------------------------------------------------------------------------------------

def _nf4_gemm_shared(b, sizes, stages, arch):
    # W's tile is staged as its bytes and as the gathered fp32 code-book values (about 5.25 bytes an element with the
    # absmaxes broadcast; the per-element absmaxes of an unaligned W add theirs), beside x's tile; Hopper keeps one
    # more x tile.
    per_element = 5.25 + (0 if b.get("ALIGNED") else (9 if b.get("NESTED") else 4))
    a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_ptr"]
    staged = (stages - 1) * (a_tile + per_element * b["BLOCK_K"] * b["BLOCK_N"])
    return int(staged + (a_tile if arch >= 90 else 0))


# A 4-bit base: the dequantising load holds more registers and stages more per element (see ``_nf4_gemm_shared``);
# the tiles kept are those that neither spill nor overflow an A100 (ptxas: 64-deep tiles of 128×256 and 256×128, and
# 128×128 tiles on 4 warps, spill up to 11 KB, the dX GEMM's most).
NF4_GEMM_CONFIGS = [c for c in GEMM_CONFIGS
                    if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128 or c.num_warps == 8
                    and (c.kwargs["BLOCK_K"] == 32 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128 * 128)]
NF4_GEMM_DEFAULT = next(c for c in NF4_GEMM_CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (64, 128))
# the base weight's quantisation arguments in the AOT examples: NF4 with double-quantised absmaxes
_NF4_LAUNCH = dict(b_ptr="u8", absmax_ptr="u8", code_ptr="fp32", absmax_code_ptr="fp32", absmax_scale_ptr="fp32",
                   absmax_offset_ptr="fp32", options=dict(enable_fp_fusion=False),  # (lora_nf4._exact_absmax)
                   constexprs=dict(NF4=True, NESTED=True, QBLOCK=64, QBLOCK2=256, ALIGNED=1))
NF4_BASE = Member(
    "NF4 base", "NF4",
    launches={"_lora_gemm_kernel": {"forward": _NF4_LAUNCH,
                                    "backward dX": dict(_NF4_LAUNCH, constexprs=dict(_NF4_LAUNCH["constexprs"],
                                                                                     ALIGNED=2))}},
    configs={"_lora_gemm_kernel": NF4_GEMM_CONFIGS},
    shared_memory={"_lora_gemm_kernel": _nf4_gemm_shared})

# Mixed batches: the GEMM's row tiles are the tables' tiles, so its configs share one BLOCK_M, MIXED_TILE; the shrink
# and dA kernels run one fixed config, a tile per program (lora_mixed_fwd / lora_mixed_bwd).
MIXED_TILE = 64
MIXED_GEMM_CONFIGS = [c for c in GEMM_CONFIGS if c.kwargs["BLOCK_M"] == MIXED_TILE]
MIXED_GEMM_DEFAULT = MIXED_GEMM_CONFIGS[0]
_MIXED_FIXED = [config(4, 3, BLOCK_M=MIXED_TILE, BLOCK_K=64)]


def _mixed_dy_shared(b, sizes, stages, arch):
    # rows gathered through the tables: S's tile staged too, and on Hopper B's in fp32
    dy_tile = b["BLOCK_M"] * b["BLOCK_N"] * sizes["dy_ptr"]
    s_tile = b["BLOCK_M"] * b["BLOCK_R"] * sizes["dy_ptr"]
    if arch >= 90:
        return stages * dy_tile + s_tile + b["BLOCK_N"] * b["BLOCK_R"] * 4 + 4096
    return (stages - 1) * dy_tile + s_tile


def _mixed_da_shared(b, sizes, stages, arch):  # one tile per program: nothing to pipeline
    return b["BLOCK_M"] * b["BLOCK_K"] * sizes["x_ptr"] + b["BLOCK_M"] * b["BLOCK_R"] * sizes["ds_ptr"]


_TABLES = dict(rows_ptr="i32", tile_adapter_ptr="i32")  # each tile's rows and adapter
_MIXED_GEMM_LAUNCH = dict(_TABLES, tile_lowrank_scale_ptr="fp32", tile_p_ptr="fp32", TILED_M=AOT_M + MIXED_TILE * 63,
                          constexprs=dict(MIXED=True))
MIXED_BATCH = Member(
    "mixed adapters", "MIXED",
    launches={"_lora_gemm_kernel": {"forward": _MIXED_GEMM_LAUNCH, "backward dX": _MIXED_GEMM_LAUNCH},
              "_lora_shrink_kernel": {"forward": dict(_TABLES, tile_p_ptr="fp32", constexprs=dict(MIXED=True))},
              "_lora_bwd_dy_kernel": {"backward": dict(_TABLES, tile_lowrank_scale_ptr="fp32",
                                                       constexprs=dict(BLOCK_M=MIXED_TILE, MIXED=True))},
              "_lora_bwd_da_kernel": {"backward": dict(_TABLES, tile_p_ptr="fp32", rows_per_split=MIXED_TILE,
                                                       constexprs=dict(MIXED=True))}},
    configs={"_lora_gemm_kernel": MIXED_GEMM_CONFIGS, "_lora_shrink_kernel": _MIXED_FIXED,
             "_lora_bwd_da_kernel": _MIXED_FIXED},
    shared_memory={"_lora_bwd_dy_kernel": _mixed_dy_shared, "_lora_bwd_da_kernel": _mixed_da_shared})


def _dora_dy_shared(b, sizes, stages, arch):  # DoRA's dY, scaled in registers first, is laid out as on Ampere
    return (stages - 1) * b["BLOCK_M"] * b["BLOCK_N"] * sizes["dy_ptr"]


def _dora_epilogue_spills(b, num_warps):
    """DoRA's epilogue holds the unscaled tile for pre beside the scaled one: 256-row tiles, and TMA's 128×256, then
    spill 8-80 bytes (ptxas, sm_80 and sm_90); their 128×128 neighbours do not."""
    if b.get("STORE_PRE") and b["BLOCK_M"] * b["BLOCK_N"] >= 128 * 256:
        return "DoRA's pre store spills registers in tiles of 128×256 or more"
    return None


_DORA_EPILOGUE = dict(col_scale_ptr="fp32", pre_ptr="bf16",  # the unscaled product kept for dm
                      constexprs=dict(COL_SCALE=1, STORE_PRE=True))
DORA = Member(
    "DoRA", "COL_SCALE",
    launches={"_lora_gemm_kernel": {"forward": _DORA_EPILOGUE},
              "_lora_gemm_tma_kernel": {"forward, tma": _DORA_EPILOGUE},
              "_lora_bwd_dy_kernel": {"backward": dict(col_scale_ptr="fp32", pre_ptr="bf16", dm_part_ptr="fp32",
                                                       dz_ptr="bf16",
                                                       constexprs=dict(COL_SCALE=True, HAS_DM=True, WRITE_DZ=True))}},
    shared_memory={"_lora_bwd_dy_kernel": _dora_dy_shared},
    spills=_dora_epilogue_spills)

# (IA)³: the GEMM without its low-rank term (l, u off). Its input-side scale multiplies a's tiles in the K loop (an
# input scale's forward, an output scale's dX); its epilogue-side scale is the column scale (an output scale's
# forward, the bias added first and the unscaled tile kept for dl; an input scale's dX, with dl's column sums).
_NO_LOWRANK = dict(l_ptr=None, u_ptr=None, R=0, stride_lm=0, stride_lr=0, stride_ur=0, stride_un=0, stride_ua=0,
                   lowrank_scale=1.0, seed=0, p=0.0)


def _ia3_in_scale_shared(b, sizes, stages, arch):
    # a's tile scaled in registers (fitted to ptxas, both archs): staged num_stages - 1 times with the scale's
    # BLOCK_K fp32 values, and on Hopper b's tile once more
    a_tile = b["BLOCK_M"] * b["BLOCK_K"] * sizes["a_ptr"]
    b_tile = b["BLOCK_K"] * b["BLOCK_N"] * sizes["b_ptr"]
    staged = (stages - 1) * (a_tile + b_tile + b["BLOCK_K"] * 4)
    if arch >= 90:
        return staged + b_tile
    return max(staged, b["BLOCK_M"] * b["BLOCK_N"] * sizes["out_ptr"])


def _ia3_epilogue_spills(b, num_warps):
    """The (IA)³ epilogues hold a second tile beside the accumulator (pre's store; dl's products): tiles of 128×256
    or more spill on both archs, and 128×128 on 4 warps up to 48 bytes (ptxas, sm_80 and sm_90)."""
    if not (b.get("STORE_PRE") or b.get("COL_DOT")):
        return None
    area = b["BLOCK_M"] * b["BLOCK_N"]
    if area >= 128 * 256 or area >= 128 * 128 and num_warps == 4:
        return "the (IA)³ epilogue spills registers in tiles of 128×256, and of 128×128 on 4 warps"
    return None


IA3_IN_SCALE = Member(
    "(IA)³ K-loop scale", "IN_SCALE",
    launches={"_lora_gemm_kernel": {
        "forward": dict(_NO_LOWRANK, in_scale_ptr="fp32", constexprs=dict(LOWRANK=False, IN_SCALE=1)),
        "backward dX": dict(_NO_LOWRANK, in_scale_ptr="fp32", constexprs=dict(LOWRANK=False, IN_SCALE=1,
                                                                               DROPOUT=False))}},
    shared_memory={"_lora_gemm_kernel": _ia3_in_scale_shared})
# The configs the epilogue scale runs: those its spill rule keeps (the pruner drops the rest for these launches).
IA3_EPILOGUE_CONFIGS = [c for c in GEMM_CONFIGS
                        if not _ia3_epilogue_spills(dict(c.kwargs, STORE_PRE=True), c.num_warps)]
# Without autotuning, (IA)³ launches run one config neither of its members spills in (GEMM_DEFAULT's 128×128 on 4
# warps spills in the epilogue's).
IA3_GEMM_DEFAULT = next(c for c in IA3_EPILOGUE_CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (64, 128))
IA3_EPILOGUE = Member(
    "(IA)³ epilogue scale", "LOWRANK", inverted=True,
    launches={"_lora_gemm_kernel": {
        "forward": dict(_NO_LOWRANK, col_scale_ptr="fp32", pre_ptr="bf16",
                        constexprs=dict(LOWRANK=False, COL_SCALE=1, STORE_PRE=True, BIAS_FIRST=True)),
        "backward dX": dict(_NO_LOWRANK, col_scale_ptr="fp32", dot_ptr="bf16", dot_part_ptr="fp32",
                            stride_dm=AOT_K, stride_dn=1,
                            constexprs=dict(LOWRANK=False, COL_SCALE=1, COL_DOT=True, DROPOUT=False))}},
    configs={"_lora_gemm_kernel": IA3_EPILOGUE_CONFIGS},
    spills=_ia3_epilogue_spills)

MEMBERS = (NF4_BASE, MIXED_BATCH, IA3_IN_SCALE, IA3_EPILOGUE, DORA)
declare_members(MEMBERS, {"_lora_gemm_kernel": _gemm_shared, "_lora_gemm_tma_kernel": _gemm_tma_shared,
                          "_lora_shrink_kernel": _shrink_shared, "_lora_bwd_dy_kernel": _dy_shared,
                          "_lora_bwd_da_kernel": _da_shared})

_gemm = even_k(_lora_gemm_kernel)


# Tuned once per size class (M_BUCKET: M's next power of two), never per sequence length. The GEMM also keys on
# dropout and on the operands' layout, so backward's dX (W untransposed, masked) never inherits forward's winner.
_gemm_tuned = autotuned(_gemm, GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "LOWRANK_LAST", "BASE_IN_OUT", "stride_ak",
                                                        "stride_bk"], "_lora_gemm_kernel")
_tma_tuned = autotuned(_lora_gemm_tma_kernel, TMA_GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "B_KN"], "_lora_gemm_tma_kernel")
_lowrank_pass_tuned = autotuned(_gemm, LOWRANK_PASS_CONFIGS, GEMM_KEY + ["DROPOUT", "BASE_IN_OUT"], "_lora_gemm_kernel")
_nf4_gemm_tuned = autotuned(_gemm, NF4_GEMM_CONFIGS, GEMM_KEY + ["DROPOUT", "LOWRANK_LAST", "stride_ak", "stride_bk",
                                                                "NESTED", "ALIGNED"], "_lora_gemm_kernel")
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
             "low-rank pass (cublas schedule)": _lowrank_pass_tuned,
             "_lora_shrink_kernel": _shrink_tuned, "_lora_bwd_dy_kernel": _dy_tuned,
             "_lora_bwd_da_kernel": _da_tuned}
    return {name: str(getattr(kernel, "best_config", None)) for name, kernel in tuned.items()}


# ----------------------------------------------------------------------------------------------------------
# The ahead-of-time compile's launches of the fused GEMM and the low-rank kernels (see ``common.AOT_M``): beside
# their configs, which the compile checks on both archs.
# ----------------------------------------------------------------------------------------------------------

def aot_launches() -> list:
    """The GEMM's and the low-rank kernels' launches for the ahead-of-time compile (``kernels/aot.py``): each
    kernel's base profiles, then every member's launches of them."""
    base = {**_aot_gemm_examples(), **_aot_lowrank_examples()}
    launches = [(kernel, profile, example, aot_configs(configs)) for (kernel, profile), (example, configs)
                in base.items()]
    for member in MEMBERS:
        for kernel, changes in member.launches.items():
            for profile, change in changes.items():
                example, configs = base[kernel, profile]
                launches.append((kernel, member.profile(profile), member.example(example, change),
                                 aot_configs(member.configs.get(kernel, configs))))
    return launches


def _aot_gemm_examples() -> dict:
    """The fused GEMM's base launches (``lora_gemm``), (kernel, profile) -> (example, configs) (see
    ``common.aot_configs``)."""
    M, K, N, R = AOT_M, AOT_K, AOT_N, AOT_R
    # (a member's pointers, None while it is off: a dense W, no DoRA, one adapter)
    members_off = dict(col_scale_ptr=None, pre_ptr=None, rows_ptr=None, tile_adapter_ptr=None,
                       tile_lowrank_scale_ptr=None, tile_p_ptr=None, absmax_ptr=None, code_ptr=None,
                       absmax_code_ptr=None, absmax_scale_ptr=None, absmax_offset_ptr=None,
                       in_scale_ptr=None, scale_rows_ptr=None, dot_ptr=None, dot_part_ptr=None,
                       stride_st=0, stride_dm=0, stride_dn=0)
    dense = dict(NF4=False, NESTED=False, QBLOCK=64, QBLOCK2=256, ALIGNED=0)
    fwd = dict(
        a_ptr="bf16", b_ptr="bf16", l_ptr="fp32", u_ptr="fp32", bias_ptr="bf16", out_ptr="bf16", **members_off,
        M=M, N=N, K=K, R=R, M_BUCKET=M, TILED_M=M,
        stride_am=K, stride_ak=1, stride_bk=1, stride_bn=K, stride_lm=R, stride_lr=1, stride_ur=1, stride_un=R,
        stride_ua=N * R, stride_om=N, stride_on=1, lowrank_scale=2.0, seed=0, p=0.0,
        constexprs=dict(HAS_BIAS=True, DROPOUT=False, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", BLOCK_R=16,
                        EVEN_K=True, LOWRANK_LAST=False, BASE_IN_OUT=False, COL_SCALE=0, STORE_PRE=False,
                        MIXED=False, LOWRANK=True, IN_SCALE=0, BIAS_FIRST=False, COL_DOT=False, **dense))
    dx = dict(  # with dropout
        fwd, bias_ptr=None, M=M, N=K, K=N, stride_am=N, stride_ak=1, stride_bk=K, stride_bn=1, stride_ur=K, stride_un=1,
        stride_ua=R * K, stride_om=K, stride_on=1, lowrank_scale=1.25, seed=12345, p=0.2,
        constexprs=dict(fwd["constexprs"], HAS_BIAS=False, DROPOUT=True))
    gemm = "_lora_gemm_kernel"
    examples = {
        (gemm, "forward"): (fwd, GEMM_CONFIGS),
        (gemm, "forward r=64"): (dict(fwd, R=64, stride_lm=64, stride_un=64,
                                      constexprs=dict(fwd["constexprs"], BLOCK_R=64)), GEMM_CONFIGS),
        (gemm, "forward, low-rank term last"): (dict(fwd, constexprs=dict(fwd["constexprs"], LOWRANK_LAST=True)),
                                                GEMM_CONFIGS),
        (gemm, "backward dX"): (dx, GEMM_CONFIGS),
        # The "cublas" schedule's own launch: cuBLAS did the base product, the low-rank term is added onto out.
        (gemm, "low-rank pass onto cuBLAS"): (
            dict(fwd, b_ptr=None, bias_ptr=None, constexprs=dict(fwd["constexprs"], HAS_BIAS=False, BASE_IN_OUT=True)),
            LOWRANK_PASS_CONFIGS),
    }
    # The "tma" schedule (Hopper only): a and b as TMA descriptors (``("desc", dtype, block dims)``), forward over W
    # as stored and the dX GEMM with dropout over W as (K, N) rows.
    pointers = ("a_ptr", "b_ptr", "stride_am", "stride_ak", "stride_bk", "stride_bn")
    tma_constexprs = dict(DOT_PRECISION="ieee", COMPUTE=tl.bfloat16, BLOCK_R=16, COL_SCALE=False, STORE_PRE=False)
    for profile, example, b_block, b_kn in [("forward", fwd, ("BLOCK_N", "BLOCK_K"), False),
                                            ("backward dX", dx, ("BLOCK_K", "BLOCK_N"), True)]:
        tma = {k: v for k, v in example.items() if k not in pointers}
        tma.update(a_desc=("desc", "bf16", ("BLOCK_M", "BLOCK_K")), b_desc=("desc", "bf16", b_block),
                   constexprs=dict(tma_constexprs, HAS_BIAS=not b_kn, DROPOUT=b_kn, B_KN=b_kn))
        examples["_lora_gemm_tma_kernel", f"{profile}, tma"] = (tma, TMA_GEMM_CONFIGS)
    return examples


def _aot_lowrank_examples() -> dict:
    """The low-rank kernels' base launches (``lora_lowrank``), (kernel, profile) -> (example, configs)."""
    M, K, N, R = AOT_M, AOT_K, AOT_N, AOT_R
    shrink = dict(
        x_ptr="bf16", lora_a_ptr="fp32", s_ptr="fp32", rows_ptr=None, tile_adapter_ptr=None, tile_p_ptr=None,
        M=M, K=K, R=R, M_BUCKET=M, stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_aa=R * K,
        seed=12345, p=0.1, keep_scale=1.1,
        constexprs=dict(DROPOUT=True, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", BLOCK_R=16, MIXED=False))
    bwd_dy = dict(
        dy_ptr="bf16", lora_b_ptr="fp32", s_ptr="fp32", ds_part_ptr="fp32", db_part_ptr="fp32", dbias_part_ptr="fp32",
        col_scale_ptr=None, pre_ptr=None, dm_part_ptr=None, dz_ptr=None, rows_ptr=None, tile_adapter_ptr=None,
        tile_lowrank_scale_ptr=None,
        M=M, N=N, R=R, M_BUCKET=M, cols_per_split=2048, stride_dym=N, stride_dyn=1, stride_bn=R, stride_br=1,
        stride_ba=N * R, scaling=2.0,
        constexprs=dict(HAS_DBIAS=True, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", BLOCK_M=DY_BLOCK_M,
                        BLOCK_R=16, COL_SCALE=False, HAS_DM=False, WRITE_DZ=False, MIXED=False))
    bwd_da = dict(
        x_ptr="bf16", ds_ptr="fp32", da_part_ptr="fp32", rows_ptr=None, tile_adapter_ptr=None, tile_p_ptr=None,
        M=M, K=K, R=R, M_BUCKET=M, rows_per_split=1024, stride_xm=K, stride_xk=1, seed=12345, p=0.1, keep_scale=1.1,
        constexprs=dict(DROPOUT=True, COMPUTE=tl.bfloat16, DOT_PRECISION="ieee", BLOCK_R=16, MIXED=False))
    return {("_lora_shrink_kernel", "forward"): (shrink, SHRINK_CONFIGS),
            ("_lora_bwd_dy_kernel", "backward"): (bwd_dy, DY_CONFIGS),
            ("_lora_bwd_da_kernel", "backward"): (bwd_da, DA_CONFIGS)}
