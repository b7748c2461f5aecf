"""DeepSeek-V3 routing (`noaux_tc`): the pure-torch reference, and `route`, which picks a backend for it.

sigmoid scores; `e_score_correction_bias` added for *selection only*; experts in `n_group` groups, a group scored by
the sum of its top-2 biased scores; only the best `topk_group` groups stay, the rest masked to -inf (not 0, so a
negative biased score in a kept group still beats any expert of an excluded group); top-k over what is left; the
weights are the *unbiased* scores of the chosen experts, renormalised, times `routed_scaling_factor`.

Ties (equal biased scores, or equal group scores) go to the lower index. `torch.topk` does not promise that: on the
CPU it returns an arbitrary member of a tie (all-zero scores of 256 experts give ids 172, 169, ...), so the reference
ranks with a stable descending sort instead, and the fused Triton router follows the same rule.
"""

from __future__ import annotations

import torch

ROUTER_BACKENDS = ("auto", "torch", "triton")


def _top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim, best first, ties to the lower index."""
    return x.sort(dim=-1, descending=True, stable=True).indices[..., :k]


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

    Returns (topk_ids `[T, K]` int64 logical expert ids, best first; topk_weights `[T, K]` float32).
    Ties go to the lower expert (or group) index.
    """
    t, e = router_logits.shape
    scores = router_logits.float().sigmoid()
    biased = scores + correction_bias.float()
    if n_group > 1:
        group_scores = biased.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)  # [T, G]
        kept = _top_indices(group_scores, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        keep = keep.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        biased = biased.masked_fill(~keep, float("-inf"))
    topk_ids = _top_indices(biased, top_k)
    weights = scores.gather(1, topk_ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return topk_ids, weights * routed_scaling_factor


def route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`grouped_topk` by the chosen backend: `triton` (the fused router, one kernel), `torch` (the reference), or
    `auto` (triton for CUDA tensors, torch otherwise). Same arguments, shapes and results as `grouped_topk`."""
    if backend not in ROUTER_BACKENDS:
        raise ValueError(f"router backend {backend!r}: choose one of {', '.join(ROUTER_BACKENDS)}")
    if backend == "triton" or (backend == "auto" and router_logits.is_cuda):
        # Imported here so that the CPU path never needs Triton to compile anything.
        from kernels.fused_router import fused_grouped_topk

        return fused_grouped_topk(router_logits, correction_bias, top_k, n_group, topk_group,
                                  routed_scaling_factor, renormalize)
    return grouped_topk(router_logits, correction_bias, top_k, n_group, topk_group, routed_scaling_factor,
                        renormalize)
