"""The `torch` dispatcher against `LocalDispatcher` on the same global problem: one process here, 2-4 gloo ranks in
subprocesses (random routing, slots of -1, all tokens to one rank, ranks with zero tokens, uneven counts, repeated
slots, interleaved start/wait halves, bf16)."""

from __future__ import annotations

import pytest
import torch
from _parallel_ranks import describe, run_ranks

from engine.errors import WideepError
from parallel.dispatcher import LocalDispatcher, available_dispatchers, make_dispatcher
from parallel.launch import LaunchEnv
from parallel.state import destroy_parallel, init_parallel
from parallel.torch_a2a import TorchAllToAllDispatcher


@pytest.fixture
def single_state():
    state = init_parallel(LaunchEnv("single", 0, 1, 0, 1, 0, 1, "127.0.0.1", 0), ep_size=1, timeout_s=30,
                          device_kind="cpu")
    yield state
    destroy_parallel(state)


def test_registered_as_torch():
    assert "torch" in available_dispatchers()


def test_one_rank_matches_local_bitwise(single_state):
    g = torch.Generator().manual_seed(0)
    t, h, k, slots = 11, 8, 3, 5
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(slots, generator=g)[:k] for _ in range(t)])
    ids[2, 1] = -1
    w = torch.rand(t, k, generator=g)
    disp = make_dispatcher("torch", state=single_state, num_local_slots=slots, hidden_size=h, dtype=torch.float32)
    assert isinstance(disp, TorchAllToAllDispatcher)
    tokens, handle = disp.dispatch(x, ids, w)
    local = LocalDispatcher(num_local_slots=slots)
    ref_tokens, ref_handle = local.dispatch(x, ids, w)
    n = int(ref_tokens.tokens_per_expert.sum())  # the local dispatch's static layout has uncounted rows past n
    assert torch.equal(tokens.hidden, ref_tokens.hidden[:n])
    assert torch.equal(tokens.tokens_per_expert, ref_tokens.tokens_per_expert)
    y = torch.sin(tokens.hidden)
    # One rank: one partial sum per token in top-k order, exactly LocalDispatcher's sum.
    assert torch.equal(disp.combine(y, handle), local.combine(y, ref_handle))


def test_bad_inputs_name_the_problem(single_state):
    disp = make_dispatcher("torch", state=single_state, num_local_slots=4, hidden_size=8, dtype=torch.float32)
    x, w = torch.randn(2, 8), torch.ones(2, 2)
    with pytest.raises(WideepError, match=r"past the last slot 3 \(1 ranks x 4 slots\) on rank\(s\) 0 \(1\)"):
        disp.dispatch(x, torch.tensor([[0, 4], [1, 2]]), w)
    with pytest.raises(WideepError, match=r"expected \[T, 8\] torch.float32"):
        disp.dispatch(x.to(torch.bfloat16), torch.zeros(2, 2, dtype=torch.long), w)
    with pytest.raises(WideepError, match="topk_weights"):
        disp.dispatch(x, torch.zeros(2, 2, dtype=torch.long), w.double())
    tokens, handle = disp.dispatch(x, torch.tensor([[0, 1], [1, 2]]), w)
    with pytest.raises(WideepError, match=r"expected \[4, 8\]"):
        disp.combine(tokens.hidden[:3], handle)


def test_second_init_is_loud(single_state):
    with pytest.raises(RuntimeError, match="init_parallel called twice"):
        init_parallel(LaunchEnv("single", 0, 1, 0, 1, 0, 1, "127.0.0.1", 0), ep_size=1, timeout_s=30,
                      device_kind="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("world,launcher", [(2, "flags"), (3, "torchrun"), (4, "slurm")])
def test_ranks_match_local_dispatcher(world, launcher):
    results = run_ranks(lambda rank, port: ["dispatch", launcher, rank, world, port], world, timeout_s=120)
    assert all(r.returncode == 0 for r in results), describe(results)
    assert all(f"rank {r.rank} ok" in r.stdout for r in results), describe(results)
