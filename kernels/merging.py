"""The element-wise merge of LoRA deltas (fastpeft.ops.merging holds its reference and torch path): each program
forms one tile of every adapter's delta sᵢ·BᵢAᵢ from the factors in registers, prunes it at the adapter's magnitude
threshold, and writes that tile of the merged matrix: the weighted sum, or TIES' sign election and disjoint mean. No
adapter's N×K delta is ever in memory. A second mode writes one adapter's |delta| tile by tile, with the very
arithmetic the merge repeats, so a threshold found on it keeps exactly the entries the merge keeps."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import new_output
from .lora_tuning import _rank_block

# mode: what a launch writes
MAGNITUDES, WEIGHTED_SUM, TIES_TOTAL, TIES_FREQUENCY = 0, 1, 2, 3


@triton.jit
def _task_delta(lora_b_ptr, lora_a_ptr, offsets_ptr, scalings_ptr, task, rn, rk, N, K,
                stride_bn, stride_br, stride_ar, stride_ak,
                DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """Tile (rn, rk) of task ``task``'s delta (B·A)·s: its factors are columns offsets[task]:offsets[task + 1] of the
    stacked B (N, R) and those rows of the stacked A (R, K); the product first, then the scale, as PEFT computes."""
    begin = tl.load(offsets_ptr + task)
    end = tl.load(offsets_ptr + task + 1)
    rr = (begin + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_ok = rr < end
    b = tl.load(lora_b_ptr + rn[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                mask=(rn < N)[:, None] & r_ok[None, :], other=0.0)
    a = tl.load(lora_a_ptr + rr[:, None] * stride_ar + rk[None, :].to(tl.int64) * stride_ak,
                mask=r_ok[:, None] & (rk < K)[None, :], other=0.0)
    return tl.dot(b, a, input_precision=DOT_PRECISION) * tl.load(scalings_ptr + task)


@triton.jit
def _pruned(delta, thresholds_ptr, task, PRUNE: tl.constexpr):
    """The delta tile with the entries below the task's magnitude threshold zeroed (multiplied by 0, as PEFT)."""
    if PRUNE:
        keep = tl.abs(delta) >= tl.load(thresholds_ptr + task)
        delta = delta * keep.to(tl.float32)
    return delta


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _merge_deltas_kernel(
    out_ptr, lora_b_ptr, lora_a_ptr, offsets_ptr, scalings_ptr, weights_ptr, thresholds_ptr,
    N, K, TASKS, ONLY_TASK,
    stride_bn, stride_br, stride_ar, stride_ak, stride_on, stride_ok,
    MODE: tl.constexpr, PRUNE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_K) tile of the output. MODE 0: |delta| of task ONLY_TASK. MODE 1: Σᵢ wᵢ·pruned deltaᵢ.
    MODE 2 / 3 (TIES, the majority sign from the sum / the count of the pruned deltas' signs): Σᵢ wᵢ·deltaᵢ over the
    tasks agreeing with the majority, divided by their number (at least 1). The deltas of a TIES tile are formed
    twice (votes, then the mean) rather than kept: TASKS is a runtime count."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_mask = (rn < N)[:, None] & (rk < K)[None, :]
    out_ptrs = out_ptr + rn[:, None].to(tl.int64) * stride_on + rk[None, :].to(tl.int64) * stride_ok
    if MODE == 0:
        delta = _task_delta(lora_b_ptr, lora_a_ptr, offsets_ptr, scalings_ptr, ONLY_TASK, rn, rk, N, K,
                            stride_bn, stride_br, stride_ar, stride_ak, DOT_PRECISION, BLOCK_R)
        tl.store(out_ptrs, tl.abs(delta), mask=out_mask)
    elif MODE == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for task in range(TASKS):
            delta = _task_delta(lora_b_ptr, lora_a_ptr, offsets_ptr, scalings_ptr, task, rn, rk, N, K,
                                stride_bn, stride_br, stride_ar, stride_ak, DOT_PRECISION, BLOCK_R)
            acc += _pruned(delta, thresholds_ptr, task, PRUNE) * tl.load(weights_ptr + task)
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        votes = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for task in range(TASKS):
            delta = _task_delta(lora_b_ptr, lora_a_ptr, offsets_ptr, scalings_ptr, task, rn, rk, N, K,
                                stride_bn, stride_br, stride_ar, stride_ak, DOT_PRECISION, BLOCK_R)
            delta = _pruned(delta, thresholds_ptr, task, PRUNE)
            if MODE == 2:
                votes += delta
            else:
                votes += _sign(delta)
        majority = tl.where(votes >= 0, 1.0, -1.0)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        agreeing = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for task in range(TASKS):
            delta = _task_delta(lora_b_ptr, lora_a_ptr, offsets_ptr, scalings_ptr, task, rn, rk, N, K,
                                stride_bn, stride_br, stride_ar, stride_ak, DOT_PRECISION, BLOCK_R)
            delta = _pruned(delta, thresholds_ptr, task, PRUNE)
            agree = (_sign(delta) == majority).to(tl.float32)
            acc += delta * tl.load(weights_ptr + task) * agree
            agreeing += agree
        tl.store(out_ptrs, acc / tl.maximum(agreeing, 1.0), mask=out_mask)


# One element-wise pass per layer and merge: fixed tiles (the interpreter's small, for speed).
BLOCKS = dict(BLOCK_N=64, BLOCK_K=64)
INTERPRET_BLOCKS = dict(BLOCK_N=32, BLOCK_K=32)


class Stacked:
    """The adapters of one merge as the kernel reads them: B (N, R) and A (R, K) stacked in fp32, each task's rank
    range (``offsets``, n + 1), its scale and weight (fp32, one per task)."""

    def __init__(self, lora_As, lora_Bs, scalings, weights):
        device = lora_As[0].device
        self.lora_B = torch.cat([b.detach().float() for b in lora_Bs], dim=1).contiguous()
        self.lora_A = torch.cat([a.detach().float() for a in lora_As], dim=0).contiguous()
        ranks = [a.shape[0] for a in lora_As]
        self.offsets = torch.tensor([sum(ranks[:i]) for i in range(len(ranks) + 1)], dtype=torch.int32,
                                    device=device)
        self.scalings = torch.tensor([float(s) for s in scalings], dtype=torch.float32, device=device)
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float32, device=device)
        self.tasks, self.rank_block = len(ranks), _rank_block(max(ranks))
        self.shape = (self.lora_B.shape[0], self.lora_A.shape[1])


