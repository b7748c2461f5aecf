"""Spreading requests over data-parallel attention ranks, and the bench's profiler trace."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.dp_balance import assign_ranks
from engine.errors import WideepError

REPO = Path(__file__).resolve().parents[2]


def test_round_robin_and_shortest_queue():
    assert assign_ranks([5, 5, 5, 5, 5], 2) == [0, 1, 0, 1, 0]
    # One long request: shortest_queue keeps the others off its rank until the loads even out.
    ranks = assign_ranks([100, 10, 10, 10, 10, 10], 2, "shortest_queue")
    assert ranks == [0, 1, 1, 1, 1, 1]
    costs = [37, 3, 90, 12, 12, 64, 5, 5, 41, 8]
    for world in (2, 3, 4):
        ranks = assign_ranks(costs, world, "shortest_queue")
        assert ranks[0] == 0  # request 0 (whose logits --logits-out writes) always on rank 0
        loads = [sum(c for c, r in zip(costs, ranks) if r == k) for k in range(world)]
        rr = [sum(c for c, r in zip(costs, assign_ranks(costs, world)) if r == k) for k in range(world)]
        assert max(loads) <= max(rr)
    with pytest.raises(WideepError, match="--load-balance-method"):
        assign_ranks([1], 2, "random")


def test_bench_profile_writes_a_trace(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "engine.bench", "--num-prompts", "2", "--random-input-len", "8",
         "--random-output-len", "2", "--profile", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    trace = json.loads((tmp_path / "trace_rank0.json").read_text())
    assert trace["traceEvents"]
    missing = subprocess.run([sys.executable, "-m", "engine.bench", "--profile", str(tmp_path / "nope")],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert missing.returncode == 2 and "--profile" in missing.stderr
