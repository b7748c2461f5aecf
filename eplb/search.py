"""Local search that improves a packing: swaps between bins, and moves of one replica slot between experts.

Batched over rows like `eplb.packing` (same shape legend: R rows, M labels, N items, B bins, S = N // B).
Every move either lowers the hottest bin of its row, or keeps it and lowers the sum of squared bin loads, so no
state comes back and the search ends; rows that cannot improve drop out. `perturb` adds seeded random restarts.
"""

from __future__ import annotations

import torch

from eplb.packing import bin_loads

# A move must lower the hottest bin by more than this fraction of its load: it keeps float noise from cycling.
_REL_TOL = 1e-9
# `_retarget` tries every label and every spare slot up to this many, and a shortlist of each beyond: the
# candidates' bin loads are [rows, slots per bin, candidates, bins], too large to build for all at DeepSeek scale.
_SHORTLIST = 32
# `perturb` leaves a row alone once its hottest bin is within this fraction of its target.
_MARGIN = 1e-4


def refine_swaps(weight: torch.Tensor, ids: torch.Tensor | None, bin_of: torch.Tensor, num_bins: int,
                 max_rounds: int) -> torch.Tensor:
    """Local search: swap one item of the hottest bin with one item of another bin while that lowers the hottest.

    weight: `[R, N]` float64; ids: `[R, N]` int64 labels or None (all items distinct); bin_of: `[R, N]` int64.
    Returns an improved copy of bin_of. Each round takes, in every row, the swap whose two bins end with the
    smallest maximum, so the sorted vector of bin loads falls lexicographically and the search ends. Swaps keep
    bin sizes and never bring two items of one label together.
    """
    rows, items = weight.shape
    per_bin = items // num_bins
    if ids is None:
        ids = torch.arange(items).expand(rows, items)
    num_labels = int(ids.max()) + 1
    bin_of = bin_of.clone()
    load = bin_loads(weight, bin_of, num_bins)  # [R, B]
    has = torch.zeros(rows, num_bins, num_labels, dtype=torch.bool)  # has[r, b, m]: bin b holds label m
    has[torch.arange(rows).unsqueeze(1), bin_of, ids] = True
    active = torch.arange(rows)
    for _ in range(max_rounds):
        n = active.numel()
        if n == 0:
            break
        w, lab, where, ld, occupied = weight[active], ids[active], bin_of[active], load[active], has[active]
        top_load, top = ld.max(1)  # [A]
        on_top = where == top.unsqueeze(1)  # [A, N]
        # Each bin holds exactly per_bin items, so the first per_bin after this sort are the hottest bin's.
        a_idx = torch.sort(on_top.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :per_bin]
        w_a, lab_a = w.gather(1, a_idx), lab.gather(1, a_idx)  # [A, S]
        delta = w_a.unsqueeze(2) - w.unsqueeze(1)  # [A, S, N] load leaving the hottest bin
        gap = top_load.unsqueeze(1) - ld.gather(1, where)  # [A, N] headroom of each item's bin; 0 on the hottest
        # The hottest bin falls by delta, the other rises to (hottest - gap + delta): the gain is the smaller.
        # It is <= 0 for items of the hottest bin itself and for equal-label pairs, so those need no mask.
        gain = torch.minimum(delta, gap.unsqueeze(1) - delta)
        clash_a = occupied.view(n, -1).gather(1, (where.unsqueeze(1) * num_labels + lab_a.unsqueeze(2)).view(n, -1))
        clash_b = occupied[torch.arange(n), top].gather(1, lab)  # [A, N] b's label already in the hottest bin
        gain.masked_fill_(clash_a.view_as(gain) | clash_b.unsqueeze(1), 0.0)
        best_gain, best = gain.view(n, -1).max(1)
        improving = best_gain > _REL_TOL * top_load
        if not improving.any():
            break
        i = improving.nonzero().flatten()
        r = active[i]
        a, b = a_idx[i, best[i] // items], best[i] % items
        g, h = top[i], where[i, b]
        la, lb = ids[r, a], ids[r, b]
        moved = weight[r, a] - weight[r, b]
        bin_of[r, a], bin_of[r, b] = h, g
        load[r, g] -= moved
        load[r, h] += moved
        has[r, g, la], has[r, h, lb] = False, False
        has[r, g, lb], has[r, h, la] = True, True
        active = r
    return bin_of


def balance_pairs(weight: torch.Tensor, ids: torch.Tensor, bin_of: torch.Tensor, num_bins: int,
                  max_rounds: int) -> torch.Tensor:
    """Evens out bins in pairs: heaviest with lightest, second with second-lightest, and so on.

    weight, ids, bin_of: `[R, N]` as in `refine_swaps`. Each round, in every pair, makes the one swap that
    brings the two loads closest (both end strictly between the old ones, so no bin exceeds the old hottest),
    all pairs at once. The sum of squared bin loads falls every round, so the search ends. Why: once no swap
    with the hottest bin helps, evening out the others opens new swaps for it; `refine` alternates the two.
    Returns an improved copy of bin_of.
    """
    rows, items = weight.shape
    per_bin, half = items // num_bins, num_bins // 2
    bin_of = bin_of.clone()
    active = torch.arange(rows)
    for _ in range(max_rounds):
        n = active.numel()
        if n == 0 or half == 0:
            break
        w, lab, where = weight[active], ids[active], bin_of[active]  # [A, N]
        load = bin_loads(w, where, num_bins)  # [A, B]
        by_bin = torch.argsort(where * items + torch.arange(items), dim=1).view(n, num_bins, per_bin)  # [A, B, S]
        ranked = torch.argsort(load, dim=1, descending=True, stable=True)  # [A, B]
        heavy, light = ranked[:, :half], ranked[:, num_bins - half:].flip(1)  # [A, H] each, paired in order
        a_items = by_bin.gather(1, heavy.unsqueeze(2).expand(n, half, per_bin))  # [A, H, S]
        b_items = by_bin.gather(1, light.unsqueeze(2).expand(n, half, per_bin))
        w_a, w_b = (w.gather(1, x.flatten(1)).view_as(x) for x in (a_items, b_items))
        l_a, l_b = (lab.gather(1, x.flatten(1)).view_as(x) for x in (a_items, b_items))
        spread = (load.gather(1, heavy) - load.gather(1, light)).view(n, half, 1, 1)  # [A, H, 1, 1]
        delta = w_a.unsqueeze(3) - w_b.unsqueeze(2)  # [A, H, S, S] load moving from heavy to light
        gain = delta * (spread - delta)  # half the fall of the pair's sum of squares; > 0 iff 0 < delta < spread
        # A swap may not bring a label into a bin that already holds it.
        a_in_light = (l_a.unsqueeze(3) == l_b.unsqueeze(2)).any(3, keepdim=True)  # a's label in the light bin
        b_in_heavy = (l_b.unsqueeze(2) == l_a.unsqueeze(3)).any(2, keepdim=True)  # b's label in the heavy bin
        gain.masked_fill_(a_in_light | b_in_heavy, 0.0)
        best_gain, best = gain.flatten(2).max(2)  # [A, H]
        improving = best_gain > _REL_TOL * spread.view(n, half).clamp_min(0) * load.max(1, keepdim=True).values
        if not improving.any():
            break
        r, pair = improving.nonzero().unbind(1)
        a = a_items[r, pair, best[r, pair] // per_bin]
        b = b_items[r, pair, best[r, pair] % per_bin]
        rows_global = active[r]
        bin_of[rows_global, a] = light[r, pair]
        bin_of[rows_global, b] = heavy[r, pair]
        active = active[improving.any(1)]
    return bin_of


def refine(
    label_load: torch.Tensor, cnt: torch.Tensor, ids: torch.Tensor, bin_of: torch.Tensor, num_bins: int,
    max_rounds: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local search over both the packing and the replica counts, until no move helps or `max_rounds` pass.

    label_load: `[R, M]` float64 load of each label; cnt: `[R, M]` int64 replicas (<= num_bins each);
    ids, bin_of: `[R, N]` int64. Each round runs `refine_swaps`, `balance_pairs` and `refine_swaps` again, then
    one move per row that hands a slot from an expert with spare replicas to another (see `_retarget`); rows
    where that move finds nothing are done. Returns improved copies of cnt, ids and bin_of.
    """
    cnt, ids, bin_of = cnt.clone(), ids.clone(), bin_of.clone()
    active = torch.arange(label_load.shape[0])
    for _ in range(max_rounds):
        weight = (label_load[active] / cnt[active]).gather(1, ids[active])  # [A, N]
        where = refine_swaps(weight, ids[active], bin_of[active], num_bins, max_rounds)
        evened = balance_pairs(weight, ids[active], where, num_bins, max_rounds)
        bin_of[active] = refine_swaps(weight, ids[active], evened, num_bins, max_rounds)
        moved = _retarget(label_load[active], cnt[active], ids[active], bin_of[active], num_bins)
        if moved is None:
            break
        better, slot, new_label = moved
        r = active[better]
        old_label = ids[r, slot]
        ids[r, slot] = new_label
        cnt[r, old_label] -= 1
        cnt[r, new_label] += 1
        active = r
    return cnt, ids, bin_of


def _retarget(label_load, cnt, ids, bin_of, num_bins):
    """The best single move per row that gives one slot of expert x (>= 2 replicas) to expert y instead.

    All `[A, ...]` as in `refine`. Two families can lower the hottest bin g: a slot on g changes its expert, or a
    slot elsewhere becomes another replica of an expert on g (whose replicas then all lighten). Each candidate's
    bin loads are computed exactly: x's other replicas grow, y's shrink, the slot's bin swaps x's share for y's.
    Returns None if no row improves, else (rows that improve `[A']` bool mask, slot `[A']`, new label `[A']`).
    """
    rows, labels = label_load.shape
    per_bin = ids.shape[1] // num_bins
    row_ids = torch.arange(rows)
    share = label_load / cnt  # [A, M] load of each replica now
    added = label_load / (cnt + 1)  # [A, M] load of each replica of y once y has one more
    grown = torch.where(cnt > 1, label_load / (cnt - 1).clamp_min(1) - share, torch.zeros(()))  # x loses one
    shrunk = share - added  # [A, M] per replica, y gains one
    load = bin_loads(share.gather(1, ids), bin_of, num_bins)  # [A, B]
    holds = torch.zeros(rows, labels, num_bins, dtype=load.dtype)  # holds[r, m, b] = 1.0: bin b has label m
    holds[row_ids.unsqueeze(1), ids, bin_of] = 1.0
    top_load, g = load.max(1)  # [A]
    on_g = bin_of == g.unsqueeze(1)  # [A, N]
    g_slots = torch.sort(on_g.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :per_bin]  # [A, S]
    g_labels = ids.gather(1, g_slots)  # [A, S]
    at_g = torch.nn.functional.one_hot(g, num_bins).to(load.dtype)  # [A, B]
    label_at_g = holds[row_ids, :, g] > 0  # [A, M]

    def pick(table, labels_idx):
        """table `[A, M]` looked up at labels_idx `[A, ...]`, with a trailing axis to broadcast over bins."""
        return table.gather(1, labels_idx.flatten(1)).view_as(labels_idx).unsqueeze(-1)

    def loads_after(slot_bin, x, y, x_holds, y_holds):
        """Bin loads `[A, ..., B]` once a slot in bin `slot_bin` (one-hot) turns from label x into label y."""
        return (load.view(rows, 1, 1, num_bins) + slot_bin * (pick(added, y) - pick(share, x))
                + x_holds * (1 - slot_bin) * pick(grown, x) - y_holds * pick(shrunk, y))

    # (i) a slot on g, holding x, becomes y, a label not on g: candidates [A, S, Y]. Beyond _SHORTLIST labels,
    # only those cheapest to add to g and those whose replicas would shed the most load elsewhere are tried.
    free = ~label_at_g  # [A, M]
    if labels <= _SHORTLIST:
        y_list = torch.arange(labels).expand(rows, labels)
    else:
        cheap = added.masked_fill(~free, float("inf")).topk(_SHORTLIST * 3 // 4, dim=1, largest=False).indices
        relief = (shrunk * cnt).masked_fill(~free, float("-inf")).topk(_SHORTLIST // 4, dim=1).indices
        y_list = torch.cat([cheap, relief], 1)  # [A, Y]
    num_y = y_list.shape[1]
    x1 = g_labels.unsqueeze(2).expand(rows, per_bin, num_y)
    y1 = y_list.unsqueeze(1).expand(rows, per_bin, num_y)
    x1_holds = holds.gather(1, g_labels.unsqueeze(2).expand(rows, per_bin, num_bins)).unsqueeze(2)  # [A, S, 1, B]
    y1_holds = holds.gather(1, y_list.unsqueeze(2).expand(rows, num_y, num_bins)).unsqueeze(1)  # [A, 1, Y, B]
    after1 = loads_after(at_g.view(rows, 1, 1, num_bins), x1, y1, x1_holds, y1_holds)  # [A, S, Y, B]
    ok1 = (cnt.gather(1, g_labels) > 1).unsqueeze(2) & free.gather(1, y_list).unsqueeze(1)  # [A, S, Y]

    # (ii) a slot off g whose expert has spare replicas becomes one more replica of a label y on g: [A, S, K].
    # Beyond _SHORTLIST such slots, those in the bins left lightest by the move are tried.
    spare = (cnt.gather(1, ids) > 1) & ~on_g  # [A, N]
    left = (load.gather(1, bin_of) - share.gather(1, ids)).masked_fill(~spare, float("inf"))  # [A, N]
    k = min(max(int(spare.sum(1).max()), 1), _SHORTLIST)
    cand = left.topk(k, dim=1, largest=False).indices  # [A, K]
    cand_ok = spare.gather(1, cand)  # [A, K]
    x2 = ids.gather(1, cand).unsqueeze(1).expand(rows, per_bin, k)
    y2 = g_labels.unsqueeze(2).expand(rows, per_bin, k)
    cand_bin = torch.nn.functional.one_hot(bin_of.gather(1, cand), num_bins).to(load.dtype).unsqueeze(1)  # [A,1,K,B]
    x2_holds = holds.gather(1, ids.gather(1, cand).unsqueeze(2).expand(rows, k, num_bins)).unsqueeze(1)
    y2_holds = holds.gather(1, g_labels.unsqueeze(2).expand(rows, per_bin, num_bins)).unsqueeze(2)  # [A, S, 1, B]
    after2 = loads_after(cand_bin, x2, y2, x2_holds, y2_holds)  # [A, S, K, B]
    y_at_slot = (y2_holds * cand_bin).sum(-1) > 0  # y already in the slot's bin (also covers y == x)
    ok2 = cand_ok.unsqueeze(1) & ~y_at_slot & (cnt.gather(1, g_labels) < num_bins).unsqueeze(2)

    # Score: the new hottest bin first; where no move lowers it, the sum of squared loads among the moves
    # that do not raise it (a sideways step that often opens the way, as `balance_pairs` does for swaps).
    peak = torch.cat([after1.max(-1).values.masked_fill(~ok1, float("inf")).flatten(1),
                      after2.max(-1).values.masked_fill(~ok2, float("inf")).flatten(1)], 1)  # [A, C]
    squares = torch.cat([after1.square().sum(-1).flatten(1), after2.square().sum(-1).flatten(1)], 1)
    best_peak, by_peak = peak.min(1)
    flat = squares.masked_fill(peak > top_load.unsqueeze(1), float("inf"))
    best_squares, by_squares = flat.min(1)
    lowers = best_peak < top_load * (1 - _REL_TOL)
    evens = best_squares < load.square().sum(1) * (1 - _REL_TOL)
    better = lowers | evens
    if not better.any():
        return None
    choice = torch.where(lowers, by_peak, by_squares)  # [A] index into the S*M + S*K candidates
    first = per_bin * num_y
    use2 = choice >= first
    arg1, arg2 = choice.clamp_max(first - 1), (choice - first).clamp_min(0)
    slot = torch.where(use2, cand.gather(1, (arg2 % k).unsqueeze(1)).squeeze(1),
                       g_slots.gather(1, (arg1 // num_y).unsqueeze(1)).squeeze(1))
    new_label = torch.where(use2, g_labels.gather(1, (arg2 // k).unsqueeze(1)).squeeze(1),
                            y_list.gather(1, (arg1 % num_y).unsqueeze(1)).squeeze(1))
    return better, slot[better], new_label[better]


def perturb(
    label_load: torch.Tensor, cnt: torch.Tensor, ids: torch.Tensor, bin_of: torch.Tensor, num_bins: int,
    target: torch.Tensor, max_kicks: int, budget: int, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iterated local search: random kicks, each followed by `refine`, kept only where the hottest bin drops.

    label_load, cnt: `[R, M]`; ids, bin_of: `[R, N]`; target: `[R]` float64, the peak below which a row needs no
    more work (a bound it cannot beat, or a level that does not matter). A kick is three random clash-free swaps
    and one random slot handed to another expert, starting from the row's best so far. Rows within `_MARGIN` of
    their target stop; the rest get up to `max_kicks` kicks while the rows x items kicked stay within `budget`,
    a size-based (not time-based) limit, so the result is deterministic. Returns improved copies.
    """
    gen = torch.Generator().manual_seed(seed)
    items = ids.shape[1]
    cnt, ids, bin_of = cnt.clone(), ids.clone(), bin_of.clone()
    peak = bin_loads((label_load / cnt).gather(1, ids), bin_of, num_bins).max(1).values  # [R]
    for _ in range(max_kicks):
        todo = (peak > target * (1 + _MARGIN)).nonzero().flatten()
        n = todo.numel()
        if n == 0 or n * items > budget:
            break
        budget -= n * items
        c, i, b = cnt[todo], ids[todo], bin_of[todo]  # copies (advanced indexing)
        r = torch.arange(n)
        for _ in range(3):
            a, z = torch.randint(0, items, (2, n), generator=gen)
            ba, bz, la, lz = b[r, a], b[r, z], i[r, a], i[r, z]
            a_there = ((b == bz.unsqueeze(1)) & (i == la.unsqueeze(1))).any(1)  # a's label already in z's bin
            z_there = ((b == ba.unsqueeze(1)) & (i == lz.unsqueeze(1))).any(1)
            ok = (ba != bz) & ~a_there & ~z_there
            b[r[ok], a[ok]], b[r[ok], z[ok]] = bz[ok], ba[ok]
        slot = torch.randint(0, items, (n,), generator=gen)
        new = torch.randint(0, label_load.shape[1], (n,), generator=gen)
        old, where = i[r, slot], b[r, slot]
        there = ((b == where.unsqueeze(1)) & (i == new.unsqueeze(1))).any(1)
        ok = (c[r, old] > 1) & ~there
        c[r[ok], old[ok]] -= 1
        c[r[ok], new[ok]] += 1
        i[r[ok], slot[ok]] = new[ok]
        c, i, b = refine(label_load[todo], c, i, b, num_bins, 4 * num_bins)
        kicked = bin_loads((label_load[todo] / c).gather(1, i), b, num_bins).max(1).values
        better = kicked < peak[todo] * (1 - _REL_TOL)
        keep = todo[better]
        cnt[keep], ids[keep], bin_of[keep], peak[keep] = c[better], i[better], b[better], kicked[better]
    return cnt, ids, bin_of
