"""The scaling report: every sweep's candidates side by side, ratios computed from the measured medians, the limit
line present and called an estimate, the plots written, and the command line's quick report."""
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import refused_by_cli

from fastpeft.benchmarks import report, timing
from fastpeft.benchmarks.report import BASE, LIMIT, Sweep

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
    peft = timing.peft_available()
    if sweep == "adapters":
        return {BASE, "fastpeft mixed"} | ({"peft mixed"} if peft else set())
    lora = {BASE, "fastpeft LoRA", "fastpeft DoRA", "fastpeft QLoRA", "fastpeft adapter", "unfused adapter", LIMIT}
    lora |= {"peft LoRA", "peft DoRA"} if peft else set()
    return lora | ({"peft+bnb QLoRA"} if peft and timing.bnb_available() else set())


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
        if other is not None:  # the median of the per-round ratios, inside its own spread
            assert p.reference_low <= p.reference_ratio <= p.reference_high
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
    from fastpeft.benchmarks import report as module
    for sweep in (*module.QUICK_SWEEPS, *module.FULL_SWEEPS):
        if sweep.name == "adapters":
            assert max(sweep.values) <= sweep.fixed["sequences"]


def test_the_report_page_and_its_plots(measured, tmp_path):
    points, peaks = measured
    page = report.write_report(points, peaks, TINY, tmp_path / "out", "cpu", torch.float32, 3)
    text = page.read_text()
    assert timing.device_description("cpu") in text and "commit " in text and "torch " in text
    assert "**Estimated**: the LoRA limit line only" in text and "**Measured**" in text
    for sweep in TINY:
        assert f"![{sweep.title}]({sweep.name}.png)" in text
        png = tmp_path / "out" / f"{sweep.name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "memory.png").exists()
    # what the command line checks it can write before measuring: all the report wrote
    assert {f.name for f in (tmp_path / "out").iterdir()} <= set(report.written_files(TINY))
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
def test_the_report_command_refuses_bad_arguments_before_measuring(capsys, args, message, tmp_path):
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert message in refused_by_cli(capsys, "report", "--quick", "--out", str(tmp_path), *args)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    err = refused_by_cli(capsys, "report", "--quick", "--out", str(blocked))
    assert "cannot write a report there" in err and "sweeps" not in err


@pytest.mark.parametrize("blocked", ["report.md", "tokens.png"])
def test_the_report_command_checks_every_file_it_writes_before_measuring(capsys, blocked, tmp_path):
    (tmp_path / blocked).mkdir()
    err = refused_by_cli(capsys, "report", "--quick", "--rounds", "1", "--out", str(tmp_path))
    assert f"argument --out: cannot write a report there: {tmp_path / blocked}: " in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [blocked]  # and the files tried are not left behind


@pytest.mark.slow
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


# ----------------------------------------------------------------------------------------------------------
# The plots and the page, on synthetic points: what a reader sees, whatever this machine's timings are
# ----------------------------------------------------------------------------------------------------------

PAIRS = (("fastpeft LoRA", "peft LoRA", 1.15, 1.25), ("fastpeft DoRA", "peft DoRA", 1.4, 2.5),
         ("fastpeft QLoRA", "peft+bnb QLoRA", 2.0, 1.8), ("fastpeft adapter", "unfused adapter", 0.4, 0.38))


def synthetic(sweep, noisy=(), unordered=()):
    """Tight points of every candidate at each of ``sweep``'s values (rounds within 10%, fastpeft's order against
    PEFT's the same in every round), but a 39x ratio with rounds from 25x to 89x at each (candidate, x) of ``noisy``
    and rounds on both sides of PEFT's at each (candidate, x) of ``unordered``."""
    points = []
    for x in sweep.values:
        points.append(report.Point(sweep.name, x, BASE, 1.0, 1.0, 1.0, 1.0, peak_mb=4 + x))
        for mine, theirs, ratio, reference in PAIRS:
            for name, r in ((mine, ratio), (theirs, reference)):
                low, high = (25.0, 89.0) if (name, x) in noisy else (r * 0.96, r * 1.05)
                points.append(report.Point(sweep.name, x, name, 39.0 if (name, x) in noisy else r,
                                           39.0 if (name, x) in noisy else r, low, high, peak_mb=(4 + x) * 1.3))
            p = points[-2]
            p.reference_ratio = p.ratio / points[-1].ratio
            p.reference_low, p.reference_high = ((0.9, 1.1) if (mine, x) in unordered else
                                                 (p.reference_ratio * 0.97, p.reference_ratio * 1.03))
        points.append(report.Point(sweep.name, x, LIMIT, 0.5, 0.5, 0.5, 0.5))
    return points


