"""The fused LoRA linear ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``: its launchers.

Forward, split at the small tensor ``S = drop(x) Aᵀ`` (M×r, fp32):
  1. ``_lora_shrink_kernel``  S = drop(x) Aᵀ — reads x once; the dropout mask is drawn in-kernel (Philox)
     and never stored.
  2. ``_lora_gemm_kernel``    Y = x Wᵀ + s·S Bᵀ + b — ONE GEMM whose accumulator is seeded with the low-rank
     product, so the update costs one small dot per output tile and no M×N temporary.
Backward (W is frozen, so there is no dW):
  3. ``_lora_bwd_dy_kernel``  one pass over dY: partial sums of dS = s·dY B (per column split) and of
     dB = s·dYᵀ S and db (per row block).
  4. ``_lora_bwd_da_kernel``  dA = dSᵀ drop(x), the mask regenerated from the seed; split over rows, partials.
  5. ``_lora_gemm_kernel``    dX = dY W + (dS A) ⊙ mask/(1-p) — the forward GEMM kernel again, roles swapped.
Partial sums are reduced with ``torch.sum`` (no float atomics), so results are deterministic.

The op's modules: ``lora_gemm`` (the fused GEMM kernels: prologue, K loop, epilogue, the TMA schedule),
``lora_lowrank`` (shrink, dY pass, dA), ``lora_dropout`` (the Philox keep-mask), ``lora_nf4`` (a 4-bit base W),
``lora_dora`` (DoRA's norm), ``lora_mixed`` (mixed-adapter batches), ``lora_tuning`` (configs, shared-memory models,
autotuned kernels); this module launches the GEMM and the forward and backward passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from fastpeft.environment import GEMM_SCHEDULE_ENV, GEMM_SCHEDULES, gemm_schedule_env
from fastpeft.nf4 import nf4_matmul, nf4_matmul_t

from .common import GEMM_DEFAULT, INTERPRET_GEMM, compute_dtype, dot_precision, launch, new_output
from .lora_dora import dora_norm  # noqa: F401  (the op's entries, reached through this module)
from .lora_dropout import dropout_keep_mask  # noqa: F401
from .lora_gemm import _lora_gemm_tma_kernel
from .lora_lowrank import _lora_bwd_da_kernel, _lora_bwd_dy_kernel, _lora_shrink_kernel
from .lora_nf4 import _DENSE, NF4Operand, _exact_absmax, _weight_operand, nf4_dequantize_rows
from .lora_tuning import (
    DA_DEFAULT,
    DY_BLOCK_M,
    DY_CONFIGS,
    DY_DEFAULT,
    IA3_GEMM_DEFAULT,
    INTERPRET_DA,
    INTERPRET_DY,
    INTERPRET_DY_BLOCK_M,
    INTERPRET_SHRINK,
    LOWRANK_PASS_DEFAULT,
    MIXED_GEMM_DEFAULT,
    NF4_GEMM_DEFAULT,
    SHRINK_DEFAULT,
    TMA_GEMM_DEFAULT,
    _da_tuned,
    _dy_tuned,
    _gemm,
    _gemm_tuned,
    _lowrank_pass_tuned,
    _mixed_gemm_tuned,
    _nf4_gemm_tuned,
    _num_sms,
    _rank_block,
    _shrink_tuned,
    _tma_tuned,
    autotune_winners,  # noqa: F401  (the op's entries, reached through this module)
)

# How the fused GEMM runs (GEMM_SCHEDULES): "prologue" seeds the accumulator with the low-rank term before the K
# loop, "epilogue" adds it after (its operands loaded before the loop), "cublas" leaves the base product to torch
# (cuBLAS on a GPU) and adds the term in a second pass over the output (2·M·N more bytes moved; no K loop of ours),
# "tma" is the prologue schedule on a persistent grid reading a and b by TMA (Hopper; operands TMA cannot address,
# and older GPUs, run "prologue"). All are exact; which is fastest is for a GPU to measure (``auto`` times them, the
# GPU check's headline too).


def gemm_schedule(schedule=None) -> str:
    """The fused GEMM's schedule: the argument, else ``$FASTPEFT_GEMM_SCHEDULE``, else "prologue"."""
    source = "schedule"
    if schedule is None:
        schedule, source = gemm_schedule_env() or "prologue", GEMM_SCHEDULE_ENV
    if schedule not in GEMM_SCHEDULES:
        raise ValueError(f"{source} must be one of {', '.join(GEMM_SCHEDULES)}, got {schedule!r}")
    return schedule


