"""The dispatch/combine seam between routing and the expert GEMMs, its registry, and the one-process backend.

Shapes (T tokens on this rank, K experts per token, H hidden, E_local expert slots on this rank):
- `dispatch(x[T, H], topk_ids[T, K] int64 physical slot ids (-1 = none), topk_weights[T, K] float32)
  -> (DispatchedTokens, handle)`;
- `combine(y, handle) -> out[T, H]`, `y` in the layout of the `DispatchedTokens` it answers, row for row.
Each is split into a start and a wait half so two-batch overlap can run one micro-batch's communication under the
other's compute. The handle is returned to the caller and never kept on the dispatcher.

Combine sums a token's expert outputs in top-k slot order, `out[t] = sum_k w[t, k] * y[row(t, k)]`, whatever the
backend or EP size, so the summation order (and so the rounding) does not depend on where experts live.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from engine.errors import WideepError

StepMode = Literal["prefill", "decode"]


@dataclass
class DispatchedTokens:
    """Tokens as they reach this rank's expert slots, in one of the two layouts the expert GEMMs take.

    contiguous: hidden `[N', H]`, rows grouped by local slot in slot order; `tokens_per_expert[e]` rows each, and
    past their sum N <= N', padding rows that the experts need not compute (a static-shape dispatch has them).
    masked: hidden `[E_local, max_m, H]`; only the first `tokens_per_expert[e]` rows of slot e are valid.
    tokens_per_expert: `[E_local]` int64, on the device of `hidden`.
    scales: FP8 dispatch only: per-token 1x128 scales, `[N, H/128]` or `[E_local, max_m, H/128]` float32.
    """

    layout: Literal["contiguous", "masked"]
    hidden: torch.Tensor
    tokens_per_expert: torch.Tensor
    scales: torch.Tensor | None = None


@dataclass
class RowMap:
    """Where each (token, k) pair's expert output sits in the combined rows.

    row: `[T, K]` int64 row of `y` holding token t's k-th expert output (-1: no expert).
    weights: `[T, K]` float32 routing weights.
    """

    row: torch.Tensor
    weights: torch.Tensor

    def weighted_sum(self, y_rows: torch.Tensor) -> torch.Tensor:
        """y_rows: `[N, H]` -> `[T, H]` in y's dtype, summed in k order (fp32 accumulation).

        Rows of `y_rows` that no (token, k) pair points at are never read into the sum, so they may hold anything
        (the static-shape local dispatch leaves its unrouted rows unwritten by the expert kernels).
        """
        t, k = self.row.shape
        out = torch.zeros(t, y_rows.shape[-1], dtype=torch.float32, device=y_rows.device)
        if y_rows.shape[0] == 0:  # every pair was -1 (or this rank had no tokens): nothing to gather
            return out.to(y_rows.dtype)
        for j in range(k):
            r = self.row[:, j]
            valid = (r >= 0).unsqueeze(-1)
            # where, not a multiply by the mask: an unread row may be NaN, and NaN * 0 is NaN.
            picked = torch.where(valid, y_rows[r.clamp(min=0)].float() * self.weights[:, j].unsqueeze(-1), 0.0)
            out += picked
        return out.to(y_rows.dtype)


def group_by_slot(
    topk_ids: torch.Tensor, num_slots: int, slot_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort all (token, k) pairs by slot, those that target slots `[slot_offset, slot_offset + num_slots)` first.

    topk_ids: `[T, K]` int64 physical ids, -1 for none.
    Returns (token_index `[T * K]` int64, the token of each sorted pair: the N local pairs in slot order (flat
    (token, k) order within a slot), then the other pairs; tokens_per_slot `[num_slots]` int64, summing to N;
    row `[T, K]` int64, each local pair's place in the sorted order, -1 where not local).

    Every shape depends on T and K only and nothing is read on the host, so the grouping can be captured in a CUDA
    graph: the expert kernels compute the first N rows (the contiguous grouped GEMM reads the counts on the device)
    and combine never reads the rest.
    """
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    slot = flat - slot_offset
    local = (flat >= 0) & (slot >= 0) & (slot < num_slots)
    key = torch.where(local, slot, num_slots)  # [T*K] non-local pairs share the key past the last slot
    order = torch.argsort(key, stable=True)  # [T*K] flat pair at each sorted place
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel(), device=order.device)
    row = torch.where(local, place, -1)
    # scatter_add, not bincount: bincount sizes its output from the data, a device sync.
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=topk_ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return order // max(k, 1), counts[:num_slots], row.view(t, k)


