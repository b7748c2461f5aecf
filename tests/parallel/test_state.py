"""Parallel flags, their validation, slot counting and `ParallelState` checks (no process group needed)."""

from __future__ import annotations

import argparse

import pytest
import torch

from engine.errors import WideepError
from parallel.config import ParallelConfig, add_parallel_args
from parallel.launch import LaunchEnv
from parallel.state import ParallelState, init_parallel, slots_per_rank


def parse(argv: list[str]) -> ParallelConfig:
    parser = argparse.ArgumentParser()
    add_parallel_args(parser)
    return ParallelConfig.from_args(parser.parse_args(argv))


def test_flags_sglang_style():
    cfg = parse(["--tp-size", "8", "--dp-size", "8", "--ep-size", "8", "--enable-dp-attention",
                 "--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--nnodes", "2", "--node-rank", "1",
                 "--dist-init-addr", "10.0.0.1:5000", "--dist-timeout", "30"])
    assert (cfg.ep_size, cfg.attention_dp_size, cfg.a2a_backend, cfg.deepep_mode) == (8, 8, "deepep", "low_latency")
    assert (cfg.nnodes, cfg.node_rank, cfg.dist_init_addr, cfg.dist_timeout) == (2, 1, "10.0.0.1:5000", 30.0)


def test_flag_defaults():
    cfg = parse([])
    assert (cfg.ep_size, cfg.a2a_backend, cfg.dist_timeout, cfg.deepep_mode) == (1, "local", 300.0, "auto")
    assert parse(["--ep-size", "4", "--enable-dp-attention"]).a2a_backend == "torch"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ep-size", "4"], "--ep-size 4 needs --enable-dp-attention"),
        (["--ep-size", "4", "--enable-dp-attention", "--tp-size", "2"], "--tp-size 2 must equal --ep-size 4"),
        (["--ep-size", "4", "--enable-dp-attention", "--dp-size", "2"], "--dp-size 2 must equal 4"),
        (["--ep-size", "0"], "--ep-size 0 must be at least 1"),
        (["--dist-timeout", "0"], "--dist-timeout 0.0 must be a positive"),
        (["--ep-size", "2", "--enable-dp-attention", "--moe-a2a-backend", "local"], "with --ep-size 2 use torch"),
        (["--dist-init-addr", "nope"], "--dist-init-addr 'nope' is not host:port"),
    ],
)
def test_bad_flags_are_named(argv, message):
    with pytest.raises(WideepError, match=message):
        parse(argv)


def test_slots_per_rank():
    assert slots_per_rank(256, 32, 8) == 36
    assert slots_per_rank(8, 0, 1) == 8
    with pytest.raises(WideepError, match=r"256 routed experts \+ 0 redundant \(--ep-num-redundant-experts\) = 256 "
                                          r"slots do not split evenly over 3 ranks \(--ep-size 3\); raise "
                                          r"--ep-num-redundant-experts to 2"):
        slots_per_rank(256, 0, 3)
    with pytest.raises(WideepError, match="need at least one expert"):
        slots_per_rank(0, 0, 2)
    with pytest.raises(WideepError, match="do not split evenly over 4 ranks"):
        slots_per_rank(2, 0, 4)


def state(**overrides) -> ParallelState:
    fields = {"rank": 1, "world_size": 2, "local_rank": 1, "local_world_size": 2, "node_rank": 0, "nnodes": 1,
              "master_addr": "h", "master_port": 1, "device": torch.device("cpu"), "backend": "gloo", "ep_size": 2}
    return ParallelState(**{**fields, **overrides})


def test_parallel_state_is_frozen_and_ignores_the_group():
    a, b = state(), state(group=object())
    assert a == b and "group" not in repr(b)
    assert (a.ep_rank, a.is_main, a.num_local_slots(6, 2)) == (1, False, 4)
    with pytest.raises(AttributeError):
        a.rank = 0


def test_ep_size_must_equal_world():
    with pytest.raises(WideepError, match=r"--ep-size 2 must equal the number of ranks launched \(4, from torchrun\)"):
        init_parallel(LaunchEnv("torchrun", 0, 4, 0, 4, 0, 1, "h", 1), ep_size=2, timeout_s=5)
    with pytest.raises(WideepError, match="--ep-size 1 must equal the number of ranks launched"):
        state(ep_size=1)