def _launch(stacked: Stacked, out, mode: int, thresholds=None, only_task: int = 0, dot_precision="ieee") -> None:
    on_cpu = out.device.type == "cpu"
    blocks = INTERPRET_BLOCKS if on_cpu else BLOCKS
    n, k = stacked.shape
    grid = (triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(k, blocks["BLOCK_K"]))
    _merge_deltas_kernel[grid](
        out, stacked.lora_B, stacked.lora_A, stacked.offsets, stacked.scalings, stacked.weights,
        thresholds, n, k, stacked.tasks, only_task,
        stacked.lora_B.stride(0), stacked.lora_B.stride(1), stacked.lora_A.stride(0), stacked.lora_A.stride(1),
        out.stride(0), out.stride(1),
        MODE=mode, PRUNE=thresholds is not None, DOT_PRECISION=dot_precision, BLOCK_R=stacked.rank_block, **blocks,
        **({} if on_cpu else dict(num_warps=4, num_stages=2)))


def delta_magnitudes(stacked: Stacked, task: int, out=None) -> torch.Tensor:
    """|delta| (N, K) fp32 of task ``task``, as the merge forms it (``out``: a buffer to write, else a new one)."""
    out = new_output(stacked.shape, torch.float32, stacked.lora_A.device) if out is None else out
    _launch(stacked, out, MAGNITUDES, only_task=task)
    return out


def merge_deltas(stacked: Stacked, mode: int, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """The merged matrix (N, K) fp32: ``mode`` WEIGHTED_SUM, TIES_TOTAL or TIES_FREQUENCY; ``thresholds`` (n,) fp32:
    each task keeps the entries with |delta| ≥ its threshold (None: no pruning)."""
    out = new_output(stacked.shape, torch.float32, stacked.lora_A.device)
    _launch(stacked, out, mode, thresholds)
    return out
