"""Slurm's host list and tasks-per-node syntaxes, expanded as `scontrol show hostnames` would."""

from __future__ import annotations

import pytest

from engine.errors import WideepError
from parallel.hostlist import expand_hostlist, expand_tasks_per_node


@pytest.mark.parametrize(
    "text,hosts",
    [
        ("node1", ["node1"]),
        ("gpu[001-004,007],login1", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu007", "login1"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
        ("a[09-11]", ["a09", "a10", "a11"]),
        ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
        ("x[3],y[1,2]z", ["x3", "y1z", "y2z"]),
        ("b2,a1", ["b2", "a1"]),  # launch order is kept: the first host is the rendezvous
        ("10.0.0.[5-6]", ["10.0.0.5", "10.0.0.6"]),
    ],
)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    "text,message",
    [
        ("gpu[001-004", "'\\[' without '\\]'"),
        ("gpu001]", "'\\]' without '\\['"),
        ("gpu[4-1]", "decreasing range"),
        ("gpu[a-b]", "bad range"),
        ("gpu[[1]]", "nested"),
        ("", "SLURM_STEP_NODELIST is empty"),
    ],
)
def test_bad_hostlists_are_named(text, message):
    with pytest.raises(WideepError, match=message):
        expand_hostlist(text, source="SLURM_STEP_NODELIST")


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(WideepError, match="tasks-per-node syntax"):
        expand_tasks_per_node("4x2")
