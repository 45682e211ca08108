"""The bottleneck-adapter cases of `python -m fastpeft bench` under pytest-benchmark (CPU; see test_bench_lora)."""
import os

import pytest
import torch

from fastpeft.benchmarks import timing as cases

DEVICE = os.environ.get("FASTPEFT_BENCH_DEVICE", "cpu")


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("candidate", ["unfused (AdapterHub way)", "fastpeft[torch]"])
@pytest.mark.parametrize("shape", cases.ADAPTER_QUICK_SHAPES, ids=str)
def test_adapter(benchmark, shape, candidate, mode):
    layer = cases.make_adapter_candidates(shape, torch.float32, DEVICE)[candidate]
    h = torch.randn(shape.M, shape.d, device=DEVICE, requires_grad=True)
    dy = torch.randn(shape.M, shape.d, device=DEVICE)
    step = cases.make_step(layer, h, dy, mode)
    step()
    benchmark.extra_info["peak_mib"] = cases.peak_memory_mb(step, DEVICE)
    benchmark(step)