class Dispatcher(ABC):
    """Moves tokens to the ranks that hold their expert slots and brings the weighted outputs back."""

    num_local_slots: int

    @abstractmethod
    def dispatch_start(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, mode: StepMode = "prefill"
    ) -> Any:
        """Begin sending; returns an opaque pending object for `dispatch_wait`.

        mode: the step's job-wide mode (`ForwardBatch.mode`); backends with separate prefill and decode kernels
        (DeepEP normal / low-latency) choose by it, the same on every rank.
        """

    @abstractmethod
    def dispatch_wait(self, pending: Any) -> tuple[DispatchedTokens, Any]:
        """Finish the dispatch; returns the tokens for the local experts and the handle `combine` needs."""

    @abstractmethod
    def combine_start(self, y: torch.Tensor, handle: Any) -> Any:
        """Begin returning expert outputs `y` (layout of the dispatched tokens)."""

    @abstractmethod
    def combine_wait(self, pending: Any) -> torch.Tensor:
        """Finish the combine; returns `[T, H]`, the weighted sum of each token's expert outputs."""

    def close(self) -> None:
        """Frees communication buffers (a collective for backends that own some: every rank calls it)."""

    # ---- CUDA graphs (engine.cuda_graph) ----------------------------------------------------------------------

    def graph_unsupported(self, mode: StepMode) -> str | None:
        """Why this backend's `mode` steps cannot be captured in a CUDA graph (None: they can: no host sync, and
        shapes that depend only on the number of tokens). The default is the conservative answer."""
        return f"the {type(self).__name__} reads token counts on the host during dispatch"

    @property
    def graph_max_tokens(self) -> int | None:
        """The most tokens one rank may bring to a captured step (None: no limit of the backend's own)."""
        return None

    def before_graph_replay(self, mode: StepMode) -> None:
        """Host-side work a `mode` step needs before its graph is replayed (the eager dispatch does it itself)."""

    def agree_max(self, value: int) -> int:
        """The largest `value` over the ranks this dispatcher exchanges tokens with; a collective for backends that
        span ranks (every rank calls it), so that all of them capture the same graphs."""
        return value

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, mode: StepMode = "prefill"):
        return self.dispatch_wait(self.dispatch_start(x, topk_ids, topk_weights, mode))

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return self.combine_wait(self.combine_start(y, handle))


_REGISTRY: dict[str, Callable[..., Dispatcher]] = {}


def register_dispatcher(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise RuntimeError(f"dispatcher '{name}' registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


def make_dispatcher(name: str, **kwargs: Any) -> Dispatcher:
    """Build the backend registered under `name` (`--moe-a2a-backend`)."""
    if name not in _REGISTRY:
        raise WideepError(f"--moe-a2a-backend {name!r} is not known; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def available_dispatchers() -> list[str]:
    return sorted(_REGISTRY)


@register_dispatcher("local")
class LocalDispatcher(Dispatcher):
    """One process holds every slot: dispatch is a sort by slot, combine a weighted sum. No communication."""

    def __init__(self, num_local_slots: int, **_: Any) -> None:
        self.num_local_slots = num_local_slots

    def graph_unsupported(self, mode: StepMode) -> str | None:
        return None  # static shapes, no host sync (group_by_slot)

    def dispatch_start(self, x, topk_ids, topk_weights, mode="prefill"):
        token_index, counts, row = group_by_slot(topk_ids, self.num_local_slots)
        tokens = DispatchedTokens("contiguous", x[token_index], counts)
        return tokens, RowMap(row, topk_weights.float())

    def dispatch_wait(self, pending):
        return pending

    def combine_start(self, y, handle: RowMap):
        return handle.weighted_sum(y)

    def combine_wait(self, pending):
        return pending
