"""MLA decode attention bodies (split-KV, "flash-decoding"): the launcher is `kernels.mla_triton`.

Absorbed MLA decode is multi-query attention with one shared head of `RANK + ROPE_DIM` keys and `RANK` values, so a
program takes a block of query heads of one sequence and streams that sequence's cached latent rows through them
once: the rows are read once per head block, not once per head. Each sequence's tokens are cut into splits handled
by separate programs (to fill the GPU when the batch is small); each writes its normalised partial output and the
log2-sum-exp of its scores, and `mla_decode_combine_kernel` merges the splits.
"""

import triton
import triton.language as tl


@triton.jit
def _scores(q, q_rope, kv, k_rope, scale_log2, DOT_PRECISION: tl.constexpr):
    """Scaled scores `[BLOCK_H, BLOCK_N]` of q `[BLOCK_H, RANK]`, q_rope `[BLOCK_H, ROPE_DIM]` against the rows kv
    `[BLOCK_N, RANK]`, k_rope `[BLOCK_N, ROPE_DIM]`: two products, each scaled, so that Triton does not fold them
    into one chain (see SPLIT_QK in the loop)."""
    return (tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION) * scale_log2
            + tl.dot(q_rope, tl.trans(k_rope), input_precision=DOT_PRECISION) * scale_log2)


@triton.jit
def mla_decode_split_kernel(
    q_latent_ptr,  # [B, H, RANK], unit stride along RANK
    q_rope_ptr,  # [B, H, ROPE_DIM], unit stride along ROPE_DIM
    kv_ptr,  # [num_pages * PAGE_SIZE, RANK + ROPE_DIM]: latent then rotated key, unit stride along the row
    page_table_ptr,  # [B, max_pages] int: page ids; token t of sequence b is slot page*PAGE_SIZE + t % PAGE_SIZE
    seq_lens_ptr,  # [B] int
    out_ptr,  # FINAL: [B, H, RANK] in q's dtype; else the partial outputs [B, H, splits, RANK] float32
    lse_ptr,  # [B, H, splits] float32 log2-sum-exp of each split's scaled scores (unused when FINAL)
    stride_qb, stride_qh,
    stride_rb, stride_rh,
    stride_kv,
    stride_pt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    num_heads,
    split_len,  # tokens per split, a multiple of BLOCK_N
    scale_log2,  # softmax scale * log2(e): scores go through exp2
    RANK: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next powers of two of RANK and ROPE_DIM (>= 16, as tl.dot wants)
    BLOCK_DR: tl.constexpr,
    FINAL: tl.constexpr,  # one split per sequence: normalise and write the output directly
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs: TF32 would lose the reference's precision
    LAZY_RESCALE: tl.constexpr = False,  # rescale the accumulator only when a running max grows by > 2^8
    SPLIT_QK: tl.constexpr = False,  # split each score tile between the warpgroups (see the loop)
    QK_IN_BRANCH: tl.constexpr = False,  # with SPLIT_QK: the score products inside the mask branch (see the loop)
):
    # Head blocks vary fastest in launch order, so the programs that share a chunk of latent rows run together
    # and all but the first find those rows in L2.
    head_block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_DR)
    mask_h = offs_h < num_heads
    # At model sizes the dims are powers of two: all-true masks keep the row loads fully vectorised.
    if BLOCK_R == RANK:
        mask_r = tl.full([BLOCK_R], True, tl.int1)
    else:
        mask_r = offs_r < RANK
    if BLOCK_DR == ROPE_DIM:
        mask_d = tl.full([BLOCK_DR], True, tl.int1)
    else:
        mask_d = offs_d < ROPE_DIM
    q = tl.load(q_latent_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_r[None, :],
                mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    q_rope = tl.load(q_rope_ptr + b * stride_rb + offs_h[:, None] * stride_rh + offs_d[None, :],
                     mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(page_table_ptr + b * stride_pt + offs_n // PAGE_SIZE, mask=mask_n, other=0)
        rows = kv_ptr + (page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE)[:, None] * stride_kv
        kv = tl.load(rows + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        k_rope = tl.load(rows + RANK + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)

        if SPLIT_QK:
            # Triton gives a product whose result reaches another product (through SSA values) all its warps along
            # M, so a 64-row score tile is computed whole by each warpgroup. Two products, each scaled (a plain
            # `dot + dot` is folded into `dot(acc=dot)`, a chain), and a branch between them and the softmax end
            # that chain: the score tile is then split by columns between the warpgroups, each computing half.
            if QK_IN_BRANCH:
                # With the products before the branch, Triton leaves the PV product in flight across the loop's
                # back edge until the next score product's wait, and ptxas (C7515) then serialises every wgmma of
                # the kernel (a wait after each instruction). With a copy of the products in each arm, the PV
                # product is waited in its own iteration and each product's wgmmas run back to back.
                if n0 + BLOCK_N > end:
                    s = _scores(q, q_rope, kv, k_rope, scale_log2, DOT_PRECISION)
                    s = tl.where(mask_n[None, :], s, float("-inf"))
                else:
                    s = _scores(q, q_rope, kv, k_rope, scale_log2, DOT_PRECISION)
            else:
                s = _scores(q, q_rope, kv, k_rope, scale_log2, DOT_PRECISION)
                if n0 + BLOCK_N > end:  # only the last block needs the mask
                    s = tl.where(mask_n[None, :], s, float("-inf"))
        else:
            s = tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION)
            s = tl.dot(q_rope, tl.trans(k_rope), acc=s, input_precision=DOT_PRECISION)
            s = tl.where(mask_n[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block holds at least one valid token
        if LAZY_RESCALE:
            # Keep the running max (and skip rescaling the [BLOCK_H, RANK] accumulator) unless some head's max grew
            # by more than 2^8: the weights exp2(s - m) then stay below 256, exact enough in fp32 sums and bf16.
            if tl.max(m_new - m, axis=0) > 8.0:
                alpha = tl.exp2(m - m_new)
                acc = acc * alpha[:, None]
                row_sum = row_sum * alpha
                m = m_new
            p = tl.exp2(s - m[:, None])
            row_sum += tl.sum(p, axis=1)
            acc = tl.dot(p.to(kv.dtype), kv, acc=acc, input_precision=DOT_PRECISION)
        else:
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            row_sum = row_sum * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(kv.dtype), kv, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
            m = m_new

    # A split past the end of its sequence saw no token: it writes zeros and a -inf weight, which the combine
    # kernel reads as "nothing here" (the buffers are not zeroed beforehand).
    seen = row_sum > 0.0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    if FINAL:
        tl.store(out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_r[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_r[None, :])
    else:
        tl.store(out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + split * stride_os + offs_r[None, :],
                 out, mask=mask_h[:, None] & mask_r[None, :])
        lse = tl.where(seen, m + tl.log2(tl.where(seen, row_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + offs_h * stride_lh + split, lse, mask=mask_h)


@triton.jit
def mla_decode_combine_kernel(
    partial_ptr,  # [B, H, splits, RANK] float32, each split's output normalised by its own sum
    lse_ptr,  # [B, H, splits] float32 log2-sum-exp of each split (-inf: the split saw no token)
    out_ptr,  # [B, H, RANK] in q's dtype
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    num_splits,
    RANK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    mask_s = offs_s < num_splits
    mask_r = offs_r < RANK
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # an empty sequence: every weight 0, output 0
    w = tl.exp2(lse - top)
    total = tl.sum(w, axis=0)
    part = tl.load(partial_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_r[None, :],
                   mask=mask_s[:, None] & mask_r[None, :], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_r, out.to(out_ptr.dtype.element_ty), mask=mask_r)
