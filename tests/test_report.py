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
    points, peaks = report.run_report(TINY, rounds=3, progress=lambda: ticks.append(1))
    assert len(ticks) == sum(len(s.values) for s in TINY)  # the progress bar moves once a point
    return points, peaks


def expected_candidates(sweep):
    peft = benchmark.peft_available()
    lora = {BASE, "fastpeft LoRA", LIMIT} | ({"peft LoRA"} if peft else set())
    if sweep == "tokens":
        lora |= {"fastpeft DoRA", "fastpeft QLoRA"} | ({"peft DoRA"} if peft else set())
        lora |= {"peft+bnb QLoRA"} if peft and benchmark.bnb_available() else set()
    if sweep == "width":
        lora |= {"fastpeft adapter", "unfused adapter"}
    if sweep == "adapters":
        return {BASE, "fastpeft mixed"} | ({"peft mixed"} if peft else set())
    return lora


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
    limit = next(p for p in points if p.sweep == "tokens" and p.x == 32 and p.candidate == LIMIT)
    shape = benchmark.Shape(32, 64, 64, 4)
    assert limit.ms == pytest.approx(report.limit_ms(shape, 4, peaks))
    assert statistics.median([p.ms for p in points if p.candidate == BASE]) > 0


def test_the_report_page_and_its_plots(measured, tmp_path):
    points, peaks = measured
    page = report.write_report(points, peaks, TINY, tmp_path / "out", "cpu", torch.float32, 3)
    text = page.read_text()
    assert benchmark.device_description("cpu") in text and "commit " in text and "torch " in text
    assert "**Estimated**: the limit line only" in text and "**Measured**" in text
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
