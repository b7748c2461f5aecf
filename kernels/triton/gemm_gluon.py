"""Block-scaled FP8 grouped GEMM for Hopper written in Gluon (Triton's explicit-layout dialect), contiguous layout.

Why a second kernel: in `kernels/triton/gemm.py` each 128-deep K step multiplies a fresh product on the tensor cores
and then scales it into the fp32 accumulator, and Triton waits for that product right after issuing it, so the
tensor cores sit idle while the scaling runs (the compiler keeps a product asynchronous only when it feeds the next
product's accumulator, which block scaling forbids). Gluon exposes the asynchronous MMA and its wait: here the
product of step k+1 is issued before the product of step k is scaled, so the scaling of one step runs while the
next step multiplies. The arithmetic is the same: one fresh product per 128-column scale block, promoted in fp32.

Layout (the contiguous layout of `kernels/triton/gemm.py`): A `[M, K]` e4m3 holds each expert's rows back to back,
`counts[e]` of them; B `[E * N, K]` e4m3 (experts stacked); a_scale `[M, K/128]` float32 (any strides); b_scale
`[E, N/128, K/128]` float32; C `[M, N]` bf16. The grid has `(cdiv(M, BLOCK_M) + E) * cdiv(N, BLOCK_N)` programs
(an upper bound on the per-expert tile count, known without reading the counts); a program finds its expert from a
prefix sum of the per-expert tile counts and exits past the last one. K must be a multiple of 128 * UNROLL (every
DeepSeek-V3 projection and expert GEMM has K a multiple of 512). A and B tiles arrive by TMA into a ring of
STAGES slots; rows past an expert's count are multiplied (they belong to the next expert, or are zero-filled past
M) but never stored.

Gluon kernels do not run under `TRITON_INTERPRET=1`: the CPU tests cover the Triton kernel of the same contract, and
the GPU tests (`tests/kernels/test_gpu_kernels.py`) check this one against the reference.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# Names that changed after Triton 3.6 (the GPU hosts' version): the TMA load (`async_load` later) and the CTA
# barrier (`barrier` later).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _expert_table(counts_ptr, num_experts, BLOCK_E: gl.constexpr, BLOCK_M: gl.constexpr, WARPS: gl.constexpr):
    """Per expert (padded to BLOCK_E): its index, row count, row tiles, and the running end of its row tiles."""
    vec: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    offs_e = gl.arange(0, BLOCK_E, layout=vec)
    counts = gl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0).to(gl.int32)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    return offs_e, counts, tiles, gl.associative_scan(tiles, 0, _add)


@gluon.jit
def _tile(t, offs_e, counts, tiles, ends, num_m, num_n, GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr,
          BLOCK_N: gl.constexpr):
    """Linear tile `t` -> (expert, first row of the expert, its row count, tile row offset within it, column).
    GROUP_M row tiles share each column sweep (L2 reuse of B). Tiles past the experts' last get m0 >= count."""
    per_group = GROUP_M * num_n
    first_m = (t // per_group) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (t % per_group) % size_m
    tile_n = (t % per_group) // size_m
    e = gl.sum((ends <= tile_m).to(gl.int32), 0)
    before = offs_e < e
    row0 = gl.sum(gl.where(before, counts, 0), 0)
    count = gl.sum(gl.where(offs_e == e, counts, 0), 0)
    m0 = (tile_m - gl.sum(gl.where(before, tiles, 0), 0)) * BLOCK_M
    return e, row0, count, m0, tile_n * BLOCK_N


@gluon.jit
def _store_tile(acc, c_ptr, stride_cm, a_row, m0, count, n0, N, ROW0: gl.constexpr, WARPS: gl.constexpr):
    """Store `acc` `[R, BLOCK_N]` fp32, rows `ROW0 .. ROW0 + R` of the tile at C row `a_row` and column n0, in bf16
    with coalesced 16-byte writes a thread: only the expert's rows (`m0 + row < count`) and columns below N."""
    out: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    c = gl.convert_layout(acc.to(gl.bfloat16), out)
    offs_cm = ROW0 + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, out))
    offs_cn = gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, out))
    c_ptrs = (c_ptr + (a_row + gl.expand_dims(offs_cm, 1)).to(gl.int64) * stride_cm
              + (n0 + gl.expand_dims(offs_cn, 0)))
    ok = gl.expand_dims(m0 + offs_cm < count, 1) & gl.expand_dims(n0 + offs_cn < N, 0)
    gl.store(c_ptrs, c, mask=ok)


@gluon.jit
def _load_step(a_desc, b_desc, a_smem, b_smem, ready, step, num_k, a_row, b_row, STAGES: gl.constexpr):
    """Start the TMA copies of K step `step` (if it exists) into ring slot `step % STAGES`."""
    slot = step % STAGES
    pred = step < num_k
    mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
    _tma_load(a_desc, [a_row, step * a_desc.block_type.shape[1]], ready.index(slot),
                                    a_smem.index(slot), pred=pred)
    _tma_load(b_desc, [b_row, step * b_desc.block_type.shape[1]], ready.index(slot),
                                    b_smem.index(slot), pred=pred)


