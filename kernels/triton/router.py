"""Fused DeepSeek-V3 router body: one program per token row, the row's E scores held in registers as a
`[groups, experts per group]` tile. The launcher is `kernels.fused_router`; the reference `kernels.router`."""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def grouped_topk_kernel(
    logits_ptr,  # [T, E] float32, row stride stride_logits
    bias_ptr,  # [E] float32
    ids_ptr,  # [T, TOP_K] int64 out
    weights_ptr,  # [T, TOP_K] float32 out
    stride_logits,
    stride_ids,
    stride_weights,
    routed_scaling_factor,
    N_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # experts per group
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_G: tl.constexpr,  # next powers of two of N_GROUP, GROUP_SIZE, TOP_K
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    PRECISE: tl.constexpr,  # CUDA: sigmoid and division rounded as torch rounds them (libdevice expf, IEEE div)
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_J)
    valid = (g[:, None] < N_GROUP) & (j[None, :] < GROUP_SIZE)
    # Padding lanes get an id past every real expert, so that no id comparison below can ever hit them.
    expert = tl.where(valid, g[:, None] * GROUP_SIZE + j[None, :], N_GROUP * GROUP_SIZE)

    x = tl.load(logits_ptr + row * stride_logits + expert, mask=valid, other=0.0)
    if PRECISE:
        # Bit for bit torch's CUDA sigmoid, 1 / (1 + expf(-x)): a one-ulp difference could flip a near tie.
        scores = tl.math.div_rn(1.0, 1.0 + libdevice.exp(-x))
    else:
        scores = 1.0 / (1.0 + tl.exp(-x))
    scores = tl.where(valid, scores, 0.0)
    bias = tl.load(bias_ptr + expert, mask=valid, other=0.0)
    biased = tl.where(valid, scores + bias, float("-inf"))

    if N_GROUP > 1:
        # Group score: its best plus its second best; remove only the first copy of the best, so that a group
        # whose top value appears twice scores twice that value, as topk(2) does.
        top1 = tl.max(biased, axis=1)
        first = tl.min(tl.where(biased == top1[:, None], j[None, :], BLOCK_J), axis=1)
        top2 = tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), biased), axis=1)
        group_score = tl.where(g < N_GROUP, top1 + top2, float("-inf"))
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUP):
            cand = tl.where(keep, float("-inf"), group_score)
            best = tl.max(cand, axis=0)
            pick = tl.min(tl.where(cand == best, g, BLOCK_G), axis=0)  # ties: the lower group
            keep = keep | (g == pick)
        biased = tl.where(keep[:, None], biased, float("-inf"))

    k = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        best = tl.max(tl.max(biased, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(biased == best, expert, N_GROUP * GROUP_SIZE), axis=1), axis=0)  # lower id
        hit = expert == pick
        picked_score = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=1), axis=0)  # exact: one non-zero term
        ids = tl.where(k == i, pick, ids)
        weights = tl.where(k == i, picked_score, weights)
        biased = tl.where(hit, float("-inf"), biased)

    if RENORMALIZE:
        total = tl.sum(weights, axis=0) + 1e-20  # the padding lanes hold 0
        if PRECISE:
            weights = tl.math.div_rn(weights, total)
        else:
            weights = weights / total
    weights = weights * routed_scaling_factor
    in_k = k < TOP_K
    tl.store(ids_ptr + row * stride_ids + k, ids.to(tl.int64), mask=in_k)
    tl.store(weights_ptr + row * stride_weights + k, weights, mask=in_k)
