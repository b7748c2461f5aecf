"""Replication and bin-packing primitives shared by the placement policies, batched over rows.

A row is one MoE layer (global policy) or one layer on one node (hierarchical policy); every function works on
all rows at once so that planning 61 layers costs a few hundred small tensor ops, not 61 Python loops.

Shape legend (trailing comments): R rows, M labels (logical experts or groups), N items (replicas), B bins (GPUs or
nodes), S = N // B items per bin. Weights are float64; labels, counts and bin indices are int64.
Two items with the same label are replicas of one expert and must never share a bin.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Runs torch ops on one CPU thread, restoring the thread count after.

    Planning makes thousands of ops on tensors of a few thousand elements: splitting them over threads saves
    nothing, and on a busy machine every OpenMP barrier costs milliseconds (measured on 2 shared cores: 4 ms
    instead of 4 us per op).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def replicate(weight: torch.Tensor, num_items: int, cap: int) -> torch.Tensor:
    """Replica count per label that minimises the largest per-replica weight, at most `cap` replicas each.

    weight: `[R, M]` float64. Returns `[R, M]` int64 counts >= 1, each row summing to `num_items`.
    Greedy: each extra replica goes to the label whose replicas are heaviest. This is optimal for the
    per-replica maximum; ties go to the lowest label, so the result is deterministic.
    """
    rows, labels = weight.shape
    cnt = torch.ones(rows, labels, dtype=torch.int64)
    row_ids = torch.arange(rows)
    for _ in range(num_items - labels):
        per_replica = (weight / cnt).masked_fill(cnt >= cap, -1.0)  # [R, M]
        cnt[row_ids, per_replica.argmax(1)] += 1
    return cnt


def replicate_limited(weight: torch.Tensor, num_items: int, cap: int, limit: torch.Tensor) -> torch.Tensor:
    """Fewest replicas that keep each replica's weight <= `limit`; the slots left over split the lightest labels.

    weight: `[R, M]` float64; limit: `[R]` float64, at least the per-replica maximum `replicate` reaches, so
    that the minimum fits in `num_items`. Returns `[R, M]` int64 counts in [1, cap] summing to `num_items`.
    Why: `replicate` spends every spare slot on the hottest labels and so makes many heavy items, more than
    there are bins when the load is skewed; two of them then share a bin. Heavier but fewer replicas, with the
    spare slots turned into near-empty fillers, often pack far better. The caller tries several limits.
    """
    rows = weight.shape[0]
    cnt = torch.ceil(weight / limit.clamp_min(1e-300).unsqueeze(1)).clamp(1, cap).to(torch.int64)  # [R, M]
    left = num_items - cnt.sum(1)  # [R]
    short = left < 0  # only from rounding when `limit` equals the greedy optimum; fall back to it there
    if short.any():
        cnt[short] = replicate(weight[short], num_items, cap)
        left = left.clamp_min(0)
    row_ids = torch.arange(rows)
    for _ in range(int(left.max()) if rows else 0):
        lightest = (weight / cnt).masked_fill(cnt >= cap, float("inf")).argmin(1)  # [R]
        cnt[row_ids, lightest] += (left > 0).to(torch.int64)
        left = left - (left > 0).to(torch.int64)
    return cnt


def expand(cnt: torch.Tensor) -> torch.Tensor:
    """Labels of all replicas, each label repeated `cnt` times, ascending. cnt: `[R, M]` -> `[R, N]` int64."""
    rows, labels = cnt.shape
    return torch.repeat_interleave(torch.arange(labels).repeat(rows), cnt.flatten()).view(rows, -1)


def bin_loads(weight: torch.Tensor, bin_of: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Total weight per bin. weight, bin_of: `[R, N]` -> `[R, B]` float64."""
    return torch.zeros(weight.shape[0], num_bins, dtype=weight.dtype).scatter_add_(1, bin_of, weight)