@dataclass
class MixedLaunch:
    """One mixed GEMM launch: the tiles, each tile's low-rank scale and dropout rate, and the stride between the
    stacked adapters' ``up`` operands."""
    rows: torch.Tensor
    tile_adapter: torch.Tensor
    tile_lowrank_scale: torch.Tensor
    tile_p: torch.Tensor
    tiles: int
    tile: int
    stride_ua: int


@dataclass
class ScaleLaunch:
    """(IA)³'s part of one GEMM launch (no low-rank term): ``in_scale`` scales a's columns as the K loop loads them,
    ``col_scale`` (the launch's) out's columns, both fp32 vectors, or with ``scale_rows`` (M,) int32 tables whose row
    ``scale_rows[i]`` scales row i (-1: none); ``bias_first`` adds the bias before the column scale; ``dot`` (out's
    shape) asks for ``dot_part`` (cdiv(M, DOT_ROWS), N) fp32, the column sums of (a · b) ⊙ dot per DOT_ROWS rows."""
    in_scale: torch.Tensor | None = None
    scale_rows: torch.Tensor | None = None
    bias_first: bool = False
    dot: torch.Tensor | None = None
    dot_part: torch.Tensor | None = None


def lora_gemm(a, b, lo, up, bias, out, lowrank_scale: float, seed: int = 0, dropout_p: float = 0.0, schedule=None, *,
              col_scale=None, pre=None, mixed: MixedLaunch | None = None, scales: ScaleLaunch | None = None):
    """out (M, N) = a (M, K) · b (K, N) + lowrank_scale · [keep ⊙] (lo (M, R) · up (R, N)) + bias — any strides, so
    transposed views (Wᵀ, Bᵀ) cost nothing. The keep-mask of ``seed`` applies when ``dropout_p`` > 0.
    ``schedule``: one of ``GEMM_SCHEDULES``; None takes ``$FASTPEFT_GEMM_SCHEDULE`` (default "prologue").
    DoRA: ``col_scale`` (N,) fp32 scales the columns before the bias; ``pre`` (out's shape and strides), if given,
    receives the unscaled sum. ``mixed``: a mixed-adapter batch's tiles (``up`` is then adapter 0's of a stack,
    ``lowrank_scale`` and ``dropout_p`` per tile; prologue order). ``b`` may be an :class:`NF4Operand` (a 4-bit base),
    dequantised tile by tile in the K loop; "cublas" dequantises it instead a chunk of W's rows at a time
    (``NF4_GPU_CHUNK`` elements) for cuBLAS, and "tma", which needs a dense b, runs "prologue".
    ``scales`` ((IA)³): ``lo`` and ``up`` are None (no low-rank term), the GEMM runs the "prologue" schedule (no
    low-rank term to place), see :class:`ScaleLaunch`.
    """
    schedule = gemm_schedule(schedule)
    M, K = a.shape
    N, R = b.shape[1], (lo.shape[1] if lo is not None else 0)
    if scales is not None:
        schedule = "prologue"
    on_cpu = a.device.type == "cpu"
    quant, quant_args, b_arg = _DENSE, (None,) * 5, b
    if isinstance(b, NF4Operand):
        quant, quant_args, b_arg = b.constexprs(), b.pointers(), b.weight.packed
        schedule = "prologue" if schedule == "tma" else schedule
    if pre is not None and (pre.shape != out.shape or pre.stride() != out.stride()):
        raise ValueError("lora_gemm: pre must have out's shape and strides")
    scales = scales or ScaleLaunch()
    table = scales.scale_rows is not None
    dora = dict(COL_SCALE=(2 if table else 1) if col_scale is not None else 0, STORE_PRE=pre is not None)
    ia3 = dict(LOWRANK=lo is not None, IN_SCALE=(2 if table else 1) if scales.in_scale is not None else 0,
               BIAS_FIRST=scales.bias_first, COL_DOT=scales.dot is not None)
    stride_st = next((t.stride(0) for t in (scales.in_scale, col_scale) if t is not None and t.dim() == 2), 0)
    if mixed is not None:
        schedule = "prologue"
    if schedule == "tma":
        if _tma_addressable(a, b):
            return _lora_gemm_tma(a, b, lo, up, bias, out, lowrank_scale, seed, dropout_p, col_scale, pre, dora)
        schedule = "prologue"  # what TMA cannot address runs the default schedule
    tuned, default = (_gemm_tuned, GEMM_DEFAULT) if mixed is None else (_mixed_gemm_tuned, MIXED_GEMM_DEFAULT)
    if lo is None:
        default = IA3_GEMM_DEFAULT
    if quant["NF4"]:
        tuned, default = _nf4_gemm_tuned, NF4_GEMM_DEFAULT
    tables = ((mixed.rows, mixed.tile_adapter, mixed.tile_lowrank_scale, mixed.tile_p) if mixed is not None
              else (None,) * 4)
    tiled_m = mixed.tiles * mixed.tile if mixed is not None else M
    if schedule == "cublas":  # the base product (and bias) by torch into out; the kernel adds the low-rank term
        fold_bias = bias is not None and col_scale is None  # a scaled output gets its bias after the scale
        _cublas_base_product(a, b, out, bias if fold_bias else None)
        bias = None if fold_bias else bias
        tuned, default = _lowrank_pass_tuned, LOWRANK_PASS_DEFAULT
        quant, quant_args, b_arg = _DENSE, (None,) * 5, None  # (no K loop: b is not read)
    launch(tuned, _gemm, default, INTERPRET_GEMM,
            lambda c: (triton.cdiv(tiled_m, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),), on_cpu,
            a, b_arg, lo, up, None if bias is None else bias.contiguous(), out, col_scale, pre, *tables,
            *quant_args, scales.in_scale, scales.scale_rows, scales.dot, scales.dot_part,
            M, N, K, R, triton.next_power_of_2(M), tiled_m,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), *(lo.stride() if lo is not None else (0, 0)),
            *(up.stride() if up is not None else (0, 0)), mixed.stride_ua if mixed is not None else 0,
            out.stride(0), out.stride(1), stride_st,
            *(scales.dot.stride() if scales.dot is not None else (0, 0)),
            lowrank_scale, seed, dropout_p,
            HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, COMPUTE=compute_dtype(a.dtype, on_cpu),
            DOT_PRECISION=dot_precision(a.dtype), BLOCK_R=_rank_block(max(R, 1)), LOWRANK_LAST=schedule == "epilogue",
            BASE_IN_OUT=schedule == "cublas", MIXED=mixed is not None, **dora, **quant, **_exact_absmax(quant["NF4"]),
            **ia3)


