"""The `torch` dispatcher: expert parallelism over `torch.distributed.all_to_all_single` (gloo on CPU, NCCL on GPU).

The reference and fallback backend. Shapes: T tokens on this rank, K = top-k, H hidden, W ranks in the EP group,
L = num_local_slots (slot p lives on rank p // L). S rows sent (one per token per distinct destination rank),
R rows received, N = (received token, local slot) pairs, the rows the local experts compute.

dispatch:
1. for every token, the set of destination ranks; S send rows ordered by (destination rank, token);
2. all_to_all of a small count table (rows per rank, and how many local top-k entries they carry): the only host
   synchronisation, since split sizes must be on the host; every later size is derived from it without a sync;
3. all_to_all of the rows `[S, H]` and, beside them, each row's top-k restricted to its destination,
   `[S, K]` local slot ids (-1 elsewhere) and weights (0 elsewhere), packed into one int32 `[S, 2K]` message;
4. on the receiver, rows grouped by local slot (as `group_by_slot` does): the contiguous layout `[N, H]`.
combine:
1. each received row's local expert outputs, weighted and summed in top-k order (fp32 accumulation, y's dtype);
2. all_to_all back along the reverse splits, one row per (token, destination rank);
3. at home, the partial sums added in rank order (fixed order, so the result is deterministic); `[T, H]`.
Compared with `LocalDispatcher`, whose sum runs over all top-k at once, the only difference is that association
order: equal within fp32 rounding, and bit for bit on one rank.

Both directions have start/wait halves built on `async_op=True` (gloo and NCCL both return real work handles), so
two-batch overlap can compute one micro-batch while the other's rows travel. The count exchange inside
`dispatch_start` is synchronous: the row exchange cannot be posted before its sizes are known.
Every rank must call every half, in the same order, even with zero tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.errors import WideepError
from kernels.segment_sum import segment_sum, segment_sum_ref
from parallel.dispatcher import DispatchedTokens, Dispatcher, register_dispatcher


@dataclass(frozen=True)
class SegmentSum:
    """A fixed-order sum of row groups: `out[r] = sum_j weight[j] * rows[src[j]]`, j in `[indptr[r], indptr[r+1])`.

    Used twice: the receiver folds a row's local expert outputs in top-k order, and the home rank adds a token's
    per-rank partial sums in rank order. Each term is `float(row) * weight` in fp32, the adds run in term order in
    fp32 and the sum is rounded once, whichever implementation runs (`kernels.segment_sum`): the fused Triton kernel
    on CUDA, one pass over the terms with the accumulator in registers; the torch reference elsewhere.
    indptr: `[R + 1]` int64, each output row's first term (a CSR list, on the rows' device).
    src: `[M]` int64, the input row of each term; weight: `[M]` float32, or None for 1.
    step_sizes: host ints, output rows with more than j terms; they size the reference's steps without a sync.
    """

    indptr: torch.Tensor
    src: torch.Tensor
    weight: torch.Tensor | None
    step_sizes: list[int]

    def apply(self, rows: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """rows: `[M, H]` -> `[R, H]` in rows' dtype; fp32 accumulation (the order, and so the rounding, is fixed).

        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch"; all give the same bits.
        """
        if backend not in ("auto", "triton", "torch"):
            raise WideepError(f"SegmentSum backend {backend!r}: expected 'auto', 'triton' or 'torch'")
        if backend == "triton" or (backend == "auto" and rows.is_cuda):
            return segment_sum(rows.contiguous(), self.indptr, self.src, self.weight)
        return segment_sum_ref(rows.contiguous(), self.indptr, self.src, self.weight, step_sizes=self.step_sizes)


@dataclass(frozen=True)
class TorchA2AHandle:
    """What `combine` needs to undo one `dispatch`; returned to the caller, never kept on the dispatcher.

    send_token: `[S]` int64, the home token of each sent row, ordered by destination rank.
    send_splits / recv_splits: rows sent to / received from each rank, `W` ints each (host).
    fold: turns the expert outputs `[N, H]` into the partial sums `[R, H]` that go back (top-k order).
    gather: turns the returned partial sums `[S, H]` into the output `[T, H]` (rank order).
    num_rows: N, the dispatched rows `y` must answer.
    """

    send_token: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    fold: SegmentSum
    gather: SegmentSum
    num_rows: int


@dataclass
class _DispatchPending:
    """Posted row and metadata exchanges of one dispatch (between `dispatch_start` and `dispatch_wait`)."""

    works: list[Any]
    recv_x: torch.Tensor  # [R, H]
    recv_meta: torch.Tensor  # [R, 2K] int32: local slot ids, then weights' float32 bits
    send_token: torch.Tensor  # [S]
    send_splits: list[int]
    recv_splits: list[int]
    recv_deeper: list[int]  # [K]: received rows with more than j local top-k entries
    gather: SegmentSum  # home side of the combine, planned while the counts were on the host anyway


@dataclass
class _CombinePending:
    """A posted combine exchange (between `combine_start` and `combine_wait`)."""

    work: Any
    back: torch.Tensor  # [S, H] partial sums, one per (home token, destination rank)
    handle: TorchA2AHandle


@register_dispatcher("torch")
class TorchAllToAllDispatcher(Dispatcher):
    """EP dispatch/combine with two `all_to_all_single` exchanges each way (counts, then rows).

    state: this rank's `ParallelState`; its `group` (the EP group) is used unless `group` is given.
    num_local_slots: L, expert slots per rank. hidden_size: H. dtype: the dtype of `x` (checked on dispatch).
    """

    def __init__(
        self,
        state: Any = None,
        *,
        num_local_slots: int,
        hidden_size: int,
        dtype: torch.dtype,
        group: dist.ProcessGroup | None = None,
        **_: Any,
    ) -> None:
        self.group = group if group is not None else getattr(state, "group", None)
        if self.group is None and not dist.is_initialized():
            raise WideepError("--moe-a2a-backend torch needs a process group: build a ParallelState first")
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if num_local_slots < 1:
            raise WideepError(f"num_local_slots {num_local_slots} must be at least 1")
        self.num_local_slots = num_local_slots
        self.hidden_size = hidden_size
        self.dtype = dtype

    # ---- dispatch -----------------------------------------------------------------------------------------------

    def dispatch_start(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, mode: str = "prefill"
    ) -> _DispatchPending:
        """x: `[T, H]` self.dtype; topk_ids: `[T, K]` int64 physical slots, -1 = none; topk_weights: `[T, K]` float32.
        mode: ignored; the same exchange serves prefill and decode steps.

        Exchanges counts (blocking: the one host synchronisation of the dispatch), then posts the row and metadata
        exchanges; returns the pending exchange for `dispatch_wait`.
        """
        self._check_inputs(x, topk_ids, topk_weights)
        w, slots, dev = self.world_size, self.num_local_slots, x.device
        t, k = topk_ids.shape
        dest = torch.where(topk_ids >= 0, topk_ids // slots, -1)  # [T, K] destination rank
        # per_rank[t, r]: how many of token t's top-k live on rank r; column W counts ids past the last slot (an
        # error, reported below), column W + 1 the -1 entries. Scatter, not boolean indexing: no device sync.
        column = torch.where(topk_ids < 0, w + 1, dest.clamp(max=w))
        per_rank = torch.zeros(t, w + 2, dtype=torch.int64, device=dev).scatter_add_(1, column, torch.ones_like(column))
        local = per_rank[:, :w]  # [T, W]
        # table[r, j < K]: rows for rank r with more than j local entries (column 0: the row count itself);
        # table[r, K]: this rank's entries past the last slot, sent to everyone so that every rank raises together.
        deeper = (local.unsqueeze(-1) > torch.arange(k, device=dev)).sum(0)  # [W, K]
        table = torch.cat([deeper, per_rank[:, w].sum().expand(w, 1)], dim=1)  # [W, K + 1]
        recv_table = torch.empty_like(table)
        dist.all_to_all_single(recv_table, table, group=self.group)
        # spread[t]: ranks token t goes to; home[j]: tokens going to more than j ranks (sizes for the combine).
        spread = (local > 0).sum(1)  # [T]
        # [K + 1] to stack under the table (a token reaches at most K ranks, so the last entry is 0).
        home = (spread.unsqueeze(1) > torch.arange(k + 1, device=dev)).sum(0)
        counts = torch.cat([table, recv_table, home.unsqueeze(0)]).tolist()  # the one host sync
        sent, got, home_deeper = counts[:w], counts[w : 2 * w], counts[2 * w]
        bad = {src: row[k] for src, row in enumerate(got) if row[k]}
        if bad:
            raise WideepError(
                f"topk_ids hold entries past the last slot {w * slots - 1} ({w} ranks x {slots} slots) on rank(s) "
                + ", ".join(f"{src} ({n})" for src, n in bad.items())
                + "; the expert placement does not match --ep-size"
            )
        send_splits = [row[0] for row in sent]
        recv_splits = [row[0] for row in got]
        recv_deeper_total = [sum(row[j] for row in got) for j in range(k)]

        s = sum(send_splits)
        pairs = torch.nonzero_static(local.t() > 0, size=s)  # [S, 2] (rank, token), by rank, then token
        send_rank, send_token = pairs[:, 0], pairs[:, 1]
        mine = dest[send_token] == send_rank.unsqueeze(1)  # [S, K]: this k goes to this row's rank
        local_ids = torch.where(mine, topk_ids[send_token] - send_rank.unsqueeze(1) * slots, -1)
        weights = torch.where(mine, topk_weights[send_token], 0.0)
        send_meta = torch.cat([local_ids.to(torch.int32), weights.view(torch.int32)], dim=1)  # [S, 2K]
        send_x = x[send_token]  # [S, H]

        r = sum(recv_splits)
        recv_x = torch.empty(r, self.hidden_size, dtype=x.dtype, device=dev)
        recv_meta = torch.empty(r, 2 * k, dtype=torch.int32, device=dev)
        works = [
            dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits, group=self.group, async_op=True),
            dist.all_to_all_single(recv_meta, send_meta, recv_splits, send_splits, group=self.group, async_op=True),
        ]
        # Home side: each token's returned rows in rank order (the send order sorted by token, stable).
        by_token = torch.argsort(send_token, stable=True)  # [S]
        gather = _plan_segment_sum(by_token, spread, home_deeper, None)
        return _DispatchPending(works, recv_x, recv_meta, send_token, send_splits, recv_splits, recv_deeper_total,
                                gather)

    def dispatch_wait(self, pending: _DispatchPending) -> tuple[DispatchedTokens, TorchA2AHandle]:
        """Returns the contiguous layout (hidden `[N, H]`, tokens_per_expert `[L]`) and the handle for combine.

        No device synchronisation: every size needed here came with the counts.
        """
        for work in pending.works:
            work.wait()
        k = pending.recv_meta.shape[1] // 2
        local_ids = pending.recv_meta[:, :k].long()  # [R, K]
        weights = pending.recv_meta[:, k:].contiguous().view(torch.float32)  # [R, K]
        num_pairs = sum(pending.recv_deeper)
        token_index, tokens_per_slot, row = _group_by_slot(local_ids, self.num_local_slots, num_pairs)
        tokens = DispatchedTokens("contiguous", pending.recv_x[token_index], tokens_per_slot)
        # Receiver side: each received row's local (row, k) pairs in k order, i.e. flat index order.
        pairs = torch.nonzero_static(row.reshape(-1) >= 0, size=num_pairs).squeeze(1)  # [N] flat (row, k)
        fold = _plan_segment_sum(
            row.reshape(-1)[pairs], (local_ids >= 0).sum(1), pending.recv_deeper, weights.reshape(-1)[pairs]
        )
        handle = TorchA2AHandle(pending.send_token, pending.send_splits, pending.recv_splits, fold, pending.gather,
                                num_pairs)
        return tokens, handle

    # ---- combine ------------------------------------------------------------------------------------------------

    def combine_start(self, y: torch.Tensor, handle: TorchA2AHandle) -> _CombinePending:
        """y: `[N, H]`, the expert outputs row for row with the dispatched tokens. Posts the return exchange."""
        if y.dim() != 2 or tuple(y.shape) != (handle.num_rows, self.hidden_size):
            raise WideepError(
                f"combine got y of shape {tuple(y.shape)}; expected [{handle.num_rows}, {self.hidden_size}]"
            )
        partial = handle.fold.apply(y)  # [R, H], each row's local terms summed in top-k order
        back = torch.empty(sum(handle.send_splits), self.hidden_size, dtype=y.dtype, device=y.device)
        work = dist.all_to_all_single(
            back, partial, handle.send_splits, handle.recv_splits, group=self.group, async_op=True
        )
        return _CombinePending(work, back, handle)

    def combine_wait(self, pending: _CombinePending) -> torch.Tensor:
        """Returns `[T, H]` in y's dtype: each token's per-rank partial sums added at home in rank order (fp32)."""
        pending.work.wait()
        return pending.handle.gather.apply(pending.back)

    # ---- checks -------------------------------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.hidden_size or x.dtype != self.dtype:
            raise WideepError(
                f"dispatch got x {tuple(x.shape)} {x.dtype}; expected [T, {self.hidden_size}] {self.dtype}"
            )
        if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.dtype != torch.int64:
            raise WideepError(f"dispatch got topk_ids {tuple(topk_ids.shape)} {topk_ids.dtype}; expected [T, K] int64")
        if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
            raise WideepError(
                f"dispatch got topk_weights {tuple(topk_weights.shape)} {topk_weights.dtype}; "
                f"expected {tuple(topk_ids.shape)} float32"
            )


def _group_by_slot(
    local_ids: torch.Tensor, num_slots: int, num_pairs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`parallel.dispatcher.group_by_slot` for received rows, without a device sync (num_pairs is known).

    local_ids: `[R, K]` int64, -1 where that k is not on this rank. Returns (row index `[N]` int64 into the received
    rows, ordered by slot then (row, k); tokens per slot `[L]` int64; row `[R, K]` int64 into the N, -1 elsewhere).
    """
    r, k = local_ids.shape
    flat = local_ids.reshape(-1)
    key = torch.where(flat >= 0, flat, num_slots)  # non-local pairs sort last and are cut off
    order = torch.argsort(key, stable=True)[:num_pairs]
    per_slot = torch.zeros(num_slots + 1, dtype=torch.int64, device=flat.device)
    per_slot.scatter_add_(0, key, torch.ones_like(key))
    row = torch.full((r * k,), -1, dtype=torch.int64, device=flat.device)
    row[order] = torch.arange(num_pairs, device=flat.device)
    return order // k, per_slot[:num_slots], row.view(r, k)


def _plan_segment_sum(
    term_src: torch.Tensor, depth: torch.Tensor, deeper: list[int], term_weight: torch.Tensor | None
) -> SegmentSum:
    """Plan a `SegmentSum` without a device sync.

    term_src: `[M]` int64, the input row of every term, grouped by output row and in summation order within it.
    depth: `[R]` int64, terms per output row (the group sizes, in output-row order).
    deeper: host ints, deeper[j] = output rows with more than j terms (the step sizes).
    term_weight: `[M]` float32 per term, or None for plain sums.
    """
    indptr = torch.zeros(depth.shape[0] + 1, dtype=torch.int64, device=depth.device)
    torch.cumsum(depth, 0, out=indptr[1:])
    return SegmentSum(indptr, term_src.contiguous(), None if term_weight is None else term_weight.contiguous(),
                      list(deeper))