TOKENS = Sweep("tokens", "M", (64, 512, 2048), "fwd+bwd time vs tokens M", dict(K=512, N=512, r=16))
DROPOUT = Sweep("dropout", "dropout", (0.0, 0.1), "fwd+bwd time without and with dropout", dict(M=512, K=512, N=512))


def test_what_makes_a_point_unsettled():
    tight = report.Point("tokens", 64, "fastpeft LoRA", 1.0, 1.2, 1.1, 1.3, reference_ratio=0.9,
                         reference_low=0.85, reference_high=0.95)
    assert report.unsettled(tight) is None
    edge = report.Point("tokens", 64, "peft LoRA", 1.0, 1.2, 1.0, 1.5)  # rounds exactly 1.5x apart: settled
    assert report.unsettled(edge) is None
    noisy = report.Point("tokens", 64, "peft LoRA", 1.0, 39.0, 25.0, 89.0)
    assert "3.6x apart" in report.unsettled(noisy)
    unordered = report.Point("tokens", 64, "fastpeft LoRA[triton]", 1.0, 1.2, 1.1, 1.3, reference_ratio=0.97,
                             reference_low=0.9, reference_high=1.04)
    assert ("faster than peft LoRA in a quarter of the rounds or more, slower in as many (0.90-1.04)"
            in report.unsettled(unordered))
    tie = report.Point("tokens", 64, "fastpeft LoRA", 1.0, 1.2, 1.1, 1.3, reference_ratio=1.0,
                       reference_low=1.0, reference_high=1.0)
    assert report.unsettled(tie)  # equal in every round: no order
    for name in (BASE, LIMIT):
        assert report.unsettled(report.Point("tokens", 64, name, 1.0, 0.5, 0.1, 9.0)) is None


def test_the_per_round_ratio_to_peft_is_taken_within_each_round():
    times = {BASE: [1.0, 2.0, 1.0], "fastpeft LoRA": [1.1, 2.4, 1.2], "peft LoRA": [1.2, 2.2, 1.3]}
    points = {p.candidate: p for p in report._points("tokens", 8, times, times)}
    mine = points["fastpeft LoRA"]
    assert mine.reference_ratio == pytest.approx(1.2 / 1.3)
    paired = sorted([1.1 / 1.2, 2.4 / 2.2, 1.2 / 1.3])  # each round's own ratio, then their quartiles
    quartiles = (paired[0] + (paired[1] - paired[0]) / 2, paired[1] + (paired[2] - paired[1]) / 2)
    assert (mine.reference_low, mine.reference_high) == pytest.approx(quartiles)
    assert points["peft LoRA"].reference_low is None


def test_the_ratio_axis_is_logarithmic_and_one_outlier_does_not_squash_the_rest():
    ax = report.figure(synthetic(TOKENS, noisy={("fastpeft QLoRA", 64)}), TOKENS).axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low <= 0.5 and high >= 89.0  # every bar and the limit inside the axes
    # 1x to 2x takes a tenth of the height or more (a linear axis to 89x would leave it about a ninetieth)
    assert math.log(2) / math.log(high / low) > 0.1
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_gid() == "base"] == [1.0]


def test_the_legend_tells_fastpeft_from_its_equivalent():
    for sweep in (TOKENS, DROPOUT):
        ax = report.figure(synthetic(sweep), sweep).axes[0]
        handles = {h.get_label(): h for h in ax.get_legend().legend_handles}
        lines = {line.get_gid(): line for line in ax.get_lines()}
        for mine, theirs, _, _ in PAIRS:
            for drawn in (handles, lines):  # the legend shows what the curves are drawn with
                a, b = drawn[mine], drawn[theirs]
                assert a.get_markerfacecolor() != b.get_markerfacecolor()  # filled against hollow
                assert b.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))
                if sweep is TOKENS:
                    assert (a.get_linestyle(), b.get_linestyle()) == ("-", "--")
            assert handles[mine].get_linestyle() == lines[mine].get_linestyle()
            assert handles[theirs].get_linestyle() == lines[theirs].get_linestyle()