# 8 MiB in bf16) for cuBLAS, so the layer is never whole in full precision.
NF4_GPU_CHUNK = 1 << 22


def _cublas_base_product(a, b, out, bias=None):
    """out = a · b (+ bias) by torch (cuBLAS on a GPU); an NF4 b dequantised a chunk of W's rows at a time by
    ``_nf4_dequant_kernel``: columns of out for b = Wᵀ, a sum over chunks for b = W."""
    if not isinstance(b, NF4Operand):
        torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
    elif b.transposed:
        nf4_matmul(a, b.weight, bias, out, max_elements=NF4_GPU_CHUNK, dequantize_rows=nf4_dequantize_rows)
    else:
        nf4_matmul_t(a, b.weight, out.zero_(), max_elements=NF4_GPU_CHUNK, dequantize_rows=nf4_dequantize_rows)


def _tma_addressable(a, b) -> bool:
    """TMA reads a (M, K) and b (K, N) (or b's transpose, W as stored) when each has a unit inner stride, 16-byte
    aligned rows and base, on a Hopper or later GPU (or the interpreter)."""
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device)[0] < 9:
        return False
    es = a.element_size()
    b_rows = b if b.stride(1) == 1 else b.t()
    return all(t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0 and t.stride(0) > 0
               for t in (a, b_rows))


