"""Grouped top-k routing against a direct reading of the official rule."""


import torch

from kernels.router import grouped_topk


def brute_force(logits, bias, top_k, n_group, topk_group, scale):
    """Enumerates group choices: the kept groups are the best `topk_group` by the sum of their top-2 biased scores."""
    scores = logits.sigmoid()
    biased = scores + bias
    e = logits.shape[-1]
    per = e // n_group
    ids, weights = [], []
    for t in range(logits.shape[0]):
        gs = [sorted(biased[t, g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_group)]
        gscore = torch.tensor([sum(x) for x in gs])
        kept = set(torch.argsort(gscore, descending=True, stable=True)[:topk_group].tolist())
        cands = [i for i in range(e) if i // per in kept]
        best = sorted(cands, key=lambda i: (-biased[t, i].item(), i))[:top_k]
        w = scores[t, best]
        ids.append(sorted(best))
        weights.append(dict(zip(best, (w / w.sum() * scale).tolist())))
    return ids, weights


def test_matches_brute_force_with_negative_bias():
    g = torch.Generator().manual_seed(0)
    for n_group, topk_group, top_k in [(4, 2, 4), (8, 4, 8), (1, 1, 3), (4, 1, 2)]:
        logits = torch.randn(37, 32, generator=g) * 2
        # Strongly negative biases: kept-group experts get negative biased scores, which a 0-mask would lose to.
        bias = torch.randn(32, generator=g) - 1.5
        ids, w = grouped_topk(logits, bias, top_k, n_group, topk_group, 2.5)
        ref_ids, ref_w = brute_force(logits, bias, top_k, n_group, topk_group, 2.5)
        for t in range(logits.shape[0]):
            assert sorted(ids[t].tolist()) == ref_ids[t]
            for i, wt in zip(ids[t].tolist(), w[t].tolist()):
                assert abs(wt - ref_w[t][i]) < 1e-6


def test_excluded_groups_masked_to_minus_inf_not_zero():
    # 2 groups of 4 experts; group 0 wins on its top-2 but its other experts have negative biased scores.
    logits = torch.zeros(1, 8)
    bias = torch.tensor([5.0, 5.0, -3.0, -3.0, 0.0, 0.0, 0.0, 0.0])
    ids, _ = grouped_topk(logits, bias, top_k=4, n_group=2, topk_group=1, routed_scaling_factor=1.0)
    # With a 0.0 mask, experts of group 1 (score 0) would beat experts 2 and 3 (biased score -2.5).
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3]


def test_bias_selects_but_does_not_weight():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([10.0, 10.0, 0.0, 0.0])
    ids, w = grouped_topk(logits, bias, top_k=2, n_group=1, topk_group=1, routed_scaling_factor=1.0)
    assert sorted(ids[0].tolist()) == [0, 1]
    s = torch.sigmoid(torch.tensor([0.0, 1.0]))
    expected = dict(zip([0, 1], (s / s.sum()).tolist()))
    for i, wt in zip(ids[0].tolist(), w[0].tolist()):
        assert abs(wt - expected[i]) < 1e-6


def test_no_renormalisation_keeps_raw_scores_times_scale():
    logits = torch.randn(5, 16)
    ids, w = grouped_topk(logits, torch.zeros(16), 4, 4, 2, 2.5, renormalize=False)
    assert torch.allclose(w, logits.sigmoid().gather(1, ids) * 2.5)


def test_every_choice_lies_in_kept_groups():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 64, generator=g)
    bias = torch.randn(64, generator=g)
    ids, _ = grouped_topk(logits, bias, 8, 8, 3, 1.0)
    for row in ids.tolist():
        assert len({i // 8 for i in row}) <= 3
        assert len(set(row)) == 8
