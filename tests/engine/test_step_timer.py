"""The step timer: spans within steps, shares that sum to one, no cost when inactive, and the bench's breakdown."""

import json
import time

import pytest
import torch

from engine import step_timer
from engine.step_timer import CATEGORIES, StepTimer, max_shares


def run_step(timer: StepTimer, mode: str, spans: dict[str, float], tail: float = 0.002) -> None:
    """One step of `mode` whose spans sleep the given seconds, then `tail` seconds outside any span."""
    timer.begin_step(mode)
    for category, seconds in spans.items():
        with step_timer.scope(category):
            time.sleep(seconds)
    time.sleep(tail)
    timer.end_step()


def test_spans_sum_within_the_step_and_shares_sum_to_one():
    timer = StepTimer("cpu")
    with step_timer.activate(timer):
        for _ in range(2):
            run_step(timer, "decode", {"attention": 0.003, "dispatch": 0.001, "experts": 0.002, "combine": 0.001})
        run_step(timer, "prefill", {"attention": 0.004})
    assert timer.steps == {"prefill": 1, "decode": 2}
    for mode in ("prefill", "decode"):
        sums = timer.seconds[mode]
        assert sum(sums[c] for c in CATEGORIES) <= sums["total"]
        shares = timer.shares(mode)
        assert shares["rest"] >= 0.0
        assert sum(shares[c] for c in (*CATEGORIES, "rest")) == pytest.approx(1.0)
        assert shares["dispatch_combine"] == pytest.approx(shares["dispatch"] + shares["combine"])
    decode = timer.shares("decode")
    assert all(decode[c] > 0 for c in (*CATEGORIES, "rest"))
    assert decode["attention"] > decode["combine"]  # 3 ms against 1 ms: the spans measure what they enclose
    assert timer.seconds["prefill"]["experts"] == 0.0
    assert timer.mean_step_ms("decode") >= 9.0


def test_inactive_scope_is_one_shared_nullcontext_and_spans_need_a_step():
    assert step_timer.scope("attention") is step_timer.scope("experts")
    timer = StepTimer("cpu")
    with step_timer.activate(timer):
        with step_timer.scope("attention"):  # no step open: not counted
            time.sleep(0.001)
        timer.begin_step("decode")
        with step_timer.scope("attention"), step_timer.scope("experts"):  # nested: ignored, spans never overlap
            time.sleep(0.001)
        timer.end_step()
        with pytest.raises(RuntimeError, match="already active"), step_timer.activate(StepTimer("cpu")):
            pass
        with pytest.raises(ValueError, match="category"):
            step_timer.scope("router")
    assert step_timer._active is None
    assert timer.steps["decode"] == 1 and timer.seconds["decode"]["experts"] == 0.0
    assert 0.0 < timer.seconds["decode"]["attention"] <= timer.seconds["decode"]["total"]
    assert timer.shares("prefill") is None


def test_max_shares_over_ranks():
    a = {"decode": {"attention": 0.5, "rest": 0.1}}
    b = {"decode": {"attention": 0.3, "rest": 0.4}, "prefill": {"attention": 0.9}}
    assert max_shares([a, b]) == {"decode": {"attention": 0.5, "rest": 0.4}, "prefill": {"attention": 0.9}}


def test_bench_reports_every_category_of_decode_steps(capsys):
    from engine.bench import main

    assert main(["--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "6",
                 "--random-range-ratio", "1.0", "--warmup-requests", "0"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    decode = result["step_breakdown"]["decode"]
    assert all(decode[c] > 0 for c in (*CATEGORIES, "rest", "dispatch_combine"))
    assert sum(decode[c] for c in (*CATEGORIES, "rest")) == pytest.approx(1.0)
    assert set(result["step_breakdown"]) == {"prefill", "decode"}
    assert result["step_breakdown_max"] == result["step_breakdown"]  # one rank
    assert result["step_breakdown_pass"]["steps"] == {"prefill": 1, "decode": 5}
    assert "Decode attn/experts/a2a/rest, r0" in out
    assert result["total_output_tokens"] == 4 * 6  # the timed run's requests, not the breakdown pass's

    assert main(["--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "2",
                 "--warmup-requests", "0", "--no-step-breakdown"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "step_breakdown" not in result


@pytest.mark.gpu
def test_scopes_are_no_ops_while_a_cuda_graph_is_captured():
    x = torch.ones(64, device="cuda")
    timer = StepTimer("cuda")
    graph = torch.cuda.CUDAGraph()
    with step_timer.activate(timer):
        timer.begin_step("decode")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with step_timer.scope("experts"):  # eager warm-up on the side stream: timed
                y = x * 2
            with torch.cuda.graph(graph), step_timer.scope("attention"):  # captured: must record no event
                y = x * 3
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
        timer.end_step()
    assert torch.equal(y, x * 3)
    assert timer.seconds["decode"]["attention"] == 0.0
    assert 0.0 <= timer.seconds["decode"]["experts"] <= timer.seconds["decode"]["total"]
