"""Continuous batching: which requests run in the next step, and how many of their tokens. Pure bookkeeping.

Every request is a sequence `input_ids + output_ids` of which the first `cached` tokens are in the KV cache. A step
runs, for each chosen request, a run of tokens starting at `cached`; a run reaching the sequence's end samples the
next token. A decode is the run of one token (the last sampled one); a prefill chunk is any longer or first run.

Policy: prefill first. When a running request is part-way through its prompt, or a waiting request can be admitted,
the step prefills up to `chunked_prefill_size` tokens (continuing the part-way request first, then admitting waiting
requests in arrival order); otherwise it decodes every running request. Why: offline throughput comes from large
decode batches, and admitting as soon as pages allow fills the batch fastest; steps stay single-mode, so decode
steps keep the absorbed attention path and the low-latency dispatch (under DP attention the whole job shares a
step's mode anyway). Chunking bounds a step's activations and lets a prompt longer than the budget in.

Memory: a request is admitted only when the pages of its chunk are free, plus one page for each request that will
decode next step (those decoding now and those completing their prompt in this step), so admission alone does not
force the next decode into retraction. When a decode step still cannot get a page for every request, the
most recently admitted requests are retracted: their pages are freed and they go back to the front of the waiting
queue, keeping their generated tokens, which are re-prefilled with the prompt when they are admitted again.
The oldest request is never retracted for a younger one, so it always progresses: the job terminates.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from engine.errors import WideepError
from engine.paged_cache import PagedLatentKVCache


class SchedRequest(Protocol):
    """What the scheduler reads of a request (`engine.runner.Request` is one)."""

    rid: int
    input_ids: list[int]
    output_ids: list[int]
    finished: bool

    @property
    def max_tokens(self) -> int: ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int = 64
    chunked_prefill_size: int = 8192  # new tokens per prefill step

    def __post_init__(self) -> None:
        if self.max_running_requests < 1:
            raise WideepError("--max-running-requests must be >= 1")
        if self.chunked_prefill_size < 1:
            raise WideepError("--chunked-prefill-size must be >= 1")


@dataclass
class Run:
    """One request's part of a step: `tokens` (host ints) at positions `start ..`; `sample`: the run ends the
    sequence, so the step's logits for its last token give the request's next token."""

    req: SchedRequest
    start: int
    tokens: list[int]
    sample: bool


@dataclass
class Plan:
    prefill: bool
    runs: list[Run]


class Scheduler:
    """Waiting queue, running list (in admission order) and the cached length of each running request."""

    def __init__(self, config: SchedulerConfig, cache: PagedLatentKVCache):
        self.config = config
        self.cache = cache
        self.waiting: deque[SchedRequest] = deque()
        self.running: list[SchedRequest] = []
        self.cached: dict[int, int] = {}
        self.num_retractions = 0

    def add(self, req: SchedRequest) -> None:
        if self.cache.pages_needed(req.max_tokens) > self.cache.num_pages:
            raise WideepError(f"request {req.rid} needs {req.max_tokens} tokens of KV cache, more than the "
                              f"{self.cache.capacity} it holds; raise --max-total-tokens or --mem-fraction-static")
        self.waiting.append(req)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    @staticmethod
    def seq(req: SchedRequest) -> list[int]:
        return req.input_ids + req.output_ids

    @staticmethod
    def seq_len(req: SchedRequest) -> int:
        """len(seq(req)) without building the list (the scheduler asks for it of every request every step)."""
        return len(req.input_ids) + len(req.output_ids)

    def next_step(self) -> Plan | None:
        """The next step's runs with their pages reserved, or None when nothing is left."""
        if self.done:
            return None
        plan = self._prefill()
        if plan is None:
            plan = self._decode()
        return plan

    def _decoders(self) -> list[SchedRequest]:
        """Running requests whose whole sequence but the last sampled token is cached."""
        return [r for r in self.running if self.cached[r.rid] == self.seq_len(r) - 1]

    def _prefill(self) -> Plan | None:
        budget = self.config.chunked_prefill_size
        # Room for the next decode of every decoding request, so prefilling alone never forces a retraction.
        reserve = len(self._decoders())
        partial = [r for r in self.running if self.cached[r.rid] < self.seq_len(r) - 1]
        if partial:
            # At most one, and the youngest: admission stops at a chunk that does not end its sequence.
            run = self._chunk(partial[0], budget, reserve)
            if run is None or not run.sample:
                return Plan(True, [run]) if run else None
            runs, budget = [run], budget - len(run.tokens)
        else:
            runs = []
        while budget > 0 and self.waiting and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
            self.cached[req.rid] = 0
            run = self._chunk(req, budget, reserve + len(runs))
            if run is None:
                del self.cached[req.rid]
                break
            self.waiting.popleft()
            self.running.append(req)
            runs.append(run)
            budget -= len(run.tokens)
            if not run.sample:
                break
        return Plan(True, runs) if runs else None

    def _chunk(self, req: SchedRequest, budget: int, reserve: int) -> Run | None:
        """Up to `budget` of req's uncached tokens, as many as the free pages (less `reserve`) hold."""
        seq = self.seq(req)
        start = self.cached[req.rid]
        end = min(len(seq), start + budget)
        free = self.cache.num_free_pages - reserve
        while end > start and self.cache.extra_pages(req.rid, end) > free:
            # Shrink to what fits: down to the page boundary below, a page at a time.
            end = min(end - 1, (self.cache.pages_needed(end) - 1) * self.cache.page_size)
        if end <= start:
            return None
        self.cache.reserve(req.rid, end)
        return Run(req, start, seq[start:end], sample=end == len(seq))

    def _decode(self) -> Plan:
        # Retract youngest first until every decoding request's next token has its page.
        while sum(self.cache.extra_pages(r.rid, self.seq_len(r)) for r in self._decoders()) > \
                self.cache.num_free_pages:
            if len(self.running) == 1:
                raise RuntimeError("a lone request cannot get a page, though its length was checked when added")
            self.retract(self.running[-1])
        runs = []
        for req in self._decoders():
            n = self.seq_len(req)
            self.cache.reserve(req.rid, n)
            # The last token: usually the last sampled one, or a prompt's last when its chunk stopped just short.
            runs.append(Run(req, n - 1, [(req.output_ids or req.input_ids)[-1]], sample=True))
        if not runs:
            raise RuntimeError("no request can prefill or decode: the scheduler's page accounting is off")
        return Plan(False, runs)

    def retract(self, req: SchedRequest) -> None:
        """Frees req's pages and puts it at the front of the waiting queue (its tokens re-prefilled later)."""
        self.running.remove(req)
        del self.cached[req.rid]
        self.cache.release(req.rid)
        self.waiting.appendleft(req)
        self.num_retractions += 1

    def step_done(self, plan: Plan) -> None:
        """After the step's forward and sampling: advances cached lengths, frees finished requests' pages."""
        for run in plan.runs:
            self.cached[run.req.rid] = run.start + len(run.tokens)
            if run.req.finished:
                self.running.remove(run.req)
                del self.cached[run.req.rid]
                self.cache.release(run.req.rid)
