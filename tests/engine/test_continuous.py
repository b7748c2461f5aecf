"""Continuous batching over the paged cache against the static runner; the scheduler's bookkeeping on its own."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from engine.build import ModelSource, build_model
from engine.cb_runner import ContinuousConfig, ContinuousRunner
from engine.dummy import dummy_weights
from engine.errors import WideepError
from engine.model import DeepseekV3
from engine.paged_cache import PagedLatentKVCache, pages_for_memory
from engine.presets import tiny
from engine.runner import Request, Runner
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

# (prompt length, new tokens): one prompt longer than any chunk below, one of a single token.
SHAPES = [(3, 6), (20, 4), (7, 9), (33, 3), (1, 8), (12, 7), (5, 5), (9, 10)]


@pytest.fixture(scope="module")
def model():
    cfg = tiny()
    return DeepseekV3(cfg, dummy_weights(cfg, dtype=torch.float32, seed=5))


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n, _ in SHAPES]


def make_requests(prompts):
    return [Request(i, p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for i, (p, (_, n)) in
            enumerate(zip(prompts, SHAPES))]


@pytest.fixture(scope="module")
def static_outputs(model, prompts):
    reqs = make_requests(prompts)
    Runner(model).generate(reqs)
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("page_size", [1, 4])
def test_tight_memory_matches_static_runner(model, prompts, static_outputs, page_size):
    """48 cache tokens for 8 requests of up to 36: chunks of 8 tokens, and decode must retract."""
    runner = ContinuousRunner(model, ContinuousConfig(max_running_requests=6, chunked_prefill_size=8,
                                                      page_size=page_size, max_total_tokens=48))
    reqs = make_requests(prompts)
    steps = []
    runner.generate(reqs, on_step=steps.append)
    assert [r.output_ids for r in reqs] == static_outputs
    assert all(r.finished for r in reqs)
    assert sum(steps) == sum(n for _, n in SHAPES)  # every token reported once, none lost to retraction
    assert runner.stats.retractions > 0
    assert runner.stats.peak_pages_used == runner.cache.num_pages
    assert runner.cache.num_free_pages == runner.cache.num_pages


def test_roomy_cache_and_prompt_logits_match_static_runner(model, prompts, static_outputs):
    """Enough room for all: no retraction; chunked prompts still give the static path's prompt logits."""
    want = make_requests(prompts)
    Runner(model).generate(want, prompt_logits=True)
    runner = ContinuousRunner(model, ContinuousConfig(chunked_prefill_size=16, page_size=4))
    reqs = make_requests(prompts)
    runner.generate(reqs, prompt_logits=True)
    assert [r.output_ids for r in reqs] == static_outputs
    assert runner.stats.retractions == 0
    for a, b in zip(reqs, want):
        torch.testing.assert_close(a.prompt_logits, b.prompt_logits, rtol=1e-4, atol=1e-4)
    assert runner.cache.num_free_pages == runner.cache.num_pages


def test_long_prompt_is_prefilled_in_chunks(model, prompts, static_outputs):
    runner = ContinuousRunner(model, ContinuousConfig(chunked_prefill_size=5, page_size=4, max_total_tokens=64))
    req = make_requests(prompts)[3]  # 33 prompt tokens
    runner.generate([req])
    assert req.output_ids == static_outputs[3]
    assert runner.stats.prefill_steps == 7  # ceil(33 / 5)
    assert runner.stats.decode_steps == 2


# The scheduler alone: a request needs only what the protocol names.


@dataclass
class Req:
    rid: int
    input_ids: list[int]
    new: int
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def max_tokens(self) -> int:
        return len(self.input_ids) + self.new


def cache(num_pages, page_size):
    return PagedLatentKVCache(1, num_pages, page_size, 2, torch.float32, "cpu")


def finish_step(sched, plan):
    """What the runner does after a forward: one token for every run that ends its sequence."""
    for run in plan.runs:
        if run.sample:
            run.req.output_ids.append(0)
            run.req.finished = len(run.req.output_ids) >= run.req.new
    sched.step_done(plan)


def test_admission_waits_for_free_pages():
    c = cache(num_pages=4, page_size=2)
    sched = Scheduler(SchedulerConfig(max_running_requests=8, chunked_prefill_size=100), c)
    a, b = Req(0, [1] * 5, 3), Req(1, [1] * 4, 1)
    sched.add(a)
    sched.add(b)
    plan = sched.next_step()
    # a takes 3 pages; b's 2 pages (plus a page kept for a's next decode) do not fit: a alone.
    assert plan.prefill and [r.req.rid for r in plan.runs] == [0]
    assert c.pages_of(0) == [0, 1, 2] and c.num_free_pages == 1
    finish_step(sched, plan)
    plan = sched.next_step()
    assert not plan.prefill and [(r.start, len(r.tokens)) for r in plan.runs] == [(5, 1)]
    assert list(sched.waiting) == [b]