def _lora_gemm_tma(a, b, lo, up, bias, out, lowrank_scale, seed, dropout_p, col_scale, pre, dora):
    from triton.tools.tensor_descriptor import TensorDescriptor
    M, K = a.shape
    N, R = b.shape[1], lo.shape[1]
    on_cpu = a.device.type == "cpu"
    b_kn = b.stride(1) == 1  # b as (K, N) rows (dX: W), else its transpose (N, K) is (forward: W as stored)
    stored = b if b_kn else b.t()
    block = INTERPRET_GEMM if on_cpu else TMA_GEMM_DEFAULT.kwargs  # autotuning's pre-hook resets them per config
    a_desc = TensorDescriptor.from_tensor(a, [block["BLOCK_M"], block["BLOCK_K"]])
    b_desc = TensorDescriptor.from_tensor(stored, [block["BLOCK_K"], block["BLOCK_N"]] if b_kn
                                          else [block["BLOCK_N"], block["BLOCK_K"]])
    if on_cpu:
        sms = 3  # a few programs, so the persistent loop takes several tiles each
    else:
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    launch(_tma_tuned, _lora_gemm_tma_kernel, TMA_GEMM_DEFAULT, INTERPRET_GEMM,
           lambda c: (min(sms, triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])),), on_cpu,
           a_desc, b_desc, lo, up, None if bias is None else bias.contiguous(), out, col_scale, pre,
           M, N, K, R, triton.next_power_of_2(M),
           lo.stride(0), lo.stride(1), up.stride(0), up.stride(1), out.stride(0), out.stride(1),
           lowrank_scale, seed, dropout_p,
           HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, COMPUTE=compute_dtype(a.dtype, on_cpu),
           DOT_PRECISION=dot_precision(a.dtype), BLOCK_R=_rank_block(R), B_KN=b_kn, **dora)
    return out


def lora_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int, schedule=None, *,
             col_scale=None, keep_pre=False):
    """Forward of the fused LoRA linear.

    x (M, K) fp16/bf16/fp32, any strides; weight (N, K) (or a 4-bit base's NF4Weight) and bias (N,) in x's dtype;
    lora_A (R, K) and
    lora_B (N, R) in any of those dtypes (computed in x's dtype, accumulated in fp32).
    Returns y (M, N) in x's dtype, S = drop(x) Aᵀ (M, R) in fp32, which backward needs, and pre. ``schedule``: the
    fused GEMM's (see ``lora_gemm``). DoRA: ``col_scale`` (N,) scales y's columns before the bias; with
    ``keep_pre`` pre is the unscaled x Wᵀ + s·S Bᵀ (M, N), else None.
    """
    M, K = x.shape
    N, R = lora_B.shape
    device, on_cpu = x.device, x.device.type == "cpu"
    s = new_output((M, R), torch.float32, device)
    y = new_output((M, N), x.dtype, device)
    pre = new_output((M, N), x.dtype, device) if keep_pre and col_scale is not None else None
    if M == 0:
        return y, s, pre
    launch(_shrink_tuned, _lora_shrink_kernel, SHRINK_DEFAULT, INTERPRET_SHRINK,
            lambda c: (triton.cdiv(M, c["BLOCK_M"]),), on_cpu,
            x, lora_A, s, None, None, None, M, K, R, triton.next_power_of_2(M), x.stride(0), x.stride(1),
            lora_A.stride(0), lora_A.stride(1), 0,
            seed, dropout_p, 1.0 / (1.0 - dropout_p),
            DROPOUT=dropout_p > 0.0, COMPUTE=compute_dtype(x.dtype, on_cpu), DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_R=_rank_block(R), MIXED=False)
    if col_scale is not None:
        col_scale = col_scale.to(torch.float32).contiguous()
    lora_gemm(x, _weight_operand(weight, True), s, lora_B.t(), bias, y, scaling, schedule=schedule,
              col_scale=col_scale, pre=pre)
    return y, s, pre


