"""The simple generation path: static batches, prefill in token-bounded groups, then batched decode to the end.

Every request of a batch owns cache slots for its prompt and all its new tokens from the start, so a batch never runs
out of cache midway. (Continuous batching with a paged cache replaces this path for throughput; this one stays as
the reference that path is checked against.)

Under data-parallel attention each rank runs its own requests, but every MoE layer is a collective: so every rank
joins every step, with an empty batch when it has nothing left, and all ranks agree on the step's mode (prefill when
any rank prefills) through the `StepSync` they are given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch

from engine.batch import ForwardBatch
from engine.errors import WideepError
from engine.model import DeepseekV3
from engine.sampling import SamplingParams, request_seed, sample
from parallel.step_sync import LocalStepSync, StepSync

P = TypeVar("P")  # a runner's plan of one step: anything with a `prefill` flag


@dataclass
class Request:
    rid: int
    input_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    prompt_logits: torch.Tensor | None = None  # [prompt_len, vocab] float32, when asked for
    finished: bool = False

    @property
    def max_tokens(self) -> int:
        return len(self.input_ids) + self.params.max_new_tokens


def sample_next(reqs: list[Request], logits: torch.Tensor, job_seed: int) -> list[int]:
    """The next token of each request from its last logits `[len(reqs), vocab]` float32, seeded per request (its own
    seed, or one derived from `job_seed` and its id), so the draw does not depend on the batch or the rank."""
    seeds = [r.params.seed if r.params.seed is not None else request_seed(job_seed, r.rid) for r in reqs]
    return sample(logits, [r.params for r in reqs], seeds, [len(r.output_ids) for r in reqs]).tolist()


def run_agreed_steps(
    sync: StepSync,
    first_step: int,
    next_plan: Callable[[], P | None],
    run: Callable[[P | None, str], None],
    on_step_end: Callable[[int], None] | None,
) -> int:
    """The step machine both runners share; returns the job-wide index of the next step.

    Each step: this rank's plan (None: nothing of its own), every rank agreeing whether any rank has work and
    whether any prefills (the step's mode), `run(plan, mode)` (an idle rank runs an empty batch in it), then
    `on_step_end(step)` on every rank. Each phase sits under the watchdog guard that names the step.
    """
    step = first_step
    while True:
        plan = next_plan()
        with sync.guard(step, "agreeing on the next step"):
            go, prefill = sync.agree(plan is not None, plan is not None and plan.prefill)
        if not go:
            return step
        mode = "prefill" if prefill else "decode"
        with sync.guard(step, f"{mode} forward"):
            run(plan, mode)
        if on_step_end is not None:
            with sync.guard(step, "end of step (expert load, rebalance)"):
                on_step_end(step)
        step += 1


@dataclass(frozen=True)
class RunnerConfig:
    max_running_requests: int = 64
    max_prefill_tokens: int = 8192  # new tokens per prefill forward; bounds activation memory
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_running_requests < 1:
            raise WideepError("--max-running-requests must be >= 1")
        if self.max_prefill_tokens < 1:
            raise WideepError("--max-prefill-tokens must be >= 1")


@dataclass
class StepStats:
    """Wall time and work per phase. Each step ends in a host sync (sampled tokens come back to the host), so
    host timing covers the device work without extra synchronisation."""

    prefill_steps: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    idle_steps: int = 0  # steps this rank joined with no tokens of its own

    @property
    def mean_decode_step_ms(self) -> float:
        return 1e3 * self.decode_s / max(self.decode_steps, 1)

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_tokens / max(self.decode_steps, 1)


@dataclass
class _Step:
    prefill: bool
    reqs: list[Request]
    batch: ForwardBatch


def check_requests(requests: list[Request], vocab_size: int) -> None:
    """Every prompt non-empty and inside the vocabulary, or one message naming the request."""
    for r in requests:
        if not r.input_ids:
            raise WideepError(f"request {r.rid} has an empty prompt; give at least one token")
        bad = [t for t in r.input_ids if not 0 <= t < vocab_size]
        if bad:
            raise WideepError(f"request {r.rid}: token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def _prefill_groups(reqs: list[Request], budget: int) -> Iterator[list[Request]]:
    """Consecutive groups of requests whose prompts total at most `budget` tokens (a longer prompt runs alone)."""
    group: list[Request] = []
    used = 0
    for r in reqs:
        if group and used + len(r.input_ids) > budget:
            yield group
            group, used = [], 0
        group.append(r)
        used += len(r.input_ids)
    if group:
        yield group


class Runner:
    """Runs requests to completion on one model; `on_step(num_new_tokens)` reports progress."""

    def __init__(self, model: DeepseekV3, config: RunnerConfig = RunnerConfig(), sync: StepSync | None = None,
                 on_step_end: Callable[[int], None] | None = None):
        """on_step_end(step): called on every rank after every step, idle ones too, with the job-wide step index
        (EPLB records and rebalances there: a boundary every rank reaches together)."""
        self.model = model
        self.config = config
        self.sync = sync or LocalStepSync()
        self.on_step_end = on_step_end
        self.eos = model.cfg.eos_token_id
        self.stats = StepStats()
        self._cache = None
        self._step = 0

    def _cache_for(self, tokens: int):
        if self._cache is None or self._cache.capacity < tokens:
            self._cache = None  # free the old buffer before taking the new one
            self._cache = self.model.new_kv_cache(max(tokens, 1))
        return self._cache

    def generate(
        self,
        requests: list[Request],
        prompt_logits: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> list[Request]:
        """Runs `requests` (this rank's share; possibly none) to completion, joining every step of the job."""
        check_requests(requests, self.model.cfg.vocab_size)
        on_step = on_step or (lambda n: None)
        plan = self._plan(requests)
        self._step = run_agreed_steps(self.sync, self._step, lambda: next(plan, None),
                                      lambda step, mode: self._run(step, mode, prompt_logits, on_step),
                                      self.on_step_end)
        return requests

    def _plan(self, requests: list[Request]) -> Iterator[_Step]:
        """This rank's steps, one at a time; each is run (and its tokens sampled) before the next is planned."""
        window = self.config.max_running_requests
        device = self.model.device
        for start in range(0, len(requests), window):
            reqs = requests[start : start + window]
            cache = self._cache_for(sum(r.max_tokens for r in reqs))
            slots = {r.rid: cache.alloc(r.max_tokens) for r in reqs}
            try:
                for group in _prefill_groups(reqs, self.config.max_prefill_tokens):
                    yield _Step(True, group, ForwardBatch.build([r.input_ids for r in group], [0] * len(group),
                                                                [slots[r.rid] for r in group], device))
                while live := [r for r in reqs if not r.finished]:
                    yield _Step(False, live, ForwardBatch.build(
                        [[r.output_ids[-1]] for r in live],
                        [len(r.input_ids) + len(r.output_ids) - 1 for r in live],
                        [slots[r.rid] for r in live], device))
            finally:
                for s in slots.values():
                    cache.free(s)

    def _run(self, step: _Step | None, mode: str, prompt_logits: bool, on_step: Callable[[int], None]) -> None:
        start = time.perf_counter()
        if step is None:
            # Nothing of our own: join the step's collectives with zero tokens.
            self.model.forward(ForwardBatch.empty(self.model.device, mode), self._cache_for(1))
            self.stats.idle_steps += 1
            return
        step.batch.mode = mode
        want_all = prompt_logits and step.prefill
        logits = self.model.forward(step.batch, self._cache, all_logits=want_all)
        if want_all:
            for r, chunk in zip(step.reqs, logits.split(step.batch.extend_lens)):
                r.prompt_logits = chunk.cpu()
            logits = logits[step.batch.last_token_index]
        self._append(step.reqs, logits)
        elapsed = time.perf_counter() - start
        if step.prefill:
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += step.batch.num_tokens
            self.stats.prefill_s += elapsed
        else:
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(step.reqs)
            self.stats.decode_s += elapsed
        on_step(len(step.reqs))

    def _append(self, reqs: list[Request], logits: torch.Tensor) -> None:
        tokens = sample_next(reqs, logits, self.config.seed)
        for r, tok in zip(reqs, tokens):
            r.output_ids.append(tok)
            done = len(r.output_ids) >= r.params.max_new_tokens
            if not r.params.ignore_eos and tok == self.eos:
                done = True
            r.finished = done
