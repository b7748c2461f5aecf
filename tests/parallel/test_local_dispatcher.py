"""The one-process dispatcher: a static-shape sort by slot and a weighted sum, against a direct loop and against the
data-dependent grouping it replaced (`nonzero` + `bincount`, a host sync each)."""

import pytest
import torch

from parallel.dispatcher import LocalDispatcher, group_by_slot


def reference(x, ids, w, fn):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            if ids[t, k] >= 0:
                out[t] += w[t, k] * fn(int(ids[t, k]), x[t])
    return out


def group_by_slot_nonzero(topk_ids, num_slots, slot_offset=0):
    """The old grouping: only the local pairs, found with `nonzero`, counted with `bincount`."""
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1) - slot_offset
    local = (topk_ids.reshape(-1) >= 0) & (flat >= 0) & (flat < num_slots)
    pairs = local.nonzero().squeeze(1)
    pairs = pairs[torch.argsort(flat[pairs], stable=True)]
    row = torch.full((t * k,), -1, dtype=torch.int64)
    row[pairs] = torch.arange(pairs.numel())
    counts = torch.bincount(flat[pairs], minlength=num_slots)[:num_slots]
    return pairs // k, counts, row.view(t, k)


def experts(tokens, scale):
    """Row * scale[slot] for the counted rows; NaN in the padding rows, which combine must never read."""
    n = int(tokens.tokens_per_expert.sum())
    slot_of_row = torch.repeat_interleave(torch.arange(len(scale)), tokens.tokens_per_expert)
    y = torch.full_like(tokens.hidden, float("nan"))
    y[:n] = tokens.hidden[:n] * scale[slot_of_row].unsqueeze(1)
    return y


def test_local_dispatch_combine_matches_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 8, generator=g)
    ids = torch.randint(-1, 6, (13, 3), generator=g)
    w = torch.rand(13, 3, generator=g)
    scale = torch.arange(1.0, 7.0)
    d = LocalDispatcher(num_local_slots=6)
    tokens, handle = d.dispatch(x, ids, w)
    assert tokens.layout == "contiguous" and tokens.tokens_per_expert.tolist() == [
        int((ids == e).sum()) for e in range(6)]
    assert tokens.hidden.shape == (13 * 3, 8)  # static: every pair has a row, the -1 ones past the counts
    out = d.combine(experts(tokens, scale), handle)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, reference(x, ids, w, lambda e, v: v * scale[e]), atol=1e-6)


@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("tokens", [0, 1, 17])
def test_static_grouping_extends_the_nonzero_grouping(tokens, offset):
    """The first N sorted pairs, the counts and the rows of the local pairs are exactly the old grouping's."""
    g = torch.Generator().manual_seed(tokens + offset)
    ids = torch.randint(-1, 10, (tokens, 4), generator=g)
    token_index, counts, row = group_by_slot(ids, 5, offset)
    old_index, old_counts, old_row = group_by_slot_nonzero(ids, 5, offset)
    n = old_index.numel()
    assert token_index.shape == (tokens * 4,) and counts.shape == (5,) and row.shape == (tokens, 4)
    assert torch.equal(token_index[:n], old_index)
    assert torch.equal(counts, old_counts)
    assert torch.equal(row, old_row)
    assert int(counts.sum()) == n


def test_all_slots_none_and_empty_batch():
    d = LocalDispatcher(num_local_slots=4)
    x = torch.randn(3, 5)
    tokens, handle = d.dispatch(x, torch.full((3, 2), -1), torch.ones(3, 2))
    assert tokens.tokens_per_expert.tolist() == [0, 0, 0, 0] and tokens.hidden.shape == (6, 5)
    y = torch.full_like(tokens.hidden, float("nan"))  # no row is counted: none may be read
    assert torch.equal(d.combine(y, handle), torch.zeros(3, 5))
    tokens, handle = d.dispatch(torch.randn(0, 5), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2))
    assert tokens.hidden.shape == (0, 5) and tokens.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert d.combine(tokens.hidden, handle).shape == (0, 5)


def test_local_dispatcher_is_capturable_in_decode_and_prefill():
    d = LocalDispatcher(num_local_slots=4)
    assert d.graph_unsupported("decode") is None and d.graph_unsupported("prefill") is None
    assert d.graph_max_tokens is None and d.agree_max(7) == 7
