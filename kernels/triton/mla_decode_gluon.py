"""Warp-specialized MLA decode split kernel for Hopper in Gluon: the same contract as `mla_decode_split_kernel` in
`kernels/triton/mla_decode.py` (one program per 64 query heads of one sequence and one KV split; FINAL writes the
output, otherwise normalised partials and log2-sum-exps for `mla_decode_combine_kernel`), at DeepSeek-V3's latent
sizes only (RANK 512, ROPE_DIM 64, 16-bit inputs).

Why: the Triton kernel's two warpgroups both compute scores, both wait on the same row gathers, and ptxas serialises
its products (see `kernels/mla_triton.py`). Here each job has its own warps:
- the score warpgroup (the default partition) gathers each 64-token block's cached rows (latent and rotated key,
  by page table, with `cp.async`; the page ids a block earlier still) into a ring of two slots a block ahead,
  computes the `[64 heads, 64 tokens]` scores of a block against all 576 channels (queries and rows from shared
  memory), runs the online softmax, and posts the bf16 weights P and each head's rescale factor in shared memory;
- two output warpgroups each hold half of the `[64, 512]` fp32 output and add `P @ V` for their 256 latent
  channels, while the score warpgroup already scores the next block.
A ring slot is refilled once the score warpgroup (keys) and both output warpgroups (values) are done with it. Three
warpgroups, not four with a separate producer: ptxas holds every region of the kernel to the launch's register
budget (65536 / threads), and the output warpgroups' 64x256 fp32 accumulators need more than the 128 a thread of
four warpgroups would leave.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# Renamed after Triton 3.6 (the GPU hosts' version): the cp.async copy into shared memory (`async_load` later).
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

BLOCK = gl.constexpr(64)  # heads a program, and tokens a block
HALF = gl.constexpr(256)  # latent channels of an output warpgroup
_COPY = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))  # 16-byte copies, 128 bytes a row a warp


@gluon.jit
def _rows(kv_ptr, page_table_ptr, stride_kv, stride_pt, b, n0, end, PAGE_SIZE: gl.constexpr):
    """Cache-row pointers `[64]` of tokens `n0 .. n0 + 64` of sequence b (past `end`: the last valid token again,
    whose scores the score warpgroup masks; a block past the last reads page 0 and is never copied)."""
    tok = gl.maximum(gl.minimum(n0 + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, _COPY)), end - 1), 0)
    page = gl.load(page_table_ptr + b * stride_pt + tok // PAGE_SIZE, mask=n0 < end, other=0).to(gl.int64)
    return kv_ptr + (page * PAGE_SIZE + tok % PAGE_SIZE) * stride_kv


@gluon.jit
def _refill(kv_smem, kr_smem, ready, empty, rows, blk, num_blocks, RANK: gl.constexpr, ROPE_DIM: gl.constexpr):
    """Start the copies of block `blk` (if there is one; its row pointers `rows`) into its ring slot, 64 channels
    at a time (pointer tensors of 4 a thread), once every warpgroup is done with the block that slot held before."""
    STAGES: gl.constexpr = kv_smem.shape[0]
    COLS: gl.constexpr = 64
    gl.static_assert(ROPE_DIM == COLS, "the rotated key is one 64-channel piece")
    if blk < num_blocks:
        slot = blk % STAGES
        # Empty barriers start in the completed phase 1: the first pass over the ring does not wait.
        mbarrier.wait(empty.index(slot), ((blk // STAGES) & 1) ^ 1)
        fence_async_shared()  # the MMAs' reads of the slot (async proxy) before these writes
        ptrs = gl.expand_dims(rows, 1)
        cols = gl.expand_dims(gl.arange(0, COLS, layout=gl.SliceLayout(0, _COPY)), 0)
        for c in gl.static_range(0, RANK, COLS):
            _async_load(kv_smem.index(slot).slice(c, COLS, dim=1), ptrs + (c + cols))
        _async_load(kr_smem.index(slot), ptrs + (RANK + cols))
        # Each thread's arrival lands when its copies have; with the warpgroup's own arrival the phase completes.
        async_copy.mbarrier_arrive(ready.index(slot))
        mbarrier.arrive(ready.index(slot), count=1)


@gluon.jit
def _scores(q_smem, qr_smem, kv_smem, kr_smem, p_smem, alpha_smem, l_smem, ready, empty, p_ready, p_empty, done,
            kv_ptr, page_table_ptr, stride_kv, stride_pt, lse_ptr, stride_lb, stride_lh, b, head0, split, num_heads,
            start, end, num_blocks, scale_log2, RANK: gl.constexpr, ROPE_DIM: gl.constexpr,
            PAGE_SIZE: gl.constexpr, FINAL: gl.constexpr):
    """The default partition: the row gathers a block ahead, the scores and online softmax of every block; at the
    end each head's sum of weights (for the output warpgroups) and, split, its log2-sum-exp."""
    STAGES: gl.constexpr = kv_smem.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK, 16])
    row: gl.constexpr = gl.SliceLayout(1, mma)
    zero = gl.zeros([BLOCK, BLOCK], gl.float32, mma)
    m = gl.full([BLOCK], float("-inf"), gl.float32, row)
    total = gl.zeros([BLOCK], gl.float32, row)
    offs_n = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, mma))
    # Each block's page ids are read a block before its copies start, so the copies never wait on them.
    rows = _rows(kv_ptr, page_table_ptr, stride_kv, stride_pt, b, start, end, PAGE_SIZE)
    for blk in gl.static_range(STAGES - 1):
        _refill(kv_smem, kr_smem, ready, empty, rows, blk, num_blocks, RANK, ROPE_DIM)
        rows = _rows(kv_ptr, page_table_ptr, stride_kv, stride_pt, b, start + (blk + 1) * BLOCK, end, PAGE_SIZE)
    for blk in range(num_blocks):
        slot = blk % STAGES
        mbarrier.wait(ready.index(slot), (blk // STAGES) & 1)
        fence_async_shared()  # the copies' writes (generic proxy) before the MMAs read them
        s = warpgroup_mma(q_smem, kv_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        s = warpgroup_mma(qr_smem, kr_smem.index(slot).permute((1, 0)), s, is_async=True)
        # The next block's gathers go out while this block's scores multiply (its slot frees once the output
        # warpgroups are done with the block before this one).
        _refill(kv_smem, kr_smem, ready, empty, rows, blk + STAGES - 1, num_blocks, RANK, ROPE_DIM)
        rows = _rows(kv_ptr, page_table_ptr, stride_kv, stride_pt, b, start + (blk + STAGES) * BLOCK, end,
                     PAGE_SIZE)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        mbarrier.arrive(empty.index(slot), count=1)  # keys done; the output warpgroups still read the values
        valid = start + blk * BLOCK + offs_n < end
        s = gl.where(gl.expand_dims(valid, 0), s * scale_log2, float("-inf"))
        m_new = gl.maximum(m, gl.max(s, axis=1))  # finite: every block holds at least one valid token
        alpha = gl.exp2(m - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        total = total * alpha + gl.sum(p, axis=1)
        m = m_new
        mbarrier.wait(p_empty, (blk & 1) ^ 1)  # both output warpgroups are done with the previous weights
        p_smem.store(p.to(p_smem.dtype))
        alpha_smem.store(alpha)
        fence_async_shared()
        mbarrier.arrive(p_ready, count=1)
    l_smem.store(total)
    mbarrier.arrive(done, count=1)
    if not FINAL:
        offs_h = head0 + gl.arange(0, BLOCK, layout=row)
        seen = total > 0.0
        lse = gl.where(seen, m + gl.log2(gl.where(seen, total, 1.0)), float("-inf"))
        gl.store(lse_ptr + b * stride_lb + offs_h * stride_lh + split, lse, mask=offs_h < num_heads)


@gluon.jit
def _outputs(kv_smem, p_smem, alpha_smem, l_smem, ready, empty, p_ready, p_empty, done, out_ptr, stride_ob,
             stride_oh, stride_os, b, head0, split, num_heads, num_blocks, FINAL: gl.constexpr,
             PART: gl.constexpr):
    """An output warpgroup: latent channels `PART * 256 ...` of the 64 heads' output, `P @ V` block by block with
    the score warpgroup's rescaling, normalised by the heads' weight sums at the end."""
    STAGES: gl.constexpr = kv_smem.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
    row: gl.constexpr = gl.SliceLayout(1, mma)
    o = gl.zeros([BLOCK, HALF], gl.float32, mma)
    for blk in range(num_blocks):
        slot = blk % STAGES
        mbarrier.wait(p_ready, blk & 1)
        mbarrier.wait(ready.index(slot), (blk // STAGES) & 1)
        fence_async_shared()
        o = o * gl.expand_dims(alpha_smem.load(row), 1)
        o = warpgroup_mma(p_smem, kv_smem.index(slot).slice(PART * HALF, HALF, dim=1), o, is_async=True)
        o = warpgroup_mma_wait(num_outstanding=0, deps=(o,))
        mbarrier.arrive(p_empty, count=1)
        mbarrier.arrive(empty.index(slot), count=1)
    mbarrier.wait(done, 0)
    total = l_smem.load(row)
    o = o / gl.expand_dims(gl.where(total > 0.0, total, 1.0), 1)
    offs_h = head0 + gl.arange(0, BLOCK, layout=row)
    offs_r = PART * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, mma))
    ptrs = out_ptr + b * stride_ob + gl.expand_dims(offs_h, 1) * stride_oh + gl.expand_dims(offs_r, 0)
    mask = gl.expand_dims(offs_h < num_heads, 1)
    if FINAL:
        gl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        gl.store(ptrs + split * stride_os, o, mask=mask)


@gluon.jit
def mla_decode_gluon_kernel(
    q_latent_ptr, q_rope_ptr, kv_ptr, page_table_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_rb, stride_rh, stride_kv, stride_pt, stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, num_heads, split_len, scale_log2,
    RANK: gl.constexpr, ROPE_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr, FINAL: gl.constexpr,
    STAGES: gl.constexpr, OUTPUT_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """Arguments as `mla_decode_split_kernel` (see `kernels/triton/mla_decode.py`); grid (H / 64, B, splits)."""
    gl.static_assert(RANK == 2 * HALF, "two output warpgroups of 256 latent channels")
    gl.static_assert(num_warps == 4, "the default partition is the score warpgroup")
    dtype: gl.constexpr = q_latent_ptr.dtype.element_ty
    head0 = gl.program_id(0) * BLOCK
    b = gl.program_id(1).to(gl.int64)
    split = gl.program_id(2)
    seq_len = gl.load(seq_lens_ptr + b).to(gl.int32)
    start = split * split_len
    end = gl.minimum(start + split_len, seq_len)
    num_blocks = gl.cdiv(gl.maximum(end - start, 0), BLOCK)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK, RANK], gl.NVMMASharedLayout.get_default_for([BLOCK, RANK], dtype))
    qr_smem = gl.allocate_shared_memory(dtype, [BLOCK, ROPE_DIM],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK, ROPE_DIM], dtype))
    kv_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, RANK],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK, RANK], dtype))
    kr_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, ROPE_DIM],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK, ROPE_DIM], dtype))
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK, BLOCK], gl.NVMMASharedLayout.get_default_for([BLOCK, BLOCK],
                                                                                                    dtype))
    vec: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    alpha_smem = gl.allocate_shared_memory(gl.float32, [BLOCK], vec)
    l_smem = gl.allocate_shared_memory(gl.float32, [BLOCK], vec)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    p_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    p_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=3)  # the score warpgroup and both output warpgroups
    mbarrier.init(p_ready, count=1)
    mbarrier.init(p_empty, count=2)
    mbarrier.init(done, count=1)

    # The queries, in 128-channel pieces (heads past num_heads read as zeros).
    lay: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    offs_h = head0 + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, lay))
    in_h = gl.expand_dims(offs_h < num_heads, 1)
    for c in gl.static_range(0, RANK, 128):
        offs_c = c + gl.arange(0, 128, layout=gl.SliceLayout(0, lay))
        q = gl.load(q_latent_ptr + b * stride_qb + gl.expand_dims(offs_h, 1) * stride_qh + gl.expand_dims(offs_c, 0),
                    mask=in_h, other=0.0)
        q_smem.slice(c, 128, dim=1).store(q)
    offs_d = gl.arange(0, ROPE_DIM, layout=gl.SliceLayout(0, lay))
    qr = gl.load(q_rope_ptr + b * stride_rb + gl.expand_dims(offs_h, 1) * stride_rh + gl.expand_dims(offs_d, 0),
                 mask=in_h, other=0.0)
    qr_smem.store(qr)
    fence_async_shared()

    gl.warp_specialize([
        (_scores, (q_smem, qr_smem, kv_smem, kr_smem, p_smem, alpha_smem, l_smem, ready, empty, p_ready, p_empty,
                   done, kv_ptr, page_table_ptr, stride_kv, stride_pt, lse_ptr, stride_lb, stride_lh, b, head0, split,
                   num_heads, start, end, num_blocks, scale_log2, RANK, ROPE_DIM, PAGE_SIZE, FINAL)),
        (_outputs, (kv_smem, p_smem, alpha_smem, l_smem, ready, empty, p_ready, p_empty, done, out_ptr, stride_ob,
                    stride_oh, stride_os, b, head0, split, num_heads, num_blocks, FINAL, 0)),
        (_outputs, (kv_smem, p_smem, alpha_smem, l_smem, ready, empty, p_ready, p_empty, done, out_ptr, stride_ob,
                    stride_oh, stride_os, b, head0, split, num_heads, num_blocks, FINAL, 1)),
    ], [4, 4], [OUTPUT_REGS, OUTPUT_REGS])