@gluon.jit
def _issue(a_smem, b_smem, ready, zero, a_scale_ptrs, b_scale_ptr, stride_ask, stride_bsk, step,
           STAGES: gl.constexpr):
    """Wait for K step `step`'s tiles and start its product (asynchronous, into fresh registers); load its scales
    (row scale times the program's weight scale), which arrive while the product runs."""
    slot = step % STAGES
    mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
    part = warpgroup_mma(a_smem.index(slot), b_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
    scale = gl.load(a_scale_ptrs + step * stride_ask) * gl.load(b_scale_ptr + step * stride_bsk)
    return part, scale


@gluon.jit
def _retire(acc, part, scale, in_flight: gl.constexpr):
    """Wait until at most `in_flight` products are running (the older one, `part`, is then done), add it scaled
    into the fp32 accumulator, and make sure every warp is past its shared-memory slot before it is refilled."""
    done = warpgroup_mma_wait(num_outstanding=in_flight, deps=(part,))
    acc += done * gl.expand_dims(scale, 1)
    _cta_barrier()
    return acc


@gluon.jit
def fp8_grouped_gemm_kernel(
    a_desc, b_desc, a_scale_ptr, b_scale_ptr, c_ptr, counts_ptr,
    num_experts, rows, N, K,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_cm,
    BLOCK_E: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr,
    num_warps: gl.constexpr,
):
    """C[rows of e] = (A[rows of e] @ B[e]^T) with per-128-K block scales, fp32 accumulation, C in bf16."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    gl.static_assert(BLOCK_K == 128, "one activation scale per row per K step: BLOCK_K must be 128")
    gl.static_assert(128 % BLOCK_N == 0, "one weight scale per program: BLOCK_N must divide 128")
    # The launcher checks K % (128 * UNROLL) == 0: whole iterations of the K loop.

    # Program -> (expert, rows, column tile); GROUP_M row tiles down each column (L2 reuse of B). Past the last
    # tile, count == 0.
    offs_e, counts, tiles, ends = _expert_table(counts_ptr, num_experts, BLOCK_E, BLOCK_M, num_warps)
    num_n = gl.cdiv(N, BLOCK_N)
    num_m = gl.cdiv(rows, BLOCK_M) + num_experts
    e, row0, count, m0, n0 = _tile(gl.program_id(0), offs_e, counts, tiles, ends, num_m, num_n, GROUP_M, BLOCK_M,
                                   BLOCK_N)
    if m0 < count:
        a_row = row0 + m0
        b_row = e * N + n0
        num_k = gl.cdiv(K, BLOCK_K)

        # fp8 products: K 32 per instruction; each warp owns 16 rows, so 8 warps (two warpgroups) cover 128 rows.
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
        for s in gl.static_range(STAGES):
            _load_step(a_desc, b_desc, a_smem, b_smem, ready, s, num_k, a_row, b_row, STAGES)

        # Scales of rows past the count are read from the last valid row (never stored).
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        in_m = gl.minimum(offs_m, count - 1 - m0)
        a_scale_ptrs = a_scale_ptr + (a_row + in_m).to(gl.int64) * stride_asm
        b_scale_ptr = b_scale_ptr + e.to(gl.int64) * stride_bse + (n0 // 128) * stride_bsn

        zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        # UNROLL K steps an iteration, unrolled: each step's product is issued before the previous one is scaled,
        # and the last is retired before the iteration ends. No product is in flight across the loop's back edge,
        # where the loop-carried registers would be copied while still being written (ptxas then serialises every
        # product); the tensor cores idle only during the last step's scaling of each iteration.
        for kb in range(0, num_k, UNROLL):
            part, scale = _issue(a_smem, b_smem, ready, zero, a_scale_ptrs, b_scale_ptr, stride_ask, stride_bsk, kb,
                                 STAGES)
            for u in gl.static_range(1, UNROLL):
                nxt, next_scale = _issue(a_smem, b_smem, ready, zero, a_scale_ptrs, b_scale_ptr, stride_ask,
                                         stride_bsk, kb + u, STAGES)
                acc = _retire(acc, part, scale, 1)
                _load_step(a_desc, b_desc, a_smem, b_smem, ready, kb + u - 1 + STAGES, num_k, a_row, b_row, STAGES)
                part = nxt
                scale = next_scale
            acc = _retire(acc, part, scale, 0)
            _load_step(a_desc, b_desc, a_smem, b_smem, ready, kb + UNROLL - 1 + STAGES, num_k, a_row, b_row, STAGES)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

        _store_tile(acc, c_ptr, stride_cm, a_row, m0, count, n0, N, 0, num_warps)
