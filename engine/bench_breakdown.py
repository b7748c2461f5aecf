"""The bench's step-time breakdown pass (`--step-breakdown`): after the timed run, one batch per rank re-run eagerly
under an `engine.step_timer` timer, and each mode's shares of step time in attention, experts, dispatch + combine
and the rest."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator

from engine import step_timer
from engine.bench_rebalance import StepHooks
from engine.cli_args import make_runner
from engine.distributed import EngineParallel
from engine.dp_balance import assign_ranks
from engine.model import DeepseekV3
from engine.runner import Request
from engine.sampling import SamplingParams
from engine.step_timer import CATEGORIES, StepTimer

log = logging.getLogger("wideep")
# Output tokens per request in the breakdown pass: enough decode steps to average over, short enough that the pass
# costs little next to the timed run (the context, and so decode attention, stays near the prompt length).
BREAKDOWN_OUTPUT_LEN = 16


@contextlib.contextmanager
def timed_steps(model: DeepseekV3, timer: StepTimer) -> Iterator[None]:
    """Activates `timer` and opens one of its steps at every forward of `model` (the step's mode is the batch's);
    `StepHooks` closes it at the end of the step, so a step's time includes sampling."""
    forward = model.forward

    def opening_a_step(batch, *rest, **kwargs):
        timer.begin_step(batch.mode)
        return forward(batch, *rest, **kwargs)

    model.forward = opening_a_step  # an instance attribute over the method, for this pass only
    try:
        with step_timer.activate(timer):
            yield
    finally:
        del model.forward


def breakdown_pass(args: argparse.Namespace, model: DeepseekV3, par: EngineParallel, hooks: StepHooks,
                   everyone: list[Request]) -> dict:
    """Re-runs the first prompts (one batch per rank, BREAKDOWN_OUTPUT_LEN output tokens) on an eager runner with a
    step timer. Returns this rank's `{"shares": {mode: shares}, "steps": {mode: n}, "mean_step_ms": {mode: ms}}`.

    The runner is built with `disable_cuda_graph` set, as `--disable-cuda-graph` sets it, so that its decode steps
    run eagerly. Should graphs replay anyway, those steps run no Python: they are counted as untimed (with a
    warning) and left out, as is a mode whose steps showed no span at all.
    """
    n = min(len(everyone), par.world_size * args.max_running_requests)
    again = [Request(r.rid, r.input_ids, SamplingParams(max_new_tokens=min(r.params.max_new_tokens,
                                                                           BREAKDOWN_OUTPUT_LEN),
                                                        ignore_eos=r.params.ignore_eos)) for r in everyone[:n]]
    owner = assign_ranks([r.max_tokens for r in again], par.world_size, args.load_balance_method)
    eager = argparse.Namespace(**{**vars(args), "disable_cuda_graph": True})
    runner = make_runner(eager, model, args.seed, par.sync, hooks)
    timer = StepTimer(par.device)
    hooks.timer, hooks.untimed_steps = timer, 0
    try:
        with timed_steps(model, timer):
            runner.generate([r for r, rank in zip(again, owner) if rank == par.rank])
    finally:
        hooks.timer = None
    if hooks.untimed_steps:
        log.warning("step breakdown: %d steps ran without an eager forward (CUDA graph replays?) and are not in "
                    "it; run with --disable-cuda-graph", hooks.untimed_steps)
    shares = {}
    for mode in timer.steps:
        got = timer.shares(mode)
        if got is not None and sum(got[c] for c in CATEGORIES) == 0.0:
            log.warning("step breakdown: %d %s steps ran without any timed span (CUDA graphs?); left out",
                        timer.steps[mode], mode)
        elif got is not None:
            shares[mode] = got
    return {"shares": shares, "steps": dict(timer.steps), "untimed_steps": hooks.untimed_steps,
            "mean_step_ms": {m: timer.mean_step_ms(m) for m in timer.steps if timer.steps[m]}}


def step_breakdown(per_rank: list[dict]) -> dict:
    """Rank 0's step-time shares per mode, the largest share of each over ranks, and how the pass ran on rank 0."""
    return {"step_breakdown": per_rank[0]["shares"],
            "step_breakdown_max": step_timer.max_shares([r["shares"] for r in per_rank]),
            "step_breakdown_pass": {"output_len": BREAKDOWN_OUTPUT_LEN, "steps": per_rank[0]["steps"],
                                    "untimed_steps": per_rank[0]["untimed_steps"],
                                    "mean_step_ms": per_rank[0]["mean_step_ms"]}}


def format_shares(shares: dict[str, float]) -> str:
    """Attention, experts, dispatch + combine and the rest, as whole percentages."""
    return " / ".join(f"{100 * shares[k]:.0f}%" for k in ("attention", "experts", "dispatch_combine", "rest"))
