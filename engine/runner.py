"""The simple generation path: static batches, prefill in token-bounded groups, then batched decode to the end.

Every request of a batch owns cache slots for its prompt and all its new tokens from the start, so a batch never runs
out of cache midway. (Continuous batching with a paged cache replaces this path for throughput; this one stays as
the reference that path is checked against.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from engine.batch import ForwardBatch
from engine.errors import WideepError
from engine.model import DeepseekV3
from engine.sampling import SamplingParams, sample


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

    @property
    def mean_decode_step_ms(self) -> float:
        return 1e3 * self.decode_s / max(self.decode_steps, 1)

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_tokens / max(self.decode_steps, 1)


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

    def __init__(self, model: DeepseekV3, config: RunnerConfig = RunnerConfig()) -> None:
        self.model = model
        self.config = config
        self.eos = model.cfg.eos_token_id
        self.generator = torch.Generator(device=model.device).manual_seed(config.seed)
        self.stats = StepStats()
        self._cache = None

    def _cache_for(self, tokens: int):
        if self._cache is None or self._cache.capacity < tokens:
            self._cache = None  # free the old buffer before taking the new one
            self._cache = self.model.new_kv_cache(tokens)
        return self._cache

    def generate(
        self,
        requests: list[Request],
        prompt_logits: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> list[Request]:
        for r in requests:
            if not r.input_ids:
                raise WideepError(f"request {r.rid} has an empty prompt; give at least one token")
            bad = [t for t in r.input_ids if not 0 <= t < self.model.cfg.vocab_size]
            if bad:
                raise WideepError(f"request {r.rid}: token id {bad[0]} outside the vocabulary [0, "
                                  f"{self.model.cfg.vocab_size})")
        step = self.config.max_running_requests
        for start in range(0, len(requests), step):
            self._run_batch(requests[start : start + step], prompt_logits, on_step or (lambda n: None))
        return requests

    def _run_batch(self, reqs: list[Request], prompt_logits: bool, on_step: Callable[[int], None]) -> None:
        cache = self._cache_for(sum(r.max_tokens for r in reqs))
        slots = {r.rid: cache.alloc(r.max_tokens) for r in reqs}
        try:
            for group in _prefill_groups(reqs, self.config.max_prefill_tokens):
                start = time.perf_counter()
                batch = ForwardBatch.build([r.input_ids for r in group], [0] * len(group),
                                           [slots[r.rid] for r in group], self.model.device)
                logits = self.model.forward(batch, cache, all_logits=prompt_logits)
                if prompt_logits:
                    for r, chunk in zip(group, logits.split(batch.extend_lens)):
                        r.prompt_logits = chunk.cpu()
                    logits = logits[batch.last_token_index]
                self._append(group, logits)
                self.stats.prefill_steps += 1
                self.stats.prefill_tokens += batch.num_tokens
                self.stats.prefill_s += time.perf_counter() - start
                on_step(len(group))
            while True:
                live = [r for r in reqs if not r.finished]
                if not live:
                    break
                start = time.perf_counter()
                batch = ForwardBatch.build(
                    [[r.output_ids[-1]] for r in live],
                    [len(r.input_ids) + len(r.output_ids) - 1 for r in live],
                    [slots[r.rid] for r in live],
                    self.model.device,
                )
                self._append(live, self.model.forward(batch, cache))
                self.stats.decode_steps += 1
                self.stats.decode_tokens += len(live)
                self.stats.decode_s += time.perf_counter() - start
                on_step(len(live))
        finally:
            for s in slots.values():
                cache.free(s)

    def _append(self, reqs: list[Request], logits: torch.Tensor) -> None:
        tokens = sample(logits, [r.params for r in reqs], self.generator).tolist()
        for r, tok in zip(reqs, tokens):
            r.output_ids.append(tok)
            done = len(r.output_ids) >= r.params.max_new_tokens
            if not r.params.ignore_eos and tok == self.eos:
                done = True
            r.finished = done
