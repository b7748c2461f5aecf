"""scripts/bench_v3.py: the case command lines, and a dry run of the matrix on the tiny model on the CPU."""

import bench_v3
import pytest


def test_case_commands():
    args = bench_v3.parse_args(["--logs", "x", "--nproc", "4", "--num-layers", "20", "--", "--cuda-graph-max-bs", "64"])
    cmd = bench_v3.case_command(args, "torch:eplb-skewed", "r.jsonl")
    assert cmd[:4] == ["torchrun", "--standalone", "--nproc-per-node=4", "-m"]
    flag = {a: b for a, b in zip(cmd, cmd[1:])}
    assert flag["--moe-a2a-backend"] == "torch" and flag["--ep-size"] == "4" and flag["--num-prompts"] == "1024"
    assert flag["--dataset-name"] == "skewed" and flag["--ep-num-redundant-experts"] == "32"
    assert flag["--fp8-weights"] == "on" and flag["--cuda-graph-max-bs"] == "64"
    plain = bench_v3.case_command(args, "2000-100", "r.jsonl")
    assert plain[plain.index("--moe-a2a-backend") + 1] == "deepep"
    with pytest.raises(SystemExit, match="unknown case 'nope-1'"):
        bench_v3.case_command(args, "nope-1", "r.jsonl")


def test_dry_run_on_the_tiny_model(tmp_path, capsys):
    argv = ["--logs", str(tmp_path), "--model", "tiny", "--device", "cpu", "--num-layers", "2", "--cases",
            "1000-1000", "--prompts-per-gpu", "3", "--max-running-requests", "3", "--",
            "--random-input-len", "12", "--random-output-len", "4"]
    assert bench_v3.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    row = next(line.split(" | ") for line in table if line.startswith("1000-1000 |"))
    assert row[1] == "12/4 x3" and float(row[2]) > 0 and "atte" in row[7], table