def lora_bwd(dy, x, weight, lora_A, lora_B, s, scaling: float, dropout_p: float, seed: int,
             needs_dx: bool, needs_da: bool, needs_db: bool, needs_dbias: bool, schedule=None, *,
             col_scale=None, pre=None):
    """Backward of the fused LoRA linear: (dx, dA, dB, dbias, dm_sum), each None where not needed.

    dy (M, N) in the forward's dtype, any strides; x (M, K) as in forward (only read when dA is needed);
    s = S from forward (M, R) fp32. dA, dB come back in the adapters' dtype, dx and dbias in x's dtype. ``schedule``:
    the dX GEMM's (see ``lora_gemm``). DoRA: ``col_scale`` (N,) as in forward; with ``pre`` (forward's, M×N),
    dm_sum = Σ_rows dY ⊙ pre (N,) fp32, which divided by the norm is dm.
    """
    M, N = dy.shape
    R, K = lora_A.shape
    device, on_cpu = dy.device, dy.device.type == "cpu"
    dropout = dropout_p > 0.0
    keep_scale = 1.0 / (1.0 - dropout_p)
    precision = dot_precision(dy.dtype)
    compute = compute_dtype(dy.dtype, on_cpu)
    block_r = _rank_block(R)
    dx = da = db = dbias = dm = None
    if M == 0:
        dx = torch.zeros((0, K), dtype=dy.dtype, device=device) if needs_dx else None
        da = torch.zeros_like(lora_A) if needs_da else None
        db = torch.zeros_like(lora_B) if needs_db else None
        dbias = torch.zeros(N, dtype=dy.dtype, device=device) if needs_dbias else None
        dm = torch.zeros(N, dtype=torch.float32, device=device) if pre is not None else None
        return dx, da, db, dbias, dm

    dy_block_m = INTERPRET_DY_BLOCK_M if on_cpu else DY_BLOCK_M
    row_blocks = triton.cdiv(M, dy_block_m)
    # Split the columns too when there are few row blocks, so the pass over dY fills the GPU (dS partials
    # are small: M×r each). cols_per_split is a multiple of every BLOCK_N the kernel may run with.
    quantum = INTERPRET_DY["BLOCK_N"] if on_cpu else max(c.kwargs["BLOCK_N"] for c in DY_CONFIGS)
    col_splits = max(1, min(triton.cdiv(N, quantum), (2 * _num_sms(device)) // row_blocks))
    cols_per_split = triton.cdiv(triton.cdiv(N, col_splits), quantum) * quantum
    col_splits = triton.cdiv(N, cols_per_split)
    ds_part = new_output((col_splits, M, R), torch.float32, device)
    db_part = new_output((row_blocks, N, R), torch.float32, device)
    dbias_part = new_output((row_blocks, N), torch.float32, device) if needs_dbias else None
    # DoRA: the pass scales dY's columns, sums dm's partials beside db's, and writes dZ = dY ⊙ scale for dX's GEMM.
    dora = col_scale is not None
    if dora:
        col_scale = col_scale.to(torch.float32).contiguous()
    dm_part = new_output((row_blocks, N), torch.float32, device) if pre is not None else None
    dz = new_output((M, N), dy.dtype, device) if dora and needs_dx else None
    launch(_dy_tuned, _lora_bwd_dy_kernel, DY_DEFAULT, INTERPRET_DY, lambda c: (row_blocks, col_splits), on_cpu,
            dy, lora_B, s, ds_part, db_part, dbias_part, col_scale, None if pre is None else pre.contiguous(), dm_part,
            dz, None, None, None,
            M, N, R, triton.next_power_of_2(M), cols_per_split,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), 0, scaling,
            HAS_DBIAS=needs_dbias, COMPUTE=compute, DOT_PRECISION=precision, BLOCK_M=dy_block_m, BLOCK_R=block_r,
            COL_SCALE=dora, HAS_DM=pre is not None, WRITE_DZ=dz is not None, MIXED=False)
    ds = ds_part.sum(0) if col_splits > 1 else ds_part[0]
    if needs_db:
        db = db_part.sum(0).to(lora_B.dtype)
    if needs_dbias:
        dbias = dbias_part.sum(0).to(dy.dtype)
    if pre is not None:
        dm = dm_part.sum(0)

    if needs_da:
        # Enough (column-block × row-split) programs to fill the GPU about twice; partials summed below.
        col_blocks = triton.cdiv(K, 128)
        splits = max(1, min(triton.cdiv(M, 256), (2 * _num_sms(device)) // col_blocks))
        rows_per_split = triton.cdiv(M, splits)
        da_part = new_output((splits, R, K), torch.float32, device)
        launch(_da_tuned, _lora_bwd_da_kernel, DA_DEFAULT, INTERPRET_DA,
                lambda c: (triton.cdiv(K, c["BLOCK_K"]), splits), on_cpu,
                x, ds, da_part, None, None, None, M, K, R, triton.next_power_of_2(M), rows_per_split,
                x.stride(0), x.stride(1), seed, dropout_p, keep_scale,
                DROPOUT=dropout, COMPUTE=compute, DOT_PRECISION=precision, BLOCK_R=block_r, MIXED=False)
        da = da_part.sum(0).to(lora_A.dtype)

    if needs_dx:
        dx = new_output((M, K), dy.dtype, device)
        lora_gemm(dz if dz is not None else dy, _weight_operand(weight, False), ds, lora_A, None, dx, keep_scale, seed,
                  dropout_p, schedule=schedule)
    return dx, da, db, dbias, dm
