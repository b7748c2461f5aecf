"""The bench's decode throughput before and after the timed run's first EPLB rebalance (`--enable-eplb`).

`StepHooks` is the runner's end-of-step callback in the bench: it logs each decode step's work, which
`rebalance_windows` splits at the first rebalance on each rank and `rebalance_throughput` sums over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from engine.step_timer import StepTimer


class StepHooks:
    """The runner's end-of-step callback in the bench: closes the step timer's step, logs decode work of the timed
    run (`decode_log`: job-wide step -> (output tokens, seconds) on this rank, from the runner's stats) and passes
    the step on to EPLB, except in the breakdown pass (which must neither record load nor rebalance)."""

    def __init__(self, eplb_on_step_end: Callable[[int], None]) -> None:
        self.eplb_on_step_end = eplb_on_step_end
        self.runner = None  # set once the runner exists: its stats give each step's decode work
        self.timer: StepTimer | None = None
        self.untimed_steps = 0  # steps of the breakdown pass that opened no timer step (no eager forward)
        self.logging = False
        self.decode_log: dict[int, tuple[int, float]] = {}
        self._seen = (0, 0.0)

    def start_log(self) -> None:
        self.logging, self.decode_log = True, {}
        self._seen = (self.runner.stats.decode_tokens, self.runner.stats.decode_s)

    def __call__(self, step: int) -> None:
        if self.timer is not None:
            self.untimed_steps += not self.timer.end_step()
            return
        if self.logging:
            stats = self.runner.stats
            tokens, seconds = stats.decode_tokens - self._seen[0], stats.decode_s - self._seen[1]
            if tokens:
                self.decode_log[step] = (tokens, seconds)
            self._seen = (stats.decode_tokens, stats.decode_s)
        self.eplb_on_step_end(step)


def rebalance_windows(decode_log: dict[int, tuple[int, float]], rebalance_steps: list[int]) -> list[float] | None:
    """This rank's decode work around the timed run's first rebalance: `[tokens, seconds]` of the decode steps up to
    and including the rebalancing step, then `[tokens, seconds]` of those after it up to the next rebalance (or the
    end). None when no rebalance fell inside the logged steps."""
    steps = sorted(decode_log)
    inside = [s for s in rebalance_steps if steps and steps[0] <= s <= steps[-1]]
    if not inside:
        return None
    first, nxt = inside[0], next((s for s in rebalance_steps if s > inside[0]), math.inf)
    before = [decode_log[s] for s in steps if s <= first]
    after = [decode_log[s] for s in steps if first < s <= nxt]
    return [sum(t for t, _ in before), sum(x for _, x in before), sum(t for t, _ in after), sum(x for _, x in after)]


def rebalance_throughput(windows: list[list[float] | None]) -> dict:
    """Job-wide decode output tokens/s before and after the timed run's first rebalance, from every rank's
    `rebalance_windows` (tokens summed over ranks, over the slowest rank's seconds); empty without a rebalance."""
    if any(w is None for w in windows):
        return {}
    before_s, after_s = max(w[1] for w in windows), max(w[3] for w in windows)
    out = {"throughput_before_rebalance": sum(w[0] for w in windows) / before_s if before_s > 0 else 0.0}
    if after_s > 0:  # a rebalance after the last decode step leaves nothing after it
        out["throughput_after_rebalance"] = sum(w[2] for w in windows) / after_s
    return out
