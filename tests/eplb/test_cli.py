"""`python -m eplb` end to end: plan, show, simulate, --plot; every bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eplb_loads import zipf_load

from engine.errors import run_cli
from engine.presets import tiny
from eplb.cli import main
from eplb.placement_file import read_placement
from eplb.stats import save_dump

ROOT = Path(__file__).resolve().parents[2]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Runs the CLI in this process as `python -m eplb` would; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def stats(tmp_path) -> Path:
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"logical_count": zipf_load(4, 16, 1.2, seed=0).to(torch.int64).tolist()}))
    return path


PLAN = ["--num-gpus", 4, "--num-nodes", 2, "--num-groups", 4, "--redundant", 4]


def test_plan_show_simulate(tmp_path, stats, capsys):
    out_path = tmp_path / "placement.json"
    code, out, err = run(["plan", "--stats", stats, *PLAN, "-o", out_path], capsys)
    assert code == 0 and err == ""
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["command"] == "plan" and summary["policy"] == "hierarchical"
    assert summary["layers"] == 4 and summary["slots"] == 20 and summary["output"] == str(out_path)
    assert summary["after_min"] >= summary["before_min"] and summary["after_mean"] > summary["before_mean"]
    assert "before" in out and "after" in out and "planned in" in out
    pf = read_placement(out_path)
    assert pf.inputs["num_gpus"] == 4 and pf.inputs["policy"] == "hierarchical" and pf.inputs["redundant"] == 4
    assert pf.placement.num_slots == 20

    code, out, _ = run(["show", out_path], capsys)
    assert code == 0 and "GPU 3:" in out and json.loads(out.splitlines()[-1])["kind"] == "placement"
    code, out, _ = run(["show", out_path, "--layer", 2], capsys)
    assert code == 0 and "layer 2:" in out and "layer 0:" not in out
    code, out, _ = run(["show", stats], capsys)
    shown = json.loads(out.splitlines()[-1])
    assert code == 0 and shown["kind"] == "json" and shown["layers"] == 4 and shown["experts"] == 16

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"logical_count": zipf_load(4, 16, 1.2, seed=5).to(torch.int64).tolist()}))
    code, out, _ = run(["simulate", "--stats", other, "--placement", out_path], capsys)
    result = json.loads(out.splitlines()[-1])
    assert code == 0 and {"trivial_mean", "placement_mean", "replanned_mean"} <= set(result)
    assert result["replanned_mean"] >= result["placement_mean"] - 0.05  # the plan for this load is a reference
    code, out, _ = run(["simulate", "--stats", stats, "--placement", out_path], capsys)
    same = json.loads(out.splitlines()[-1])
    assert abs(same["placement_mean"] - summary["after_mean"]) < 1e-6


def test_plan_reads_every_format(tmp_path, stats, capsys):
    counts = torch.tensor(json.loads(stats.read_text())["logical_count"])  # [L, E]
    dump = tmp_path / "load.safetensors"
    save_dump(dump, torch.stack([counts, counts]), "per_pass")
    pt = tmp_path / "sglang.pt"
    torch.save({"logical_count": counts.unsqueeze(0)}, pt)
    results = []
    for source in (stats, dump, pt):
        code, out, _ = run(["plan", "--stats", source, *PLAN, "-o", tmp_path / f"{source.stem}.out.json"], capsys)
        assert code == 0
        results.append(read_placement(tmp_path / f"{source.stem}.out.json").placement.phy2log)
    # Twice the counts of every expert is the same load shape: the same placement.
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    code, out, _ = run(["show", dump], capsys)
    assert code == 0 and "mode=per_pass" in out and json.loads(out.splitlines()[-1])["steps"] == 2


def test_plan_with_model_dir(tmp_path, capsys):
    cfg = tiny()  # 16 experts in 4 groups, 2 MoE layers
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg.to_official_dict()))
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"logical_count": zipf_load(2, 16, 1.0, seed=1).tolist()}))
    code, out, _ = run(["plan", "--stats", load, "--model", model, "--num-gpus", 4, "--num-nodes", 2,
                        "--redundant", 4, "-o", tmp_path / "p.json"], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["groups"] == 4
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"logical_count": [[1] * 16] * 3}))
    code, _, err = run(["plan", "--stats", wrong, "--model", model, "--num-gpus", 4, "-o", tmp_path / "q.json"],
                       capsys)
    assert code == 2 and "MoE layers" in err and not (tmp_path / "q.json").exists()


def test_plot_writes_png(tmp_path, stats, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    code, out, _ = run(["plan", "--stats", stats, *PLAN, "-o", tmp_path / "p.json", "--plot", png], capsys)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.splitlines()[-1])["plot"] == str(png)


def test_plot_without_matplotlib_exits_2_and_writes_nothing(tmp_path, stats, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, out, err = run(["plan", "--stats", stats, *PLAN, "-o", tmp_path / "p.json", "--plot",
                          tmp_path / "p.png"], capsys)
    assert code == 2 and "pip install matplotlib" in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load.json"]


def bad_case(tmp_path: Path, name: str) -> list:
    """argv tail for one bad input; files it needs are written under tmp_path."""
    def stats_file(content: str) -> Path:
        path = tmp_path / "bad.json"
        path.write_text(content)
        return path

    good = stats_file(json.dumps({"logical_count": [[1] * 16] * 2}))
    cases = {
        "wrong shape": ["--stats", stats_file('{"logical_count": [1, 2, 3, 4]}'), *PLAN],
        "ragged": ["--stats", stats_file('{"logical_count": [[1, 2], [3]]}'), *PLAN],
        "negative": ["--stats", stats_file('{"logical_count": [[1, -1, 2, 3]]}'), *PLAN],
        "nan": ["--stats", stats_file('{"logical_count": [[1, NaN, 2, 3]]}'), *PLAN],
        "non-numeric": ["--stats", stats_file('{"logical_count": [["x", "y", "z", "w"]]}'), *PLAN],
        "corrupt": ["--stats", stats_file('{"logical_count": [[1, 2'), *PLAN],
        "missing file": ["--stats", tmp_path / "nope.json", *PLAN],
        "slots not divisible": ["--stats", good, "--num-gpus", 4, "--redundant", 3],
        "groups not dividing": ["--stats", good, "--num-gpus", 4, "--num-groups", 3],
        "gpus not divisible by nodes": ["--stats", good, "--num-gpus", 4, "--num-nodes", 3],
        "hierarchical impossible": ["--stats", good, "--num-gpus", 4, "--num-nodes", 4, "--num-groups", 2,
                                    "--algorithm", "hierarchical"],
        "too many replicas": ["--stats", good, "--num-gpus", 2, "--redundant", 18],
        "zero gpus": ["--stats", good, "--num-gpus", 0],
        "negative redundant": ["--stats", good, "--num-gpus", 4, "--redundant", -4],
        "groups and model": ["--stats", good, "--num-gpus", 4, "--num-groups", 4, "--model", tmp_path],
        "model without config": ["--stats", good, "--num-gpus", 4, "--model", tmp_path / "nomodel"],
        "unknown algorithm": ["--stats", good, "--num-gpus", 4, "--algorithm", "best"],
    }
    return cases[name]


BAD = ["wrong shape", "ragged", "negative", "nan", "non-numeric", "corrupt", "missing file", "slots not divisible",
       "groups not dividing", "gpus not divisible by nodes", "hierarchical impossible", "too many replicas",
       "zero gpus", "negative redundant", "groups and model", "model without config", "unknown algorithm"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, name):
    work = tmp_path / "work"
    work.mkdir()
    argv = ["plan", *bad_case(work, name), "-o", tmp_path / "placement.json", "--plot", tmp_path / "plot.png"]
    code, out, err = run(argv, capsys)
    assert code == 2, (name, out, err)
    assert "error" in err and "Traceback" not in err
    assert not (tmp_path / "placement.json").exists() and not (tmp_path / "plot.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_output_folder_missing(tmp_path, stats, capsys):
    code, _, err = run(["plan", "--stats", stats, *PLAN, "-o", tmp_path / "no" / "p.json"], capsys)
    assert code == 2 and "does not exist" in err


def test_show_and_simulate_bad_input(tmp_path, stats, capsys):
    placement = tmp_path / "p.json"
    assert run(["plan", "--stats", stats, *PLAN, "-o", placement], capsys)[0] == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"logical_count": [[1] * 8] * 4}))
    code, _, err = run(["simulate", "--stats", other, "--placement", placement], capsys)
    assert code == 2 and "same model" in err
    code, _, err = run(["simulate", "--stats", stats, "--placement", stats], capsys)
    assert code == 2 and "not a placement file" in err
    code, _, err = run(["show", tmp_path / "missing.json"], capsys)
    assert code == 2 and "no such file" in err
    code, _, err = run(["show", placement, "--layer", 9], capsys)
    assert code == 2 and "out of range" in err


def test_python_dash_m(tmp_path, stats):
    """The real entry point, as users call it: exit codes and the JSON last line."""
    out_path = tmp_path / "placement.json"
    done = subprocess.run([sys.executable, "-m", "eplb", "plan", "--stats", str(stats), "--num-gpus", "4",
                           "--redundant", "4", "-o", str(out_path)],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["policy"] == "global"  # 1 group on 1 node: global
    bad = subprocess.run([sys.executable, "-m", "eplb", "plan", "--stats", str(stats), "--num-gpus", "3",
                          "-o", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and not (tmp_path / "x.json").exists()
