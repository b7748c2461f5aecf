"""Where a step's time goes: attention, local expert GEMMs, dispatch, combine, and the rest.

The model marks spans with `scope(category)`; a benchmark activates a `StepTimer` for a measuring pass and brackets
each step with `begin_step(mode)` / `end_step()`. `rest` is the step's time minus its spans (norms, router, shared
expert, dense MLPs, embedding, lm_head, sampling and launch gaps).

On CUDA a span is two `torch.cuda.Event`s on the current stream: no host synchronisation inside a step; the events
are read once, in `end_step`, after the step's own sync (sampled tokens come back to the host). On one stream the
time between two events is the step time the span takes, launch gaps included. On the CPU spans are
`time.perf_counter` readings (CPU ops run synchronously).

Spans do not nest (an inner scope is ignored, so spans never overlap and their sum stays within the step), and a
scope is a no-op while a CUDA graph is being captured: replays run no Python, so graphs hide the spans and a
breakdown must be measured eagerly.

The active timer is module state, as torch.profiler's is: `activate(timer)` sets it for a `with` block and refuses
a second one. With none active, `scope` returns one shared `nullcontext`: a global read and a comparison.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager

import torch

CATEGORIES = ("attention", "experts", "dispatch", "combine")
MODES = ("prefill", "decode")

_NULL = contextlib.nullcontext()
_active: StepTimer | None = None


def scope(category: str) -> AbstractContextManager:
    """Marks the enclosed work as `category` (one of CATEGORIES) on the active timer, if any."""
    timer = _active
    return _NULL if timer is None else timer.scope(category)


@contextlib.contextmanager
def activate(timer: StepTimer) -> Iterator[StepTimer]:
    """Makes `timer` the one `scope` reports to, for the `with` block."""
    global _active
    if _active is not None:
        raise RuntimeError("a StepTimer is already active; step timing passes do not nest")
    _active = timer
    try:
        yield timer
    finally:
        _active = None


class StepTimer:
    """Sums span and step times per step mode.

    seconds[mode][category]: seconds summed over the mode's steps (category in CATEGORIES, or "total" for whole
    steps); steps[mode]: steps ended. Spans outside a step (between `end_step` and the next `begin_step`) are not
    counted.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = {m: dict.fromkeys((*CATEGORIES, "total"), 0.0) for m in MODES}
        self.steps = dict.fromkeys(MODES, 0)
        self._mode: str | None = None  # the open step's mode, None between steps
        self._start = None  # the open step's start: an Event on CUDA, perf_counter seconds on the CPU
        self._spans: list[tuple[str, object, object]] = []  # (category, start, end) of the open step
        self._in_span = False
        self._pool: list[torch.cuda.Event] = []  # events read in an earlier step, recorded again

    def _now(self):
        if self.cuda:
            event = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def _capturing(self) -> bool:
        return self.cuda and torch.cuda.is_current_stream_capturing()

    def begin_step(self, mode: str) -> None:
        """Opens a step of `mode` ("prefill" or "decode"), ending one left open (its time runs to here). Nothing
        while a CUDA graph is being captured (a captured forward is no step)."""
        if mode not in MODES:
            raise ValueError(f"step mode {mode!r}: expected one of {MODES}")
        if self._capturing():
            return
        if self._mode is not None:
            self.end_step()
        self._mode, self._start, self._spans = mode, self._now(), []

    def end_step(self) -> bool:
        """Closes the open step and adds its spans and its total; False when no step was open (a step that never
        began one: a replayed CUDA graph runs no Python)."""
        if self._mode is None:
            return False
        end = self._now()
        if self.cuda:
            end.synchronize()  # after the step's own host sync, so this waits for next to nothing
        sums = self.seconds[self._mode]
        for category, a, b in self._spans:
            sums[category] += self._elapsed(a, b)
        sums["total"] += self._elapsed(self._start, end)
        if self.cuda:
            self._pool += [end, self._start, *(e for _, a, b in self._spans for e in (a, b))]
        self.steps[self._mode] += 1
        self._mode, self._start, self._spans = None, None, []
        return True

    def scope(self, category: str) -> AbstractContextManager:
        if category not in CATEGORIES:
            raise ValueError(f"step timer category {category!r}: expected one of {CATEGORIES}")
        if self._mode is None or self._in_span or self._capturing():
            return _NULL
        return self._span(category)

    @contextlib.contextmanager
    def _span(self, category: str) -> Iterator[None]:
        self._in_span = True
        start = self._now()
        try:
            yield
        finally:
            self._spans.append((category, start, self._now()))
            self._in_span = False

    def shares(self, mode: str) -> dict[str, float] | None:
        """Fractions of the mode's step time: each category, `rest` (they sum to 1) and `dispatch_combine`
        (dispatch + combine, counted once above). None when no step of the mode ran."""
        sums = self.seconds[mode]
        if self.steps[mode] == 0 or sums["total"] <= 0.0:
            return None
        total = sums["total"]
        out = {c: sums[c] / total for c in CATEGORIES}
        out["rest"] = max(1.0 - sum(out.values()), 0.0)
        out["dispatch_combine"] = out["dispatch"] + out["combine"]
        return out

    def mean_step_ms(self, mode: str) -> float:
        return 1e3 * self.seconds[mode]["total"] / max(self.steps[mode], 1)


def max_shares(per_rank: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per mode and key, the largest share over ranks (`per_rank[r][mode][key]`; modes a rank lacks are skipped)."""
    out: dict[str, dict[str, float]] = {}
    for shares in per_rank:
        for mode, values in shares.items():
            seen = out.setdefault(mode, {})
            for key, value in values.items():
                seen[key] = max(seen.get(key, value), value)
    return out
