"""Online EPLB: load recording, migration planning and execution across ranks, and rebalancing inside the engine.

Expert placement must never change what the model computes: greedy outputs are compared before and after.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.build import ModelSource, build_model
from engine.presets import tiny
from engine.runner import Request, Runner
from engine.sampling import SamplingParams
from eplb.manager import EplbConfig, EplbManager, initial_placement
from eplb.migration import migrate_layer, plan_moves
from eplb.placement import ExpertPlacement
from eplb.recorder import ExpertLoadRecorder
from eplb.stats import save_dump

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[3, 17, 99], list(range(40, 61)), [42], [7, 8, 9, 10, 11]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_phy2log(g, experts, slots, world):
    """A valid placement row: every expert once, then replicas, never two of one expert on a rank (one rank with
    redundant slots necessarily holds some expert twice)."""
    per = slots // world
    while True:
        if world == 1:
            return torch.cat([torch.randperm(experts, generator=g),
                              torch.randint(0, experts, (slots - experts,), generator=g)])
        row = torch.cat([torch.randperm(experts, generator=g), torch.randint(0, experts, (slots - experts,),
                                                                              generator=g)])
        row = row[torch.randperm(slots, generator=g)]
        if all(len(set(row[r * per:(r + 1) * per].tolist())) == per for r in range(world)):
            return row


def test_recorder_counts_window_and_modes():
    rec = ExpertLoadRecorder(num_layers=2, num_experts=4, window=2, mode="per_pass")
    rec.record(0, torch.tensor([[0, 1], [1, -1]]))
    rec.end_step()
    rec.record(1, torch.tensor([[3, 3]]))
    rec.end_step()
    rec.record(0, torch.tensor([[2, 2]]))
    rec.end_step()  # the first step falls out of the 2-step window
    assert rec.window_load().tolist() == [[0, 0, 2, 0], [0, 0, 0, 2]]
    assert rec.logical_count().shape == (2, 2, 4)
    assert rec.logical_count()[0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 2]]  # oldest first
    stat = ExpertLoadRecorder(2, 4, 5, "stat")
    stat.record(1, torch.tensor([[1, 2]]))
    stat.end_step()
    assert stat.logical_count().tolist() == [[[0, 0, 0, 0], [0, 1, 1, 0]]]


def test_plan_moves_sources_hold_the_expert():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        old, new = random_phy2log(g, 12, 16, 4), random_phy2log(g, 12, 16, 4)
        moves = plan_moves(old, new, 4)
        assert {m.dst for m in moves} == {p for p in range(16) if old[p] != new[p]}
        for m in moves:
            assert old[m.src] == new[m.dst]
            assert m.src_rank == m.src // 4 and m.dst_rank == m.dst // 4
            local = [p for p in range(16) if old[p] == new[m.dst] and p // 4 == m.dst_rank]
            if local:
                assert m.src_rank == m.dst_rank  # no transfer when the rank already holds the expert


def _migrate_main(rank, world, port, seed, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(seed)
        experts, slots = 10, 12
        per = slots // world
        for _ in range(4):
            old, new = random_phy2log(g, experts, slots, world), random_phy2log(g, experts, slots, world)
            # Weights that encode their expert: slot s of w13 is filled with its expert id, w2 with 1000 + id.
            mine = old[rank * per:(rank + 1) * per]
            w13 = mine.double().view(-1, 1, 1).expand(per, 3, 5).contiguous()
            w2 = (1000 + mine.double()).view(-1, 1).expand(per, 7).contiguous()
            migrate_layer([w13, w2], plan_moves(old, new, per), rank, per)
            want = new[rank * per:(rank + 1) * per].double()
            assert torch.equal(w13, want.view(-1, 1, 1).expand_as(w13))
            assert torch.equal(w2, (1000 + want).view(-1, 1).expand_as(w2))
        Path(out, f"ok-{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_migration_moves_every_slot_to_its_new_expert(tmp_path, world):
    mp.start_processes(_migrate_main, args=(world, free_port(), 7, str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ok-{r}" for r in range(world)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from make_checkpoint import write_checkpoint

    return write_checkpoint(tiny(), tmp_path_factory.mktemp("eplb") / "ckpt", seed=5, progress=False)


def greedy(model, on_step_end=None):
    reqs = [Request(i, p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    Runner(model, on_step_end=on_step_end).generate(reqs)
    return [r.output_ids for r in reqs]


def build(ckpt, placement=None, dispatch="static"):
    return build_model(ModelSource.resolve(str(ckpt)), device=torch.device("cpu"), dtype=torch.float32,
                       placement=placement, dispatch_algorithm=dispatch, progress=False)


def test_placement_change_in_one_process_keeps_outputs(ckpt):
    """All slots on one rank: a new placement is a permutation plus new replicas, moved by local copies."""
    reference = greedy(build(ckpt))
    cfg = tiny()
    layers, experts = len(cfg.moe_layers), cfg.n_routed_experts
    model = build(ckpt, ExpertPlacement.trivial(layers, experts, experts + 4))
    manager = EplbManager(model, EplbConfig(num_redundant=4))
    g = torch.Generator().manual_seed(3)
    new = ExpertPlacement.from_phy2log(torch.stack([random_phy2log(g, experts, experts + 4, 1)
                                                    for _ in range(layers)]), experts)
    manager.apply(new, torch.ones(layers, experts))
    assert torch.equal(model.placement.phy2log, new.phy2log)
    # Every slot now holds exactly its new expert's weights: the same as a model built at that placement.
    fresh = build(ckpt, new)
    for a, b in zip(model.moe_layers(), fresh.moe_layers()):
        assert all(torch.equal(x, y) for x, y in zip(a.expert_tensors(), b.expert_tensors()))
    assert greedy(model) == reference


def test_random_dispatch_and_initial_locations_keep_outputs(ckpt, tmp_path):
    reference = greedy(build(ckpt))
    cfg = tiny()
    layers, experts = len(cfg.moe_layers), cfg.n_routed_experts
    placement = ExpertPlacement.trivial(layers, experts, experts + 8)
    assert greedy(build(ckpt, placement, dispatch="random")) == reference
    load = torch.zeros(1, layers, experts, dtype=torch.int64)
    load[0, :, :3] = 500  # three hot experts
    load[0, :, 3:] = 10
    dump = tmp_path / "load.safetensors"
    save_dump(dump, load, "stat")
    planned = initial_placement(EplbConfig(num_redundant=8, init_location=str(dump)), cfg, world=4, nnodes=1)
    assert (planned.logcnt[:, :3] > 1).all()  # hot experts got replicas
    assert greedy(build(ckpt, planned)) == reference
    # A placement.json planned by `python -m eplb plan`, and an SGLang dump (`.pt`, read with weights_only).
    from eplb.placement_file import write_placement

    plan = tmp_path / "placement.json"
    write_placement(plan, planned, {"num_gpus": 4}, torch.ones(layers), torch.ones(layers))
    from_json = initial_placement(EplbConfig(num_redundant=8, init_location=str(plan)), cfg, world=4, nnodes=1)
    assert torch.equal(from_json.phy2log, planned.phy2log)
    sglang = tmp_path / "expert_distribution.pt"
    torch.save({"logical_count": load[0]}, sglang)
    from_pt = initial_placement(EplbConfig(num_redundant=8, init_location=str(sglang)), cfg, world=4, nnodes=1)
    assert torch.equal(from_pt.phy2log, planned.phy2log)
    assert greedy(build(ckpt, from_json, dispatch="random")) == reference
    with pytest.raises(Exception, match="does not fit"):
        initial_placement(EplbConfig(num_redundant=4, init_location=str(dump)), cfg.replace(n_routed_experts=32,
                                                                                            n_group=4), 4, 1)


def _torchrun(n, *args):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
         str(free_port()), *args],
        capture_output=True, text=True, cwd=REPO, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_rebalance_mid_run_across_ranks(ckpt, tmp_path):
    """EP 2 with redundant slots, rebalancing every 3 steps while generating: the same tokens, nothing lost."""
    reference = greedy(build(ckpt))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    run = _torchrun(2, "-m", "engine.generate", "--model", str(ckpt), "--prompts-file", str(prompts),
                    "--max-new-tokens", "6", "--ignore-eos", "--ep-size", "2", "--enable-dp-attention",
                    "--dtype", "float32", "--device", "cpu", "--ep-num-redundant-experts", "4", "--enable-eplb",
                    "--eplb-rebalance-num-iterations", "3")
    assert run.returncode == 0, run.stderr
    assert [json.loads(x)["output_ids"] for x in run.stdout.strip().splitlines()] == reference
    assert run.stderr.count("EPLB rebalance at step") >= 2

    result_file = tmp_path / "r.jsonl"
    run = _torchrun(2, "-m", "engine.bench", "--model", str(ckpt), "--num-prompts", "10", "--random-input-len", "12",
                    "--random-output-len", "9", "--random-range-ratio", "1.0", "--max-running-requests", "3", "--ep-size", "2",
                    "--enable-dp-attention", "--device", "cpu", "--ep-num-redundant-experts", "2", "--enable-eplb",
                    "--eplb-rebalance-num-iterations", "4", "--result-filename", str(result_file))
    assert run.returncode == 0, run.stderr
    result = json.loads(result_file.read_text())
    assert result["successful_requests"] == 10
    assert result["total_output_tokens"] == 10 * 9
    assert len(result["eplb_rebalances"]) >= 2
    assert all(r["balancedness_after"] >= r["balancedness_before"] - 1e-9 for r in result["eplb_rebalances"])
