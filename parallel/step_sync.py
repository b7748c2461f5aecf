"""How the ranks of a data-parallel-attention job agree, step by step, on whether to run and in which mode.

Every MoE layer is a collective, so a rank with no requests left must still run each step (with zero tokens) until
every rank is done; and all ranks must use the same dispatch mode (prefill when any rank prefills).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator

import torch
import torch.distributed as dist

from parallel.state import ParallelState
from parallel.watchdog import Watchdog


class StepSync:
    """One process: nothing to agree with."""

    def agree(self, has_work: bool, prefill: bool) -> tuple[bool, bool]:
        """(this rank has a step to run, that step prefills) -> (any rank has one, any rank prefills)."""
        return has_work, prefill

    def guard(self, step: int, what: str) -> ContextManager[None]:
        """Wraps a step that may wait on other ranks (a no-op on one process)."""
        return contextlib.nullcontext()

    def gather(self, obj: object) -> list[object] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        return [obj]

    def barrier(self) -> None:
        pass


LocalStepSync = StepSync


class DistributedStepSync(StepSync):
    """All ranks of `state`'s group; each wait runs under the watchdog so a dead rank is named, not waited on."""

    def __init__(self, state: ParallelState, watchdog: Watchdog | None = None) -> None:
        self.state = state
        self.watchdog = watchdog

    def agree(self, has_work: bool, prefill: bool) -> tuple[bool, bool]:
        # A CPU tensor: the default group runs gloo for CPU tensors, so this needs no GPU copy or stream sync.
        flags = torch.tensor([int(has_work), int(prefill)], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.state.group)
        return bool(flags[0]), bool(flags[1])

    @contextlib.contextmanager
    def guard(self, step: int, what: str) -> Iterator[None]:
        if self.watchdog is None:
            yield
        else:
            with self.watchdog.guard(step, what):
                yield

    def gather(self, obj: object) -> list[object] | None:
        out = [None] * self.state.world_size if self.state.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.state.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.state.group)
