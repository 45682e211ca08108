"""The main job's command line runs end to end (tiny shapes) and prints its ratio tables, cleanly."""
import subprocess
import sys

from fastpeft.__main__ import main


def test_bench_command_prints_both_tables(capsys, tmp_path):
    out_file = tmp_path / "results.md"
    assert main(["bench", "--shape", "64,40,48,4", "--rounds", "2", "--dropout", "0.1", "--quick",
                 "--markdown", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "| M=64 K=40 N=48 r=4 | 0.1 | fwd+bwd | fastpeft[torch] |" in printed
    assert "| M=64 K=40 N=48 r=4 | 0.1 | fwd | peft |" in printed
    # The base layer has no dropout: its rows say so instead of repeating the LoRA setting.
    assert "| M=64 K=40 N=48 r=4 | - | fwd | nn.Linear |" in printed and "0.1 | fwd | nn.Linear" not in printed
    assert "dropout=0.1  fwd      nn.Linear" not in printed
    # Adapters have no dropout column at all.
    assert "| M=2048 d=1024 m=64 | fwd+bwd | fastpeft[torch] |" in printed
    assert printed.count("Lower is better") == 2 and "time / base: time relative to nn.Linear" in printed
    written = out_file.read_text()
    assert "## LoRA linear" in written and "## Bottleneck adapter" in written and "Lower is better" in written


def test_bench_command_keeps_stderr_clean(tmp_path):
    """The CPU memory measurement runs torch's profiler, whose native layer prints notices on fd 2."""
    done = subprocess.run([sys.executable, "-m", "fastpeft", "bench", "--shape", "32,24,16,2", "--rounds", "1",
                           "--dropout", "0", "--only", "lora"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "USDT" not in done.stderr and "profiler_st" not in done.stderr, done.stderr
    assert "| M=32 K=24 N=16 r=2 |" in done.stdout
