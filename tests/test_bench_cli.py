"""The main job's command line runs end to end (tiny shapes) and prints its ratio tables once, each with its legend,
with progress on stderr, and says why a comparison is missing; it refuses bad arguments and settings before it
measures anything."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import refused_by_cli

from fastpeft.__main__ import BENCH_SECTIONS, main
from fastpeft.benchmarks import timing


def counting_progress():
    """A ``progress`` for the ``run_*`` functions that records the total it is started on and the ticks it gets."""
    seen = {"total": None, "ticks": 0}

    def start(total):
        seen["total"] = total

        def tick():
            seen["ticks"] += 1
        return tick
    return seen, start


def test_bench_command_prints_every_table(capsys, tmp_path):
    out_file = tmp_path / "results.md"
    assert main(["bench", "--shape", "64,40,48,4", "--rounds", "2", "--dropout", "0.1", "--quick",
                 "--markdown", str(out_file)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "| M=64 K=40 N=48 r=4 | 0.1 | fwd+bwd | fastpeft[torch] |" in printed
    assert "| M=64 K=40 N=48 r=4 | 0.1 | fwd | peft |" in printed
    # The base layer has no dropout: its rows say so instead of repeating the LoRA setting.
    assert "| M=64 K=40 N=48 r=4 | - | fwd | nn.Linear |" in printed and "0.1 | fwd | nn.Linear" not in printed
    assert "dropout=0.1  fwd      nn.Linear" not in printed
    # Adapters have no dropout column at all.
    assert "| M=2048 d=1024 m=64 | fwd+bwd | fastpeft[torch] |" in printed
    assert "| M=1 K=16 N=16 r=4 | fwd, no grad | fastpeft[torch] |" in printed
    assert "| M=64 K=40 N=48 r=4 | 0.1 | fwd+bwd | fastpeft DoRA[torch] |" in printed
    assert "| M=64 K=40 N=48 r=4 | 0.1 | fastpeft DoRA[torch] |" in printed  # its saved-for-backward row
    assert "| 16 | fwd, no grad | fastpeft mixed |" in printed
    assert "| 4 | fwd+bwd | fastpeft 4 adapters together |" in printed
    assert "| M=64 K=40 N=48 r=4 | 0.1 | fwd+bwd | fastpeft QLoRA[torch] |" in printed
    assert "| NF4, double-quantised absmax |" in printed
    assert "time / base: time relative to nn.Linear" in printed
    # Results are printed once, as tables: each title once, and no result outside a table row.
    for title in BENCH_SECTIONS.values():
        assert printed.count(f"\n{title}\n") == 1, title
    results = [line for line in printed.splitlines()
               if "M=64 K=40 N=48 r=4" in line or "fastpeft mixed" in line or "fastpeft 4 adapters" in line]
    assert results and all(line.startswith("| ") for line in results), results
    # Every table is followed by its legend.
    blocks = printed.split("\n\n")
    tables = [i for i, block in enumerate(blocks) if block.startswith("|")]
    assert len(tables) == 12  # DoRA and (IA)³ add what each keeps for backward, QLoRA the base weight's bytes
    assert "| M=64 K=40 N=48, input scale | fwd+bwd | fastpeft (IA)³[torch] |" in printed
    assert "| M=64 K=40 N=48, output scale | fastpeft (IA)³[torch] |" in printed  # its saved-for-backward row
    assert "| Llama, hidden 256, 2 layers, seq 128, batch 2 | peft + fastpeft.fuse |" in printed
    assert "| K=N=256, 4×r16, svd | fastpeft |" in printed
    for i in tables:
        assert blocks[i + 1].startswith("Lower is better"), blocks[i]
    # Progress goes to stderr, one bar (or line) per section, numbered.
    for i, title in enumerate(BENCH_SECTIONS.values(), 1):
        assert f"[{i}/{len(BENCH_SECTIONS)}] {title}" in captured.err
    written = out_file.read_text()
    assert "## LoRA linear" in written and "## Bottleneck adapter" in written and "Lower is better" in written
    assert "## DoRA" in written and "time / peft DoRA" in written
    assert "## Host overhead and the token sweep" in written
    assert "## QLoRA (LoRA over an NF4 base)" in written


def test_bench_command_keeps_stderr_clean(tmp_path):
    """The CPU memory measurement runs torch's profiler, whose native layer prints notices on fd 2."""
    done = subprocess.run([sys.executable, "-m", "fastpeft", "bench", "--shape", "32,24,16,2", "--rounds", "1",
                           "--dropout", "0", "--only", "lora"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "USDT" not in done.stderr and "profiler_st" not in done.stderr, done.stderr
    assert "| M=32 K=24 N=16 r=2 |" in done.stdout


def test_the_overhead_table_holds_every_candidate_and_its_measured_ratios():
    seen, progress = counting_progress()
    results = timing.run_overhead(rounds=2, tokens=(1, 4), progress=progress)
    cases = {(r.shape, r.mode) for r in results}
    assert cases == {(timing.OVERHEAD_SHAPE, mode) for mode in timing.OVERHEAD_MODES} | {
        (timing.Shape(m, 1024, 1024, 16), "fwd+bwd") for m in (1, 4)}
    candidates = {"nn.Linear", "fastpeft[torch]"} | ({"peft"} if timing.peft_available() else set())
    for case in cases:
        assert {r.candidate for r in results if (r.shape, r.mode) == case} == candidates
    assert all(r.us > 0 for r in results)
    assert seen == {"total": len(cases), "ticks": len(cases)}
    table = timing.format_overhead_table(results)
    for r in results:
        row = next(line for line in table.splitlines()
                   if line.startswith(f"| {r.shape} | {r.mode} | {r.candidate} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        base = next(b for b in results if (b.shape, b.mode, b.candidate) == (r.shape, r.mode, "nn.Linear"))
        assert cells[3] == f"{r.us:.1f}" and cells[4] == f"{r.us / base.us:.2f}"
        if "peft" in candidates:
            ref = next(b for b in results if (b.shape, b.mode, b.candidate) == (r.shape, r.mode, "peft"))
            assert cells[5] == f"{r.us / ref.us:.2f}"


def test_the_dora_tables_hold_every_candidate_and_ratios_of_their_medians():
    shape = timing.Shape(96, 40, 48, 4)
    seen, progress = counting_progress()
    results, saved = timing.run_dora([shape], dropouts=(0.0, 0.1), rounds=3, progress=progress)
    assert seen == {"total": 2 * len(timing.MODES), "ticks": 2 * len(timing.MODES)}
    candidates = {"nn.Linear", "fastpeft LoRA[torch]", "fastpeft DoRA[torch]"}
    candidates |= {timing.DORA_REFERENCE} if timing.peft_available() else set()
    for dropout in (0.0, 0.1):
        for mode in timing.MODES:
            assert {r.candidate for r in results if (r.dropout, r.mode) == (dropout, mode)} == candidates
        assert {r.candidate for r in saved if r.dropout == dropout} == candidates
    kept = {(r.dropout, r.candidate): r.saved_mb for r in saved}
    # DoRA keeps LoRA's tensors plus the unscaled product (M×N fp32) and O(N); the base keeps only its weight.
    for dropout in (0.0, 0.1):
        lora, dora = kept[(dropout, "fastpeft LoRA[torch]")], kept[(dropout, "fastpeft DoRA[torch]")]
        assert lora < dora <= lora + (96 * 48 * 4 + 64 * 48) / 2**20
    assert kept[(0.0, "nn.Linear")] == 48 * 40 * 4 / 2**20
    table = timing.format_table(results, reference=timing.DORA_REFERENCE)
    rows = table.splitlines()
    for i, r in enumerate(results):  # the table lists the results in order, one row each
        cells = [c.strip() for c in rows[i + 2].strip("|").split("|")]
        assert cells[:4] == [str(r.shape), "-" if r.candidate == "nn.Linear" else f"{r.dropout:g}", r.mode,
                             r.candidate]
        base = next(b for b in results if (b.dropout, b.mode, b.candidate) == (r.dropout, r.mode, "nn.Linear"))
        assert cells[4] == f"{r.ms:.3f}" and cells[7] == f"{r.ms / base.ms:.2f}"
        if timing.peft_available():
            ref = next(b for b in results if (b.dropout, b.mode, b.candidate) == (r.dropout, r.mode,
                                                                                   timing.DORA_REFERENCE))
            assert cells[8] == f"{r.ms / ref.ms:.2f}"
    saved_table = timing.format_saved_table(saved)
    assert all(f"| {r.candidate} | {r.saved_mb:.1f} |" in saved_table for r in saved)


def test_the_ia3_tables_hold_every_candidate_and_what_each_keeps():
    from fastpeft.benchmarks import ia3
    shapes = [ia3.Ia3Shape(96, 40, 48, False), ia3.Ia3Shape(96, 40, 48, True)]
    seen, progress = counting_progress()
    results, saved = ia3.run_ia3(shapes, rounds=2, progress=progress)
    assert seen == {"total": 2 * len(timing.MODES), "ticks": 2 * len(timing.MODES)}
    candidates = {"nn.Linear", "fastpeft (IA)³[torch]"} | ({ia3.IA3_REFERENCE} if timing.peft_available() else set())
    for shape in shapes:
        for mode in timing.MODES:
            assert {r.candidate for r in results if (r.shape, r.mode) == (shape, mode)} == candidates
    kept = {(r.shape.feedforward, r.candidate): r.saved_mb for r in saved}
    weight = 48 * 40 * 4 / 2**20
    # one activation besides W: the unscaled output (output scale) or x (input scale), as PEFT keeps
    assert kept[(False, "fastpeft (IA)³[torch]")] == weight + 96 * 48 * 4 / 2**20 + 48 * 4 / 2**20
    assert kept[(True, "fastpeft (IA)³[torch]")] == weight + 96 * 40 * 4 / 2**20 + 40 * 4 / 2**20
    if timing.peft_available():
        for ff in (False, True):
            assert kept[(ff, "fastpeft (IA)³[torch]")] <= kept[(ff, ia3.IA3_REFERENCE)]
    table = timing.format_saved_table(saved, reference=ia3.IA3_REFERENCE)
    assert "| M=96 K=40 N=48, output scale | fastpeft (IA)³[torch] |" in table and "| dropout |" not in table


def test_the_qlora_table_holds_every_candidate_and_ratios_of_their_medians():
    shape = timing.Shape(96, 64, 48, 4)
    results, sizes = timing.run_nf4([shape], dropouts=(0.0,), rounds=3)
    candidates = {"nn.Linear", "fastpeft LoRA[torch]", "fastpeft QLoRA[torch]"}
    if timing.peft_available() and timing.bnb_available():
        candidates |= {"bnb Linear4bit", timing.NF4_REFERENCE}
    for mode in timing.MODES:
        assert {r.candidate for r in results if r.mode == mode} == candidates
    table = timing.format_table(results, reference=timing.NF4_REFERENCE)
    rows = table.splitlines()
    has_ref = timing.NF4_REFERENCE in candidates
    for i, r in enumerate(results):
        cells = [c.strip() for c in rows[i + 2].strip("|").split("|")]
        assert cells[3] == r.candidate and cells[4] == f"{r.ms:.3f}"
        base = next(b for b in results if (b.mode, b.candidate) == (r.mode, "nn.Linear"))
        assert cells[7] == f"{r.ms / base.ms:.2f}"
        if has_ref:
            ref = next(b for b in results if (b.mode, b.candidate) == (r.mode, timing.NF4_REFERENCE))
            assert cells[8] == f"{r.ms / ref.ms:.2f}"
    mib = {s.candidate: s.mib for s in sizes}
    # codes, one uint8 absmax per 64 weights, the 256-entry code book, one scale per 256 absmaxes, the offset
    nf4_bytes = 64 * 48 // 2 + 64 * 48 // 64 + 256 * 4 + 4 + 4
    assert mib["bf16"] == 64 * 48 * 2 / 2**20 and mib["NF4, double-quantised absmax"] == nf4_bytes / 2**20
    assert "| NF4, double-quantised absmax |" in timing.format_weight_bytes(sizes)


def test_the_mixed_batch_table_holds_every_candidate_and_ratios_of_their_medians():
    seen, progress = counting_progress()
    results = timing.run_mixed((1, 4), K=64, N=48, r=4, rounds=2, progress=progress)
    assert seen == {"total": 3, "ticks": 3}  # serving at each count, then training
    serving = {"nn.Linear", "fastpeft mixed"} | ({timing.MIXED_REFERENCE} if timing.peft_available() else set())
    for n in (1, 4):
        assert {r.candidate for r in results if (r.adapters, r.mode) == (n, "fwd, no grad")} == serving
    training = {r.candidate: r for r in results if r.mode == "fwd+bwd"}
    assert set(training) == {"fastpeft 4 adapters together", "fastpeft 4 adapters one after the other"}
    table = timing.format_mixed_table(results)
    for r in results:
        row = next(line for line in table.splitlines()
                   if line.startswith(f"| {r.adapters} | {r.mode} | {r.candidate} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == f"{r.ms:.3f}"
        if r.mode == "fwd, no grad":
            base = next(b for b in results if (b.adapters, b.mode, b.candidate) == (r.adapters, r.mode, "nn.Linear"))
            assert cells[4] == f"{r.ms / base.ms:.2f}"
        else:
            ref = training["fastpeft 4 adapters one after the other"]
            assert cells[5] == f"{r.ms / ref.ms:.2f}"


def test_without_tqdm_progress_is_plain_lines(capsys, monkeypatch):
    timing.peft_available()  # its first import needs tqdm (through huggingface_hub)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["bench", "--shape", "32,24,16,2", "--rounds", "1", "--dropout", "0", "--only", "lora"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert err == ["[1/1] LoRA linear: 2 cases", "[1/1] LoRA linear: 1/2 cases done",
                   "[1/1] LoRA linear: 2/2 cases done"]


def unimportable(monkeypatch, tmp_path, name: str, source: str) -> None:
    """Make ``import name`` run ``source`` as the package's code (a broken install or a shadowed dependency),
    for this test only."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(source)
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_import_problem_tells_a_missing_package_from_one_whose_import_fails(monkeypatch, tmp_path):
    assert timing.import_problem("json") is None
    assert timing.import_problem("fastpeft_absent_package") == (
        "fastpeft_absent_package is not installed (pip install 'fastpeft[bench]')")
    monkeypatch.setitem(sys.modules, "fastpeft_blocked_package", None)  # how Python marks a module as unimportable
    assert "fastpeft_blocked_package is not installed" in timing.import_problem("fastpeft_blocked_package")
    # A missing dependency is no missing package: its ModuleNotFoundError names the dependency.
    unimportable(monkeypatch, tmp_path, "fastpeft_broken_a", "import fastpeft_missing_dependency\n")
    assert timing.import_problem("fastpeft_broken_a") == (
        "`import fastpeft_broken_a` failed: ModuleNotFoundError: No module named 'fastpeft_missing_dependency'")
    unimportable(monkeypatch, tmp_path, "fastpeft_broken_b", "raise RuntimeError('wrong CUDA runtime')\n")
    assert timing.import_problem("fastpeft_broken_b") == (
        "`import fastpeft_broken_b` failed: RuntimeError: wrong CUDA runtime")


def test_bench_says_why_peft_and_bitsandbytes_are_not_compared(capsys, monkeypatch, tmp_path):
    unimportable(monkeypatch, tmp_path, "peft", "raise ImportError(\"cannot import name 'X' from 'Y'\")\n")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert not timing.peft_available() and not timing.bnb_available()
    assert main(["bench", "--shape", "32,64,16,2", "--rounds", "1", "--dropout", "0", "--only", "qlora"]) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if line.startswith("note:")]
    assert notes == ["note: HF PEFT is not compared: `import peft` failed: ImportError: cannot import name 'X' from "
                     "'Y'",
                     "note: PEFT over bitsandbytes' 4-bit layers is not compared: bitsandbytes is not installed "
                     "(pip install 'fastpeft[bench]')"]
    assert "| fastpeft QLoRA[torch] |" in printed
    assert "peft+bnb QLoRA |" not in printed and "bnb Linear4bit |" not in printed


# A bench run that measures little, for the refusals below: each argument it is given after these replaces the one here
# (--dropout adds to it).
TINY_BENCH = ["bench", "--only", "lora", "--shape", "8,8,8,2", "--rounds", "1", "--dropout", "0"]


@pytest.mark.parametrize("args,message", [
    (["--rounds", "0"], "argument --rounds: expected a positive integer, got '0'"),
    (["--rounds", "-1"], "argument --rounds: expected a positive integer, got '-1'"),
    (["--dropout", "1.5"], "argument --dropout: expected a probability in [0, 1), got '1.5'"),
    (["--dropout", "1"], "argument --dropout: expected a probability in [0, 1), got '1'"),
    (["--dropout", "-0.1"], "argument --dropout: expected a probability in [0, 1), got '-0.1'"),
    (["--dropout", "nan"], "argument --dropout: expected a probability in [0, 1), got 'nan'"),
    (["--device", "bogus"], "argument --device: expected cpu or cuda, got 'bogus'"),
    (["--device", "cuda"], "argument --device: cuda, but torch sees no CUDA GPU"),
])
def test_bench_refuses_a_bad_argument_before_measuring(capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    err = refused_by_cli(capsys, *TINY_BENCH, *args)
    assert err.startswith("usage: python -m fastpeft bench") and message in err, err


def test_bench_refuses_a_gpu_torch_does_not_see(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exited:
        main([*TINY_BENCH, "--device", "cuda:1"])
    assert exited.value.code == 2
    assert "argument --device: cuda:1, but torch sees 1 CUDA GPU(s), cuda:0 to cuda:0" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["missing/results.md", "a-folder", "a-file/results.md", "/proc/version"])
def test_bench_refuses_a_markdown_file_it_cannot_append_to(capsys, where, tmp_path):
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("")
    if where.startswith("/") and not os.path.exists(where):
        pytest.skip(f"no {where} here")
    path = where if where.startswith("/") else str(tmp_path / where)
    err = refused_by_cli(capsys, *TINY_BENCH, "--markdown", path)
    assert err.startswith("usage: python -m fastpeft bench"), err
    assert f"argument --markdown: cannot append to {path}: " in err, err
    assert sorted(os.listdir(tmp_path)) == ["a-file", "a-folder"]


@pytest.mark.parametrize("command", [TINY_BENCH, ["report", "--quick", "--rounds", "1"]])
def test_bench_and_report_name_a_bad_backend_in_the_environment_before_measuring(capsys, monkeypatch, command,
                                                                                 tmp_path):
    """As ``info`` does (tests/test_errors.py): one line, before anything runs."""
    out = tmp_path / "report"
    monkeypatch.setenv("FASTPEFT_BACKEND", "bogus")
    err = refused_by_cli(capsys, *command, *(["--out", str(out)] if command[0] == "report" else []))
    assert err == "error: FASTPEFT_BACKEND must be one of auto, torch, triton, cuda; got 'bogus'\n"
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("command", [[*TINY_BENCH, "--only", "dora"], ["report", "--quick", "--rounds", "1"]])
def test_bench_and_report_refuse_a_backend_the_environment_names_that_cannot_run_here(capsys, monkeypatch, command,
                                                                                       tmp_path):
    out = tmp_path / "report"
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    err = refused_by_cli(capsys, *command, *(["--out", str(out)] if command[0] == "report" else []))
    assert err.startswith("error: FASTPEFT_BACKEND=cuda, but the cuda backend cannot run here: ") and \
        "no CUDA GPU" in err and err.count("\n") == 1, err
    assert not out.exists()
