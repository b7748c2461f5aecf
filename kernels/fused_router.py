"""Launcher of the fused DeepSeek-V3 router (`kernels/triton/router.py`): one Triton kernel from router logits to
expert ids and weights, the same rule and the same tie-breaking as the reference `kernels.router.grouped_topk`."""

from __future__ import annotations

import torch
import triton

from kernels.triton import router as router_jit


def fused_grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: `[T, E]` float32, unit stride along E; correction_bias: `[E]` float32, contiguous, same device.

    Returns (topk_ids `[T, K]` int64 logical expert ids, best first; topk_weights `[T, K]` float32), the ids equal to
    the reference's (ties to the lower index) and the weights within fp32 rounding of it. T may be 0.
    """
    if router_logits.dim() != 2 or router_logits.dtype != torch.float32 or router_logits.stride(-1) != 1:
        raise ValueError(f"router_logits: want [T, E] float32 with unit stride along E, got "
                         f"{tuple(router_logits.shape)} {router_logits.dtype} strides {router_logits.stride()}")
    t, e = router_logits.shape
    if correction_bias.shape != (e,) or correction_bias.dtype != torch.float32 or not correction_bias.is_contiguous():
        raise ValueError(f"correction_bias: want [{e}] float32 contiguous, got {tuple(correction_bias.shape)} "
                         f"{correction_bias.dtype}")
    if correction_bias.device != router_logits.device:
        raise ValueError(f"correction_bias on {correction_bias.device}, router_logits on {router_logits.device}")
    if n_group < 1 or e % n_group:
        raise ValueError(f"n_group {n_group} must be >= 1 and divide the {e} experts")
    group_size = e // n_group
    if n_group > 1 and not (1 <= topk_group <= n_group and group_size >= 2):
        raise ValueError(f"topk_group {topk_group} must lie in [1, n_group={n_group}], with >= 2 experts per group")
    kept = topk_group * group_size if n_group > 1 else e
    if not 1 <= top_k <= kept:
        raise ValueError(f"top_k {top_k} must lie in [1, {kept}] (the experts of the kept groups)")

    ids = torch.empty(t, top_k, dtype=torch.int64, device=router_logits.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    if t == 0:
        return ids, weights
    block_e = triton.next_power_of_2(n_group) * triton.next_power_of_2(group_size)
    router_jit.grouped_topk_kernel[(t,)](
        router_logits, correction_bias, ids, weights,
        router_logits.stride(0), ids.stride(0), weights.stride(0),
        float(routed_scaling_factor),
        N_GROUP=n_group, GROUP_SIZE=group_size, TOPK_GROUP=topk_group if n_group > 1 else 1, TOP_K=top_k,
        BLOCK_G=triton.next_power_of_2(n_group), BLOCK_J=triton.next_power_of_2(group_size),
        BLOCK_K=triton.next_power_of_2(top_k), RENORMALIZE=bool(renormalize), PRECISE=router_logits.is_cuda,
        # One warp holds a 256-expert row in 8 registers per lane; more warps would only add shared-memory
        # round trips to every reduction.
        num_warps=1 if block_e <= 512 else 4,
    )
    return ids, weights