def test_the_dropout_sweep_joins_no_categories():
    ax = report.figure(synthetic(DROPOUT), DROPOUT).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["dropout off", "dropout on (p = 0.1)"]
    drawn = 0
    for line in ax.get_lines():
        if line.get_gid() == "base" or line.get_linestyle() in ("None", "none", "", " "):
            continue
        drawn += 1
        assert len({round(x) for x in line.get_xdata()}) == 1, line.get_gid()
    for collection in ax.collections:  # the limit's segments and the error bars
        for segment in collection.get_segments() if hasattr(collection, "get_segments") else ():
            assert len({round(x) for x, _ in segment}) == 1
    assert drawn == 0 and any(c.get_gid() == LIMIT for c in ax.collections)
    for line in ax.get_lines():  # side by side: no two candidates at one spot
        if line.get_gid() not in ("base", None):
            assert len(line.get_xdata()) == 2 and all(abs(x - round(x)) < 0.4 for x in line.get_xdata())
    xs = [line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() not in ("base", None)]
    assert len(set(xs)) == len(xs)


def unsettled_marks(ax):
    marked = [c for c in ax.collections if c.get_gid() == "unsettled"]
    return {(round(float(x), 6), round(float(y), 6)) for c in marked for x, y in c.get_offsets()}


def test_the_unsettled_mark_sits_on_the_unsettled_points_only():
    points = synthetic(TOKENS, noisy={("peft+bnb QLoRA", 64)}, unordered={("fastpeft LoRA", 2048)})
    ax = report.figure(points, TOKENS).axes[0]
    assert unsettled_marks(ax) == {(64.0, 39.0), (2048.0, 1.15)}
    assert any(h.get_label().startswith("! unsettled: 2") for h in ax.get_legend().legend_handles)
    assert ax.get_title().endswith("\n! 2 of 24 timed points unsettled (ringed): see the page")
    ax = report.figure(synthetic(TOKENS), TOKENS).axes[0]
    assert unsettled_marks(ax) == set()
    assert not any("unsettled" in h.get_label() for h in ax.get_legend().legend_handles)
    assert ax.get_title() == TOKENS.title
    ax = report.figure(synthetic(DROPOUT, noisy={("fastpeft DoRA", 0.1)}), DROPOUT).axes[0]
    (x, y), = unsettled_marks(ax)
    dora = next(line for line in ax.get_lines() if line.get_gid() == "fastpeft DoRA")
    assert (x, y) == (round(float(dora.get_xdata()[1]), 6), 39.0) and round(x) == 1


def test_the_memory_axis_is_logarithmic_where_it_spans_decades():
    points = synthetic(Sweep("tokens", "M", (1, 64, 4096), "t", dict(K=64, N=64, r=4)))
    ax = report.figure(points, TOKENS, memory=True).axes[0]
    assert ax.get_yscale() == "log" and LIMIT not in {line.get_gid() for line in ax.get_lines()}
    ax = report.figure(synthetic(Sweep("tokens", "M", (8, 16, 32), "t", dict(K=64, N=64, r=4))), TOKENS,
                       memory=True).axes[0]
    assert ax.get_yscale() == "linear"


def test_the_page_warns_of_unsettled_points(tmp_path):
    sweeps = (TOKENS, DROPOUT)
    peaks = report.Peaks(1.0, 10.0)
    points = synthetic(TOKENS, noisy={("fastpeft QLoRA", 64)}) + synthetic(DROPOUT, unordered={("fastpeft LoRA", 0.1)})
    text = report.write_report(points, peaks, sweeps, tmp_path / "noisy", "cpu", torch.float32, 3).read_text()
    timed = sum(p.candidate not in (BASE, LIMIT) for p in points)
    assert f"**Warning: 2 of {timed} measured points are unsettled in this run**" in text
    assert ("| 64 | fastpeft QLoRA | 39.000 | 39.00 | 25.00-89.00 | 21.67 (21.02-22.32) | "
            "⚠ rounds 3.6x apart") in text
    assert "⚠ faster than peft LoRA in a quarter of the rounds or more, slower in as many (0.90-1.10) |" in text
    assert "⚠ Unsettled here: fastpeft QLoRA at M = 64." in text
    assert "⚠ Unsettled here: fastpeft LoRA at dropout = 0.1." in text
    assert text.count("| ⚠ ") == 2
    text = report.write_report(synthetic(TOKENS), peaks, sweeps, tmp_path / "tight", "cpu", torch.float32,
                               3).read_text()
    assert "**Warning" not in text and "| ⚠ " not in text and "Unsettled here" not in text
    assert "**Unsettled**" in text  # the definition is on every page


