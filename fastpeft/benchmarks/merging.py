"""Merging adapters: :func:`fastpeft.add_weighted_adapter` against HF PEFT's own ``add_weighted_adapter`` on the same
PeftModel (one linear layer, K = N, n adapters of rank r with random A and B), side by side in one process: the
median time of a merge over interleaved rounds, its peak memory, and how far apart the two merged deltas are."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .measure import _ticker, peak_memory_mb


@dataclass(frozen=True)
class MergeCase:
    width: int  # K = N of the layer
    adapters: int
    r: int
    combination_type: str
    density: float | None = None

    def __str__(self) -> str:
        density = f", density {self.density}" if self.density is not None else ""
        return f"K=N={self.width}, {self.adapters}×r{self.r}, {self.combination_type}{density}"


CPU_CASES = [MergeCase(1024, 4, 16, "svd"), MergeCase(4096, 4, 16, "svd"), MergeCase(1024, 4, 16, "ties_svd", 0.5),
             MergeCase(1024, 4, 16, "dare_ties_svd", 0.5), MergeCase(1024, 4, 16, "cat"),
             MergeCase(1024, 4, 16, "ties", 0.5)]
QUICK_CASES = [MergeCase(256, 4, 16, "svd"), MergeCase(256, 4, 16, "ties_svd", 0.5)]
GPU_CASES = [MergeCase(4096, 4, 16, "svd"), MergeCase(4096, 4, 16, "ties_svd", 0.5),
             MergeCase(4096, 4, 16, "dare_ties_svd", 0.5)]
# PEFT's merge of one 4096×4096 layer is a full SVD of it: seconds a round on a CPU, so those rows take fewer rounds,
# and their peak memory (measured under the profiler, one more merge each) is left out.
SLOW_WIDTH, SLOW_ROUNDS = 4096, 3


@dataclass
class MergeResult:
    case: MergeCase
    candidate: str
    ms: float
    runs: list
    peak_mb: float | None
    rel_diff: float | None  # ‖ΔW − ΔW_peft‖ / ‖ΔW_peft‖ of the merged adapter (fastpeft's rows)


def _peft_model(case: MergeCase, dtype, device):
    import peft
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(case.width, case.width)).to(device=device, dtype=dtype)
    model = None
    for i in range(case.adapters):
        # init_lora_weights=False: B random too, as a trained adapter's (PEFT's default starts it at zero).
        config = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, target_modules=["0"], init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(layer, config, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", config)
    return model


def _merges(model, case: MergeCase) -> dict:
    from ..merging import add_weighted_adapter
    names = [f"a{i}" for i in range(case.adapters)]
    weights = [0.7, -0.4, 1.1, 0.3, 0.5, -0.2, 0.9, 0.6][:case.adapters] + [0.5] * max(0, case.adapters - 8)
    kwargs = {"combination_type": case.combination_type, "density": case.density}
    return {"peft": lambda: model.add_weighted_adapter(names, weights, "merged", **kwargs),
            "fastpeft": lambda: add_weighted_adapter(model, names, weights, "merged", **kwargs)}


def _timed(merge, model, device) -> float:
    """One merge's time (ms), the merged adapter deleted again outside the timing."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    merge()
    if cuda:
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - start) * 1e3
    model.delete_adapter("merged")
    return ms


def run_merging(cases=CPU_CASES, dtype=torch.float32, device="cpu", rounds: int = 5, progress=None
                ) -> list[MergeResult]:
    """Each case: one PeftModel, merged by PEFT and by fastpeft in ``rounds`` interleaved rounds (order rotating),
    after a warm-up merge each that also gives the merged deltas compared (under the same seed, so DARE's masks are
    the same); the peak memory of one merge each."""
    tick = _ticker(progress, len(cases))
    results = []
    for case in cases:
        model = _peft_model(case, dtype, device)
        merges = _merges(model, case)
        layer = model.base_model.model[0]
        deltas = {}
        for name, merge in merges.items():
            torch.manual_seed(1)
            merge()
            deltas[name] = layer.get_delta_weight("merged").double()
            model.delete_adapter("merged")
        diff = ((deltas["fastpeft"] - deltas["peft"]).norm() / deltas["peft"].norm()).item()
        slow = case.width >= SLOW_WIDTH and torch.device(device).type == "cpu"
        n_rounds = min(rounds, SLOW_ROUNDS) if slow else rounds
        names = list(merges)
        times = {name: [] for name in names}
        for i in range(n_rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                times[name].append(_timed(merges[name], model, device))
        for name in names:
            peak = None
            if not slow:
                peak = peak_memory_mb(merges[name], device)
                model.delete_adapter("merged")
            results.append(MergeResult(case, name, statistics.median(times[name]), times[name], peak,
                                       diff if name == "fastpeft" else None))
        tick()
    return results


def format_merging_table(results: list[MergeResult]) -> str:
    reference = {r.case: r for r in results if r.candidate == "peft"}
    lines = ["| merge | candidate | median ms | time / peft | peak MiB | peak / peft | rounds | ΔW vs peft |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = reference.get(r.case)
        ratio = f"{r.ms / ref.ms:.3f}" if ref and ref.ms else "-"
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.1f}"
        peak_ratio = (f"{r.peak_mb / ref.peak_mb:.2f}" if ref and r.peak_mb is not None and ref.peak_mb else "-")
        diff = "-" if r.rel_diff is None else f"{r.rel_diff:.1e}"
        lines.append(f"| {r.case} | {r.candidate} | {r.ms:.1f} | {ratio} | {peak} | {peak_ratio} | {len(r.runs)} "
                     f"| {diff} |")
    return "\n".join(lines) + (
        "\n\nLower is better. One add_weighted_adapter call on a PeftModel holding one linear layer (K = N) with "
        "the given LoRA adapters (random A and B): HF PEFT's method, and fastpeft.add_weighted_adapter on the same "
        "model; the merged adapter is deleted between calls, outside the timing. median ms: over rounds that "
        f"interleave the two; rows at K=N ≥ {SLOW_WIDTH} on a CPU take at most {SLOW_ROUNDS} rounds (rounds column) "
        "and have no peak memory measured. peak MiB: allocated above the live set during one merge. ΔW vs peft: "
        "‖ΔW − ΔW_peft‖ / ‖ΔW_peft‖ of the merged adapter, both merged after the same torch.manual_seed.")
