"""DeepSeek-V3 routing (`noaux_tc`): the pure-torch reference.

sigmoid scores; `e_score_correction_bias` added for *selection only*; experts in `n_group` groups, a group scored by
the sum of its top-2 biased scores; only the best `topk_group` groups stay, the rest masked to -inf (not 0, so a
negative biased score in a kept group still beats any expert of an excluded group); top-k over what is left; the
weights are the *unbiased* scores of the chosen experts, renormalised, times `routed_scaling_factor`.
"""

from __future__ import annotations

import torch


def grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: `[T, E]` float32; correction_bias: `[E]` float32.

    Returns (topk_ids `[T, K]` int64 logical expert ids, topk_weights `[T, K]` float32).
    Ties are broken as `torch.topk` breaks them (the lower index first on CPU).
    """
    t, e = router_logits.shape
    scores = router_logits.float().sigmoid()
    biased = scores + correction_bias.float()
    if n_group > 1:
        group_scores = biased.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)  # [T, G]
        kept = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        keep = keep.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        biased = biased.masked_fill(~keep, float("-inf"))
    topk_ids = biased.topk(top_k, dim=-1).indices
    weights = scores.gather(1, topk_ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return topk_ids, weights * routed_scaling_factor