# ----------------------------------------------------------------------------------------------------------
# The page's versions: absent told from broken
# ----------------------------------------------------------------------------------------------------------

def test_a_broken_install_is_not_called_absent(tmp_path, monkeypatch):
    packages = {"fp_broken_import": "from os import no_such_name\n",
                "fp_missing_dependency": "import fp_no_such_dependency\n",
                "fp_raises": "raise RuntimeError('no driver\\nfound')\n", "fp_unversioned": "",
                "peft": "from os import no_such_name\n"}
    for name, body in packages.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.delitem(sys.modules, name)  # (put back after the test)
    try:
        assert report._version_of("fp_no_such_module") == "not installed"
        assert report._version_of("fp_no_such_module.sub") == "not installed"
        assert report._version_of("fp_broken_import").startswith(
            "broken: ImportError: cannot import name 'no_such_name' from 'os'")
        assert report._version_of("fp_missing_dependency") == (
            "broken: ModuleNotFoundError: No module named 'fp_no_such_dependency'")
        assert report._version_of("fp_raises") == "broken: RuntimeError: no driver found"
        assert report._version_of("fp_unversioned") == "version unknown"
        assert report._version_of("pytest") == pytest.__version__
        versions = report._versions()
        assert versions["peft"].startswith("broken: ImportError: cannot import name 'no_such_name'")
        text = report.write_report(synthetic(TOKENS), report.Peaks(1.0, 10.0), (TOKENS,), tmp_path / "out", "cpu",
                                   torch.float32, 3).read_text()
        assert "peft broken: ImportError: cannot import name 'no_such_name'" in text
    finally:
        sys.modules.pop("fp_unversioned", None)


# ----------------------------------------------------------------------------------------------------------
# The page's commit: clean or changed whatever --out is
# ----------------------------------------------------------------------------------------------------------

