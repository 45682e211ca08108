"""The scaling report: every sweep's candidates side by side, ratios computed from the measured medians, the limit
line present and called an estimate, the plots written, and the command line's quick report."""
import statistics
import subprocess
import sys
from pathlib import Path

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
    raise AssertionError(case)


CASES = ("none", "outside", "outside, not made yet", "outside, relative", "inside, new files",
         "inside, over a committed report", "inside, not made yet", "inside, relative", "symlink outside to inside",
         "symlink inside to outside")


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
