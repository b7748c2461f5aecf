"""Statistics files: JSON, our safetensors dump and SGLang's .pt dump; steps summed; every bad input named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import WideepError
from eplb.stats import atomic_output, load_dump, read_expert_load, save_dump, sniff

COUNTS = torch.tensor([[[3, 0, 5, 1], [2, 2, 2, 2]], [[1, 1, 0, 0], [0, 4, 0, 1]]])  # [steps=2, L=2, E=4]


def test_json_two_and_three_axes(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"logical_count": COUNTS[0].tolist()}))
    got = read_expert_load(flat)
    assert got.kind == "json" and got.steps == 1
    assert torch.equal(got.load, COUNTS[0].double())
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps({"logical_count": COUNTS.tolist(), "note": "extra keys are fine"}))
    got = read_expert_load(steps)
    assert got.steps == 2 and torch.equal(got.load, COUNTS.sum(0).double())
    floats = tmp_path / "floats.json"
    floats.write_text(json.dumps({"logical_count": [[0.5, 1.5], [2.0, 0.0]]}))
    assert read_expert_load(floats).load.dtype == torch.float64


def test_dump_round_trip(tmp_path):
    path = tmp_path / "load.safetensors"
    save_dump(path, COUNTS, "per_pass", {"window": 2, "model": "tiny", "ranks": [0, 1]})
    dump = load_dump(path)
    assert torch.equal(dump.logical_count, COUNTS)
    assert dump.metadata["format"] == "wideep-expert-load" and dump.metadata["version"] == "1"
    assert dump.metadata["mode"] == "per_pass" and dump.metadata["window"] == "2"
    assert json.loads(dump.metadata["ranks"]) == [0, 1] and dump.metadata["model"] == "tiny"
    got = read_expert_load(path)
    assert got.kind == "wideep-dump" and got.steps == 2 and torch.equal(got.load, COUNTS.sum(0).double())
    stat = tmp_path / "stat.safetensors"
    save_dump(stat, COUNTS.sum(0, keepdim=True), "stat")
    assert read_expert_load(stat).steps == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load.safetensors", "stat.safetensors"]  # no temp files


def test_sglang_dump(tmp_path):
    path = tmp_path / "expert_distribution.pt"
    torch.save({"rank": 0, "logical_count": COUNTS[1]}, path)
    got = read_expert_load(path)
    assert got.kind == "sglang-dump" and torch.equal(got.load, COUNTS[1].double())
    torch.save({"logical_count": COUNTS, "average_utilization_rate_over_window": 0.5}, path)
    assert torch.equal(read_expert_load(path).load, COUNTS.sum(0).double())


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to build it."""


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"logical_count": [[1, 2], [3]]}', "rectangular list of numbers"),
        ('{"logical_count": [["a", "b"], ["c", "d"]]}', "rectangular list of numbers"),
        ('{"logical_count": [[true, false]]}', "rectangular list of numbers"),
        ('{"logical_count": [[1, null]]}', "rectangular list of numbers"),
        ('{"logical_count": [1, 2, 3]}', "found shape \\(3,\\)"),
        ('{"logical_count": [[[[1]]]]}', "found shape \\(1, 1, 1, 1\\)"),
        ('{"logical_count": []}', "non-empty"),
        ('{"logical_count": [[1, -2]]}', "negative"),
        ('{"logical_count": [[1, NaN]]}', "NaN"),
        ('{"counts": [[1]]}', "no 'logical_count' key"),
        ('{"phy2log": [[0]]}', "found a placement"),
        ('{"logical_count": [[1, 2]', "not valid JSON"),
        ("[[1, 2]]", "expected expert-load statistics"),
        (b"\x00\x01garbage that is no known format", "neither JSON, safetensors nor"),
        (b"PK\x03\x04 truncated zip", "cannot be read as a plain-tensor .pt file"),
    ],
)
def test_bad_statistics(tmp_path, content, message):
    with pytest.raises(WideepError, match=message):
        read_expert_load(write(tmp_path, "stats.bin", content))


def test_bad_files(tmp_path):
    with pytest.raises(WideepError, match="no such file"):
        read_expert_load(tmp_path / "missing.json")
    pickled = tmp_path / "evil.pt"
    torch.save({"logical_count": Payload()}, pickled)
    with pytest.raises(WideepError, match="weights_only=True"):
        read_expert_load(pickled)
    no_key = tmp_path / "nokey.pt"
    torch.save({"physical_count": COUNTS}, no_key)
    with pytest.raises(WideepError, match="'logical_count' tensor"):
        read_expert_load(no_key)
    bad_pt = tmp_path / "neg.pt"
    torch.save({"logical_count": -COUNTS}, bad_pt)
    with pytest.raises(WideepError, match="negative"):
        read_expert_load(bad_pt)
    bools = tmp_path / "bools.pt"
    torch.save({"logical_count": COUNTS > 0}, bools)
    with pytest.raises(WideepError, match="must hold numbers"):
        read_expert_load(bools)


def test_bad_dumps(tmp_path):
    plain = tmp_path / "shard.safetensors"
    save_file({"logical_count": COUNTS}, str(plain))  # no header metadata: e.g. not ours
    with pytest.raises(WideepError, match="not 'wideep-expert-load'"):
        read_expert_load(plain)
    future = tmp_path / "v2.safetensors"
    save_file({"logical_count": COUNTS}, str(future), metadata={"format": "wideep-expert-load", "version": "2",
                                                                 "mode": "stat"})
    with pytest.raises(WideepError, match="version '2' is not supported"):
        read_expert_load(future)
    mode = tmp_path / "mode.safetensors"
    save_file({"logical_count": COUNTS}, str(mode), metadata={"format": "wideep-expert-load", "version": "1",
                                                               "mode": "sometimes"})
    with pytest.raises(WideepError, match="'mode' is 'sometimes'"):
        read_expert_load(mode)
    flat = tmp_path / "flat.safetensors"
    save_file({"logical_count": COUNTS[0]}, str(flat), metadata={"format": "wideep-expert-load", "version": "1",
                                                                  "mode": "stat"})
    with pytest.raises(WideepError, match=r"\[steps, layers, experts\]"):
        read_expert_load(flat)
    other = tmp_path / "other.safetensors"
    save_file({"weights": COUNTS}, str(other), metadata={"format": "wideep-expert-load"})
    with pytest.raises(WideepError, match="no tensor 'logical_count'"):
        read_expert_load(other)
    good = tmp_path / "good.safetensors"
    save_dump(good, COUNTS, "stat")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(WideepError, match="not a readable safetensors file"):
        read_expert_load(cut)


def test_save_dump_rejects_and_writes_nothing(tmp_path):
    path = tmp_path / "load.safetensors"
    with pytest.raises(WideepError, match="recorder mode"):
        save_dump(path, COUNTS, "sometimes")
    with pytest.raises(WideepError, match="negative"):
        save_dump(path, -COUNTS, "stat")
    with pytest.raises(WideepError, match=r"\[steps, layers, experts\]"):
        save_dump(path, COUNTS[0], "stat")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WideepError, match="does not exist"), atomic_output(tmp_path / "no" / "out.json"):
        pass


def test_sniff(tmp_path):
    assert sniff(write(tmp_path, "a", '  {"x": 1}')) == "json"
    save_dump(tmp_path / "b", COUNTS, "stat")
    assert sniff(tmp_path / "b") == "safetensors"
    torch.save({"logical_count": COUNTS}, tmp_path / "c")
    assert sniff(tmp_path / "c") == "torch"