def git(root, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                           *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A committed git repository (src/a.py, results/old/report.md), beside a folder outside it (elsewhere/)."""
    root = tmp_path / "repo"
    (root / "src").mkdir(parents=True)
    (root / "results" / "old").mkdir(parents=True)
    (root / "src" / "a.py").write_text("a = 1\n")
    (root / "results" / "old" / "report.md").write_text("old\n")
    (tmp_path / "elsewhere").mkdir()
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root


def out_case(case, root, monkeypatch):
    """``--out`` as the report command gets it in ``case``, after the report's files are written."""
    outside = root.parent / "elsewhere"
    if case == "none":
        return None
    if case == "outside":
        (outside / "report.md").write_text("new\n")
        return outside
    if case == "outside, not made yet":
        return outside / "later" / "deeper"
    if case == "outside, relative":
        monkeypatch.chdir(root / "src")
        return "../../elsewhere"
    if case == "inside, new files":
        (root / "results" / "new").mkdir()
        (root / "results" / "new" / "report.md").write_text("new\n")
        return root / "results" / "new"
    if case == "inside, over a committed report":
        (root / "results" / "old" / "report.md").write_text("regenerated\n")
        return root / "results" / "old"
    if case == "inside, not made yet":
        return root / "results" / "later"
    if case == "inside, relative":
        (root / "results" / "old" / "report.md").write_text("regenerated\n")
        monkeypatch.chdir(root)
        return "results/old"
    if case == "symlink outside to inside":
        (root / "results" / "old" / "report.md").write_text("regenerated\n")
        (outside / "link").symlink_to(root / "results" / "old")
        return outside / "link"
    if case == "symlink inside to outside":
        (root / "results" / "link").symlink_to(outside)
        (outside / "report.md").write_text("new\n")
        return root / "results" / "link"
    if case == "the tree's top":  # --out . from the top: the report's folder is the whole tree, which excuses nothing
        (root / "report.md").write_text("new\n")
        monkeypatch.chdir(root)
        return "."
    if case == "above the tree":
        return root.parent
    raise AssertionError(case)


CASES = ("none", "outside", "outside, not made yet", "outside, relative", "inside, new files",
         "inside, over a committed report", "inside, not made yet", "inside, relative", "symlink outside to inside",
         "symlink inside to outside", "the tree's top", "above the tree")


@pytest.mark.parametrize("case", CASES)
def test_a_clean_tree_is_clean_wherever_the_report_goes(case, repo, monkeypatch):
    head = git(repo, "rev-parse", "--short", "HEAD")
    assert report._commit(out_case(case, repo, monkeypatch), tree=repo) == head


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("change", ("edited", "staged"))
def test_a_changed_tree_is_marked_wherever_the_report_goes(case, change, repo, monkeypatch):
    head = git(repo, "rev-parse", "--short", "HEAD")
    out = out_case(case, repo, monkeypatch)
    (repo / "src" / "a.py").write_text("a = 2\n")
    if change == "staged":
        git(repo, "add", "src/a.py")
    assert report._commit(out, tree=repo) == f"{head} (+ changes to tracked files)"


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("inside") or c == "symlink outside to inside"])
def test_a_file_moved_into_the_report_folder_is_a_change_where_it_left(case, repo, monkeypatch):
    head = git(repo, "rev-parse", "--short", "HEAD")
    out = Path(out_case(case, repo, monkeypatch)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    git(repo, "mv", "src/a.py", str(out / "a.py"))
    assert report._commit(out, tree=repo) == f"{head} (+ changes to tracked files)"


def test_a_folder_named_like_a_prefix_excludes_nothing_else(repo):
    (repo / "src" / "a.py").write_text("a = 2\n")
    assert report._commit(repo / "sr", tree=repo).endswith("(+ changes to tracked files)")


def test_git_failing_is_not_taken_for_changes(repo, tmp_path):
    head = git(repo, "rev-parse", "--short", "HEAD")
    (repo / ".git" / "index").write_text("not an index")  # rev-parse still names HEAD; diff cannot read the index
    got = report._commit(tmp_path / "elsewhere", tree=repo)
    assert got.startswith(f"{head} (changes unknown: ") and "index" in got and "changes to tracked" not in got
    (tmp_path / "plain").mkdir()
    assert report._commit(tmp_path / "elsewhere", tree=tmp_path / "plain") == "unknown"  # no checkout at all


def test_changes_anywhere_in_the_repository_count_under_diff_relative(repo, tmp_path):
    """git's diff.relative would limit the diff to the directory git runs in, and name paths from there."""
    head = git(repo, "rev-parse", "--short", "HEAD")
    git(repo, "config", "diff.relative", "true")
    (repo / "results" / "old" / "report.md").write_text("regenerated\n")
    assert report._commit(repo / "results" / "old", tree=repo / "src") == head
    assert report._commit(tmp_path / "elsewhere", tree=repo / "src") == f"{head} (+ changes to tracked files)"


def test_the_order_against_peft_is_judged_on_the_middle_half_of_the_rounds():
    """One disturbed round neither unsettles a point nor reverses fastpeft's order against PEFT; an order that flips
    in a quarter of the rounds or more is not established."""
    times = {BASE: [1.0] * 8, "fastpeft LoRA": [1.1] * 7 + [3.0], "peft LoRA": [1.3] * 8}
    points = {p.candidate: p for p in report._points("tokens", 64, times, times)}
    lora = points["fastpeft LoRA"]
    assert (lora.low, lora.high) == pytest.approx((1.1, 3.0))  # the bars: the extremes
    assert (lora.middle_low, lora.middle_high) == pytest.approx((1.1, 1.1))  # the verdict: the middle half
    assert (lora.reference_low, lora.reference_high) == pytest.approx((1.1 / 1.3, 1.1 / 1.3))
    assert report.unsettled(lora) is None
    times["peft LoRA"] = [1.2] * 4 + [1.0] * 4  # fastpeft faster in half the rounds, slower in the other half
    lora = {p.candidate: p for p in report._points("tokens", 64, times, times)}["fastpeft LoRA"]
    assert lora.reference_low < 1 < lora.reference_high
    assert "faster than peft LoRA in a quarter of the rounds or more" in report.unsettled(lora)
