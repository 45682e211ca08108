"""The `python -m fastpeft bench` cases under pytest-benchmark: ``pytest bench/ --benchmark-only``.

Set FASTPEFT_BENCH_DEVICE=cuda (default cpu) and FASTPEFT_BENCH_DTYPE=bf16|fp16|fp32 to choose where.
Peak memory of each case is stored in the benchmark's extra_info.
"""
import os

import pytest
import torch

from fastpeft.benchmarks import timing as cases

DEVICE = os.environ.get("FASTPEFT_BENCH_DEVICE", "cpu")
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
    os.environ.get("FASTPEFT_BENCH_DTYPE", "bf16" if DEVICE == "cuda" else "fp32")]
SHAPES = cases.QUICK_SHAPES if DEVICE == "cpu" else cases.GPU_SHAPES[:1]
CANDIDATES = ["nn.Linear", "fastpeft[torch]", "fastpeft[triton]", "peft"]


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "drop0.1"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lora_linear(benchmark, shape, dropout, candidate, mode):
    _time(benchmark, cases.make_candidates(shape, DTYPE, DEVICE, dropout), candidate, shape, mode)


def _time(benchmark, layers, candidate, shape, mode):
    """Time one candidate's ``mode`` step under pytest-benchmark, with its peak (and saved) memory in extra_info."""
    if candidate not in layers:
        pytest.skip(f"{candidate} cannot run on {DEVICE} here")
    x = torch.randn(shape.M, shape.K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(shape.M, shape.N, device=DEVICE, dtype=DTYPE)
    step = cases.make_step(layers[candidate], x, dy, mode)
    if DEVICE == "cuda":
        step = _synchronized(step)
    step()  # warm-up (and Triton autotuning) outside the timing
    benchmark.extra_info["peak_mib"] = cases.peak_memory_mb(step, DEVICE)
    benchmark.extra_info["saved_mib"] = cases.saved_mb(layers[candidate], x)
    benchmark.extra_info["device"] = cases.device_description(DEVICE)
    benchmark(step)


def _synchronized(step):
    def run():
        step()
        torch.cuda.synchronize()
    return run


DORA_CANDIDATES = ["fastpeft DoRA[torch]", "fastpeft DoRA[triton]", cases.DORA_REFERENCE]


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("candidate", DORA_CANDIDATES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dora(benchmark, shape, candidate, mode):
    _time(benchmark, cases.make_dora_candidates(shape, DTYPE, DEVICE, 0.0), candidate, shape, mode)
