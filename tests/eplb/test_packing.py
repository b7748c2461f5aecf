"""Replication and packing primitives: optimal greedy replication, clash-free greedy packing, local search."""

from __future__ import annotations

import itertools

import torch

from eplb.packing import (
    bin_loads,
    expand,
    has_clash,
    one_cpu_thread,
    pack_greedy,
    replicate,
    replicate_limited,
)
from eplb.search import balance_pairs, refine, refine_swaps


def test_replicate_minimises_the_largest_replica():
    gen = torch.Generator().manual_seed(0)
    weight = torch.rand(20, 4, generator=gen, dtype=torch.float64) * 10  # [R, M]
    cnt = replicate(weight, 9, cap=5)
    assert (cnt.sum(1) == 9).all() and (cnt >= 1).all() and (cnt <= 5).all()
    for r in range(20):
        best = min(
            max(float(weight[r, m]) / c[m] for m in range(4))
            for c in itertools.product(range(1, 6), repeat=4) if sum(c) == 9
        )
        assert abs(float((weight[r] / cnt[r]).max()) - best) < 1e-12


def test_replicate_limited_keeps_replicas_under_the_limit():
    weight = torch.tensor([[90.0, 30.0, 5.0, 0.0, 1.0]], dtype=torch.float64)
    floor = (weight / replicate(weight, 12, 4)).max(1).values
    cnt = replicate_limited(weight, 12, 4, floor * 1.5)
    assert int(cnt.sum()) == 12 and (cnt <= 4).all()
    assert float((weight / cnt).max()) <= float(floor * 1.5)
    # Fewer replicas for the hot experts than the greedy gives; the spare slots go to the lightest expert
    # (no load at all: its replicas are free fillers) up to one per bin.
    assert int(cnt[0, 0]) < int(replicate(weight, 12, 4)[0, 0])
    assert int(cnt[0, 3]) == 4


def test_expand():
    assert expand(torch.tensor([[2, 1, 3]])).tolist() == [[0, 0, 1, 2, 2, 2]]


def reference_lpt(weight: list[float], bins: int) -> list[int]:
    """DeepSeek's sorted greedy written plainly: heaviest first into the lightest bin with room."""
    per_bin = len(weight) // bins
    load, count, out = [0.0] * bins, [0] * bins, [0] * len(weight)
    for item in sorted(range(len(weight)), key=lambda i: -weight[i]):
        target = min((b for b in range(bins) if count[b] < per_bin), key=lambda b: load[b])
        out[item], load[target], count[target] = target, load[target] + weight[item], count[target] + 1
    return out


def test_pack_greedy_without_labels_is_the_sorted_greedy():
    gen = torch.Generator().manual_seed(1)
    weight = torch.rand(6, 24, generator=gen, dtype=torch.float64)
    got = pack_greedy(weight, None, 4)
    for r in range(6):
        assert got[r].tolist() == reference_lpt(weight[r].tolist(), 4)


def test_pack_greedy_frees_a_slot_when_every_open_bin_holds_the_label():
    # Three bins of three. The two heavy items take bins 0 and 1, the light ones fill bin 2; then the three
    # replicas of label 5 find bin 1 and bin 0 and no third bin without label 5: an item must move.
    weight = torch.tensor([[100.0, 99.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.1]], dtype=torch.float64)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 5, 5, 6]])
    bin_of = pack_greedy(weight, ids, 3)
    assert torch.bincount(bin_of[0], minlength=3).tolist() == [3, 3, 3]
    assert not has_clash(ids, bin_of, 7).any()


def test_pack_greedy_random_clash_free():
    gen = torch.Generator().manual_seed(2)
    label_load = torch.rand(40, 10, generator=gen, dtype=torch.float64) ** 4
    cnt = replicate(label_load, 20, 4)
    ids = expand(cnt)
    weight = (label_load / cnt).gather(1, ids)
    bin_of = pack_greedy(weight, ids, 4)
    assert not has_clash(ids, bin_of, 10).any()
    assert (torch.stack([torch.bincount(b, minlength=4) for b in bin_of]) == 5).all()


def test_local_search_only_improves_and_keeps_the_rules():
    gen = torch.Generator().manual_seed(3)
    label_load = torch.rand(30, 12, generator=gen, dtype=torch.float64) ** 3
    cnt = replicate(label_load, 24, 6)
    ids = expand(cnt)
    weight = (label_load / cnt).gather(1, ids)
    start = torch.arange(24).remainder(6).expand(30, 24).contiguous()  # round robin: no clash, poor balance
    start_peak = bin_loads(weight, start, 6).max(1).values
    with one_cpu_thread():
        swapped = refine_swaps(weight, ids, start, 6, 200)
        evened = balance_pairs(weight, ids, swapped, 6, 200)
        cnt2, ids2, bins2 = refine(label_load, cnt, ids, start, 6, 50)
    for bins in (swapped, evened):
        assert not has_clash(ids, bins, 12).any()
        assert (bin_loads(weight, bins, 6).max(1).values <= start_peak + 1e-12).all()
    assert (bin_loads(weight, swapped, 6).max(1).values < start_peak).any()
    assert (cnt2.sum(1) == 24).all() and (cnt2 >= 1).all() and (cnt2 <= 6).all()
    assert torch.equal(cnt2, torch.stack([torch.bincount(i, minlength=12) for i in ids2]))
    assert not has_clash(ids2, bins2, 12).any()
    peak2 = bin_loads((label_load / cnt2).gather(1, ids2), bins2, 6).max(1).values
    assert (peak2 <= start_peak + 1e-12).all()


def test_one_cpu_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with one_cpu_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
