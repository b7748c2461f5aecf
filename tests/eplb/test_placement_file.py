"""placement.json: written atomically, read back equal, and every inconsistency named."""

from __future__ import annotations

import json

import pytest
import torch
from eplb_loads import zipf_load

from engine.errors import WideepError
from eplb.algorithm import balancedness, rebalance, trivial_placement
from eplb.placement_file import read_placement, write_placement

INPUTS = {"stats": "load.json", "num_gpus": 4, "num_nodes": 2, "num_groups": 4, "redundant": 4,
          "algorithm": "auto", "policy": "hierarchical", "model": None}


@pytest.fixture
def written(tmp_path):
    load = zipf_load(3, 16, 1.0, seed=0)
    placement = rebalance(load, 20, 4, 2, 4)
    before = balancedness(load, trivial_placement(3, 16, 20, 4), 4)
    after = balancedness(load, placement, 4)
    path = tmp_path / "placement.json"
    write_placement(path, placement, INPUTS, before, after)
    return path, placement, before, after


def test_round_trip(written):
    path, placement, before, after = written
    pf = read_placement(path)
    assert torch.equal(pf.placement.phy2log, placement.phy2log)
    assert torch.equal(pf.placement.log2phy, placement.log2phy)
    assert torch.equal(pf.placement.logcnt, placement.logcnt)
    assert pf.inputs == INPUTS and pf.num_gpus == 4
    assert torch.allclose(pf.balancedness_before, before, atol=1e-6)
    assert torch.allclose(pf.balancedness_after, after, atol=1e-6)
    text = path.read_text()
    assert text.count("\n") > 3 * 3  # one line per layer of each map, readable in a diff
    assert json.loads(text)["format"] == "wideep-placement"
    assert [p.name for p in path.parent.iterdir()] == ["placement.json"]


def edit(path, change):
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["logcnt"][0].__setitem__(0, 7), "'logcnt' disagrees"),
        (lambda r: r["log2phy"][0][0].__setitem__(0, 19), "'log2phy' disagrees"),
        (lambda r: r["phy2log"][1].__setitem__(0, 1.5), "rectangular 2-D list of integers"),
        (lambda r: r["phy2log"][1].pop(), "rectangular 2-D list of integers"),
        (lambda r: r["phy2log"][0].__setitem__(0, 99), "outside \\[0, 16\\)"),
        (lambda r: r.update(phy2log=[[1] * 20] * 3, logcnt=None, log2phy=None), "no slot"),
        (lambda r: r["inputs"].update(num_gpus=3), "do not split evenly over 3 ranks"),
        (lambda r: r["inputs"].update(num_gpus="four"), "positive integer"),
        (lambda r: r.update(version=2), "version 2 is not supported"),
        (lambda r: r.pop("phy2log"), "not a placement file"),
    ],
)
def test_bad_placements(written, change, message):
    path = written[0]

    def apply(raw):
        change(raw)
        for key in ("logcnt", "log2phy"):
            if key in raw and raw[key] is None:
                del raw[key]

    with pytest.raises(WideepError, match=message):
        read_placement(edit(path, apply))
