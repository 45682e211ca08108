"""The scaling report: every sweep's candidates side by side, ratios computed from the measured medians, the limit
line present and called an estimate, the plots written, and the command line's quick report."""
import statistics

import pytest
import torch

from fastpeft import benchmark, report
from fastpeft.report import BASE, LIMIT, Sweep

TINY = (
    Sweep("tokens", "M", (8, 32), "fwd+bwd time vs tokens M", dict(K=64, N=64, r=4)),
    Sweep("rank", "r", (2, 8), "fwd+bwd time vs rank r", dict(M=16, K=64, N=64)),
    Sweep("width", "K=N", (64, 128), "fwd+bwd time vs width K=N", dict(M=16, r=4)),
    Sweep("dropout", "dropout", (0.0, 0.1), "fwd+bwd time without and with dropout", dict(M=16, K=64, N=64, r=4)),
    Sweep("adapters", "adapters", (1, 3), "forward (serving) time vs adapters in one batch",
          dict(sequences=4, tokens=8, K=64, N=64, r=4)),
)


@pytest.fixture(scope="module")
def measured():
    ticks = []
    points, peaks, sweeps = report.run_report(TINY, rounds=3, progress=lambda: ticks.append(1))
    assert len(ticks) == sum(len(s.values) for s in TINY)  # the progress bar moves once a point
    assert sweeps == TINY  # (on a GPU the fixed sizes are the GPU's, and the report says so)
    return points, peaks


def expected_candidates(sweep):
    peft = benchmark.peft_available()
    if sweep == "adapters":
        return {BASE, "fastpeft mixed"} | ({"peft mixed"} if peft else set())
    lora = {BASE, "fastpeft LoRA", "fastpeft DoRA", "fastpeft QLoRA", "fastpeft adapter", "unfused adapter", LIMIT}
    lora |= {"peft LoRA", "peft DoRA"} if peft else set()
    return lora | ({"peft+bnb QLoRA"} if peft and benchmark.bnb_available() else set())


def test_every_candidate_at_every_point(measured):
    points, _ = measured
    for sweep in TINY:
        for x in sweep.values:
            got = {p.candidate for p in points if p.sweep == sweep.name and p.x == x}
            assert got == expected_candidates(sweep.name), (sweep.name, x)


def test_ratios_are_the_measured_medians_and_the_limit_an_estimate(measured):
    points, peaks = measured
    assert peaks.tflops > 0 and peaks.gbs > 0
    for p in points:
        base = next(b for b in points if (b.sweep, b.x, b.candidate) == (p.sweep, p.x, BASE))
        assert p.ratio == pytest.approx(p.ms / base.ms)
        if p.candidate != LIMIT:
            assert p.low <= p.ratio <= p.high or p.candidate == BASE
    for p in points:  # fastpeft's against PEFT's equivalent, where measured
        ref = {"fastpeft LoRA": "peft LoRA", "fastpeft DoRA": "peft DoRA"}.get(p.candidate)
        other = next((b for b in points if (b.sweep, b.x, b.candidate) == (p.sweep, p.x, ref)), None)
        if other is not None:
            assert p.reference_ratio == pytest.approx(p.ms / other.ms)
    # The limit, worked out here: fwd+bwd FLOPs (no dW) 2·M·N·K·2 + 2·M·r·(K+N)·3 over the FLOP rate, or the least
    # bytes (x, y, dY, dX once, W twice; fp32) over the bandwidth, whichever is longer.
    M, K, N, r = 32, 64, 64, 4
    flops = 4 * M * N * K + 6 * M * r * (K + N)
    least_bytes = 4 * (2 * M * K + 2 * M * N + 2 * N * K)
    limit = next(p for p in points if p.sweep == "tokens" and p.x == 32 and p.candidate == LIMIT)
    assert limit.ms == pytest.approx(max(flops / (peaks.tflops * 1e12), least_bytes / (peaks.gbs * 1e9)) * 1e3)
    for p in points:  # a limit no LoRA layer (nor the base) was measured below
        if p.candidate in (BASE, "fastpeft LoRA", "peft LoRA") and p.sweep != "adapters":
            bound = next(b for b in points if (b.sweep, b.x, b.candidate) == (p.sweep, p.x, LIMIT))
            assert bound.ms <= p.ms * (1 + 1e-9) or p.candidate == BASE
    assert statistics.median([p.ms for p in points if p.candidate == BASE]) > 0


def test_peak_memory_holds_what_a_step_must_allocate(measured):
    """A LoRA forward+backward allocates y (M, N) and dX (M, K) at least, whatever ran before it."""
    points, _ = measured
    for p in points:
        if p.sweep == "tokens" and p.candidate in ("fastpeft LoRA", "peft LoRA", BASE):
            assert p.peak_mb * 2**20 >= 4 * p.x * (64 + 64), (p.candidate, p.x, p.peak_mb)


def test_the_adapters_sweep_uses_as_many_adapters_as_it_says():
    from fastpeft import report as module
    for sweep in (*module.QUICK_SWEEPS, *module.FULL_SWEEPS):
        if sweep.name == "adapters":
            assert max(sweep.values) <= sweep.fixed["sequences"]


def test_the_report_page_and_its_plots(measured, tmp_path):
    points, peaks = measured
    page = report.write_report(points, peaks, TINY, tmp_path / "out", "cpu", torch.float32, 3)
    text = page.read_text()
    assert benchmark.device_description("cpu") in text and "commit " in text and "torch " in text
    assert "**Estimated**: the LoRA limit line only" in text and "**Measured**" in text
    for sweep in TINY:
        assert f"![{sweep.title}]({sweep.name}.png)" in text
        png = tmp_path / "out" / f"{sweep.name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "memory.png").exists()
    for p in points:  # every point is a row, with its ratio as measured
        assert f"| {p.x} | {p.candidate} | {p.ms:.3f} | {p.ratio:.2f} |" in text


def test_without_matplotlib_the_report_has_tables_only(measured, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    points, peaks = measured
    page = report.write_report(points, peaks, TINY, tmp_path, "cpu", torch.float32, 3)
    assert "has tables only" in page.read_text() and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("args,message", [(["--rounds", "0"], "positive integer"), (["--rounds", "-1"], "positive"),
                                          (["--device", "bogus"], "--device"), (["--device", "cuda:0"], "CUDA")])
def test_the_report_command_refuses_bad_arguments_before_measuring(args, message, tmp_path):
    import subprocess
    import sys
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = subprocess.run([sys.executable, "-m", "fastpeft", "report", "--quick", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    done = subprocess.run([sys.executable, "-m", "fastpeft", "report", "--quick", "--out", str(blocked)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot write a report there" in done.stderr and "sweeps" not in done.stderr


def test_the_quick_report_command(tmp_path):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "fastpeft", "report", "--quick", "--rounds", "2", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "report.md").read_text()
    assert sum(line.startswith("## ") for line in text.splitlines()) == len(report.QUICK_SWEEPS)
    assert "### Peak memory vs tokens M" in text
    assert len(list(tmp_path.glob("*.png"))) == len(report.QUICK_SWEEPS) + 1