def test_retraction_frees_youngest_first_and_requeues_at_front():
    c = cache(num_pages=6, page_size=1)
    sched = Scheduler(SchedulerConfig(max_running_requests=8, chunked_prefill_size=100), c)
    reqs = [Req(i, [1, 2], 4) for i in range(3)]
    late = Req(3, [1], 1)
    for r in reqs + [late]:
        sched.add(r)
    plan = sched.next_step()  # 2 + 2 pages, then the third's 2 pages leave less than the 2 kept for decodes
    assert [r.req.rid for r in plan.runs] == [0, 1]
    finish_step(sched, plan)
    plan = sched.next_step()  # 2 free: exactly the next decode of both
    assert not plan.prefill and c.num_free_pages == 0
    finish_step(sched, plan)
    plan = sched.next_step()  # no page free: request 1 (the youngest) goes back, ahead of those never admitted
    assert [r.req.rid for r in plan.runs] == [0]
    assert list(sched.waiting) == [reqs[1], reqs[2], late] and sched.num_retractions == 1
    assert c.pages_of(1) == [] and len(c.pages_of(0)) == 4
    finish_step(sched, plan)
    while (plan := sched.next_step()) is not None:
        finish_step(sched, plan)
    assert all(r.finished and len(r.output_ids) == r.new for r in reqs + [late])
    assert reqs[1].output_ids == [0] * 4  # tokens made before retraction were kept, not made again
    assert c.num_free_pages == c.num_pages and sched.done


def test_chunks_shrink_to_free_pages_and_continue_first():
    c = cache(num_pages=7, page_size=4)
    sched = Scheduler(SchedulerConfig(max_running_requests=8, chunked_prefill_size=6), c)
    long, short = Req(0, list(range(17)), 2), Req(1, [5], 1)
    sched.add(long)
    sched.add(short)
    spans = []
    while (plan := sched.next_step()) is not None:
        spans.append([(r.req.rid, r.start, len(r.tokens)) for r in plan.runs])
        finish_step(sched, plan)
    # The long prompt takes 6 tokens a step and is continued before the short one is admitted.
    assert spans[:3] == [[(0, 0, 6)], [(0, 6, 6)], [(0, 12, 5), (1, 0, 1)]]
    assert c.num_free_pages == 7


def test_request_larger_than_the_cache_is_refused():
    sched = Scheduler(SchedulerConfig(), cache(num_pages=2, page_size=4))
    with pytest.raises(WideepError, match="max-total-tokens"):
        sched.add(Req(0, [1] * 8, 1))


def test_pages_for_memory():
    gib = 2**30
    # 80 GiB device, 60 GiB free (20 used by weights), 0.85: the cache gets 60 - 80 * 0.15 = 48 GiB.
    assert pages_for_memory(60 * gib, 80 * gib, 0.85, gib // 2) == 96
    with pytest.raises(WideepError, match="mem-fraction-static"):
        pages_for_memory(10 * gib, 80 * gib, 0.85, gib)


def test_bench_cli_continuous(capsys):
    from engine.bench import main

    assert main(["--runtime", "continuous", "--num-prompts", "6", "--random-input-len", "24",
                 "--random-output-len", "6", "--page-size", "4", "--chunked-prefill-size", "16",
                 "--max-total-tokens", "64", "--max-running-requests", "4", "--warmup-requests", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["runtime"] == "continuous"
    assert result["successful_requests"] == 6
    assert result["peak_running_requests"] >= 1 and 0 < result["kv_cache_peak_use"] <= 1


def test_dp_attention_ranks_under_torchrun(tiny_checkpoint, tmp_path):
    """Two DP-attention ranks with uneven shares and a tight cache: every rank joins every step (idle ones too),
    and the outputs are those of the static runner in one process."""
    ckpt = tiny_checkpoint(seed=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (30, 2, 17, 5, 9)]
    model = build_model(ModelSource.resolve(str(ckpt)), device=torch.device("cpu"), dtype=torch.float32,
                        progress=False)
    want = [Request(i, p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for i, p in enumerate(prompts)]
    Runner(model).generate(want)

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "engine.generate", "--model", str(ckpt), "--prompts-file", str(path), "--max-new-tokens", "6",
         "--ignore-eos", "--ep-size", "2", "--enable-dp-attention", "--moe-a2a-backend", "torch", "--dtype",
         "float32", "--device", "cpu", "--runtime", "continuous", "--page-size", "4", "--chunked-prefill-size", "8",
         "--max-total-tokens", "40"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert run.returncode == 0, run.stderr
    assert [json.loads(x)["output_ids"] for x in run.stdout.strip().splitlines()] == [r.output_ids for r in want]


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_finish_with_exact_accounting(seed):
    """Random prompts, lengths, page sizes and tight caches: every request ends with exactly its new tokens, pages
    held plus free always equal the pool, each token is cached once per admission, and the pool ends full."""
    g = torch.Generator().manual_seed(seed)

    def rand(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    page_size = rand(1, 5)
    reqs = [Req(i, [1] * rand(1, 30), rand(1, 12)) for i in range(rand(1, 12))]
    longest = max(r.max_tokens for r in reqs)
    c = cache(num_pages=-(-longest // page_size) + rand(0, 6), page_size=page_size)
    sched = Scheduler(SchedulerConfig(max_running_requests=rand(1, 8), chunked_prefill_size=rand(1, 20)), c)
    for r in reqs:
        sched.add(r)
    steps = 0
    while (plan := sched.next_step()) is not None:
        held = sum(len(c.pages_of(r.rid)) for r in sched.running)
        assert held + c.num_free_pages == c.num_pages
        assert len(sched.running) <= sched.config.max_running_requests
        for run in plan.runs:
            assert len(c.pages_of(run.req.rid)) * page_size >= run.start + len(run.tokens)
            assert run.tokens == Scheduler.seq(run.req)[run.start : run.start + len(run.tokens)]
        if plan.prefill:
            assert sum(len(run.tokens) for run in plan.runs) <= sched.config.chunked_prefill_size
        finish_step(sched, plan)
        steps += 1
        assert steps < 10_000
    assert all(r.finished and len(r.output_ids) == r.new for r in reqs)
    assert c.num_free_pages == c.num_pages and sched.done
