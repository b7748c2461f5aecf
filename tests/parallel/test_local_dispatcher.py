"""The one-process dispatcher: a sort by slot and a weighted sum, against a direct loop."""

import torch

from parallel.dispatcher import LocalDispatcher


def reference(x, ids, w, fn):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            if ids[t, k] >= 0:
                out[t] += w[t, k] * fn(int(ids[t, k]), x[t])
    return out


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
    slot_of_row = torch.repeat_interleave(torch.arange(6), tokens.tokens_per_expert)
    y = tokens.hidden * scale[slot_of_row].unsqueeze(1)
    out = d.combine(y, handle)
    assert torch.allclose(out, reference(x, ids, w, lambda e, v: v * scale[e]), atol=1e-6)


def test_all_slots_none_and_empty_batch():
    d = LocalDispatcher(num_local_slots=4)
    x = torch.randn(3, 5)
    tokens, handle = d.dispatch(x, torch.full((3, 2), -1), torch.ones(3, 2))
    assert tokens.hidden.shape == (0, 5)
    assert torch.equal(d.combine(tokens.hidden, handle), torch.zeros(3, 5))
    tokens, handle = d.dispatch(torch.randn(0, 5), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2))
    assert d.combine(tokens.hidden, handle).shape == (0, 5)