def pack_greedy(weight: torch.Tensor, ids: torch.Tensor | None, num_bins: int) -> torch.Tensor:
    """Sorted greedy packing: heaviest item first, into the lightest bin that has room and lacks its label.

    weight: `[R, N]` float64; ids: `[R, N]` int64 labels whose items all carry one weight (replicas split an
    expert's load evenly), or None when every item is distinct. Returns bin_of `[R, N]` int64 with exactly
    N // B items in every bin. With `ids=None` this is the sorted greedy of DeepSeek's EPLB.
    """
    rows, items = weight.shape
    per_bin = items // num_bins
    if ids is None:
        ids = torch.arange(items).expand(rows, items)
    row_ids = torch.arange(rows)
    # Heaviest first; equal weights by label, so the replicas of a label come one after another and the
    # clash check needs only the bins of the current label's run, not a [R, B, M] table.
    by_label = torch.sort(ids, dim=1, stable=True).indices
    order = by_label.gather(1, torch.sort(weight.gather(1, by_label), dim=1, descending=True, stable=True).indices)
    w_sorted, lab_sorted = weight.gather(1, order), ids.gather(1, order)  # [R, N]
    bin_sorted = torch.zeros(rows, items, dtype=torch.int64)
    load = torch.zeros(rows, num_bins, dtype=weight.dtype)
    count = torch.zeros(rows, num_bins, dtype=torch.int64)
    run = torch.zeros(rows, num_bins, dtype=torch.bool)  # bins holding the current label's replicas
    prev = torch.full((rows,), -1, dtype=torch.int64)
    for k in range(items):
        label = lab_sorted[:, k]
        run &= (label == prev).unsqueeze(1)
        blocked = run | (count >= per_bin)  # [R, B]
        target = load.masked_fill(blocked, float("inf")).argmin(1)  # [R]
        stuck = blocked.all(1).nonzero().flatten()
        if stuck.numel():
            target[stuck] = _make_room(stuck, k, w_sorted, lab_sorted, bin_sorted, load, count, run, per_bin)
        bin_sorted[:, k] = target
        load[row_ids, target] += w_sorted[:, k]
        count[row_ids, target] += 1
        run[row_ids, target] = True
        prev = label
    return torch.empty_like(bin_sorted).scatter_(1, order, bin_sorted)


def _make_room(stuck, k, w_sorted, lab_sorted, bin_sorted, load, count, run, per_bin) -> torch.Tensor:
    """For rows where every bin with room already holds item k's label, frees a slot; returns `[len(stuck)]` bins.

    Edits bin_sorted, load and count of those rows in place. A full bin f without the label exists (the label
    has fewer replicas placed than there are bins), and f holds per_bin distinct labels, more than the open bin
    h holds, so some item of f can move to h without a clash. Moves the lightest such item: it disturbs least.
    """
    n = stuck.numel()
    sub = torch.arange(n)
    placed_w = w_sorted[stuck, :k]  # [n, k]
    placed_lab, placed_bin = lab_sorted[stuck, :k], bin_sorted[stuck, :k]
    ld, cnt = load[stuck], count[stuck]  # [n, B]
    h = ld.masked_fill(cnt >= per_bin, float("inf")).argmin(1)  # [n] lightest open bin
    f = ld.masked_fill((cnt < per_bin) | run[stuck], float("inf")).argmin(1)  # [n] lightest full bin lacking it
    in_h = (placed_bin == h.unsqueeze(1)).to(torch.int64)  # [n, k]
    h_holds = torch.zeros(n, int(placed_lab.max()) + 1, dtype=torch.int64).scatter_add_(1, placed_lab, in_h)
    label_in_h = h_holds.gather(1, placed_lab) > 0  # [n, k] placed item's label already sits in bin h
    movable = (placed_bin == f.unsqueeze(1)) & ~label_in_h
    moved = placed_w.masked_fill(~movable, float("inf")).argmin(1)  # [n]
    w = placed_w[sub, moved]
    bin_sorted[stuck, moved] = h
    load[stuck, f] -= w
    load[stuck, h] += w
    count[stuck, f] -= 1
    count[stuck, h] += 1
    return f


def deepseek_packing(
    local_load: torch.Tensor, num_items: int, num_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's replication and packing of one node: uncapped greedy counts, label-blind sorted greedy.

    local_load: `[R, M]`. Returns ids, weight and bin_of, each `[R, num_items]`; rows may put two replicas of one
    expert on one GPU (see `has_clash`).
    """
    cnt = replicate(local_load, num_items, num_items)  # [R, M]
    ids = expand(cnt)  # [R, N]
    weight = (local_load / cnt).gather(1, ids)  # [R, N]
    return ids, weight, pack_greedy(weight, None, num_bins)


def has_clash(ids: torch.Tensor, bin_of: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Rows where some bin holds two items of one label. ids, bin_of: `[R, N]` -> `[R]` bool."""
    keys = torch.sort(bin_of * num_labels + ids, dim=1).values  # [R, N]
    return (keys[:, 1:] == keys[:, :-1]).any(1)
