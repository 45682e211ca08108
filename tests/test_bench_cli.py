"""The main job's command line runs end to end (tiny shapes) and prints its ratio tables."""
from fastpeft.__main__ import main


def test_bench_command_prints_both_tables(capsys, tmp_path):
    out_file = tmp_path / "results.md"
    assert main(["bench", "--shape", "64,40,48,4", "--rounds", "2", "--dropout", "0.1", "--quick",
                 "--markdown", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "| M=64 K=40 N=48 r=4 | 0.1 | fwd+bwd | fastpeft[torch] |" in printed
    assert "| M=64 K=40 N=48 r=4 | 0.1 | fwd | peft |" in printed
    assert "| M=2048 d=1024 m=64 | 0 | fwd+bwd | fastpeft[torch] |" in printed
    written = out_file.read_text()
    assert "## LoRA linear" in written and "## Bottleneck adapter" in written
