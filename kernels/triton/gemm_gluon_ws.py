"""Warp-specialized, persistent block-scaled FP8 grouped GEMM for Hopper in Gluon, contiguous layout.

The same contract as `fp8_grouped_gemm_kernel` in `kernels/triton/gemm_gluon.py` (A `[M, K]` e4m3 with each expert's
rows back to back, `counts[e]` of them; B `[E * N, K]` e4m3; a_scale `[M, K/128]`, b_scale `[E, N/128, K/128]`
float32; C `[M, N]` bf16; K a multiple of 128 * UNROLL), with a different schedule:

- Three partitions. A one-warp producer issues every TMA copy; two consumer warpgroups each multiply and scale 64
  rows of the 128-row output tile. Ring slots are handed back through per-slot "empty" barriers that each consumer
  arrives on once it is done with the slot, in place of the CTA-wide barrier per K step of the non-specialized
  kernel: the two consumers drift apart, and one's fp32 scaling runs while the other's products occupy the tensor
  cores.
- Persistent: one program per multiprocessor walks output tiles `pid, pid + grid, ...`, so the producer fills the
  ring with the next tile's operands while the consumers finish and store the current one (no prologue per tile).

Two tile widths (NB pieces of 128 weight rows a K step):
- NB 1, tiles 128 x BLOCK_N (BLOCK_N dividing 128): within a consumer, each K step's product is issued before the
  previous step's is scaled (UNROLL steps an iteration, none in flight across the loop's back edge: see
  `kernels/triton/gemm_gluon.py`). The first consumer is the default partition, the producer one warp.
- NB 2, tiles 128 x 256 (`_consumer_wide`): 48 KB a K step for twice the products of a 128x128 tile's 32 KB, so a
  quarter less L2 traffic per FLOP. A consumer holds two fp32 accumulators and waits for each product before it
  scales it (no room for a second product in flight); the other consumer's products fill the tensor cores
  meanwhile. Both consumers are worker partitions with equal registers and the producer is the default partition
  (4 warps, one thread issues the copies): laid out the other way, ptxas spilled more.

Every partition walks the same tiles in the same order and computes each tile's expert from the counts by itself
(worker partitions take no tensors), so the ring's slot and phase counters agree without messages.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from kernels.triton.gemm_gluon import _expert_table, _store_tile, _tile, _tma_load

HALF_M = gl.constexpr(64)  # rows of a consumer warpgroup (one m64 wgmma)


@gluon.jit
def _producer(a_desc, b_desc, a_smem, b_smem, ready, empty, counts_ptr, num_experts, rows, N, K,
              BLOCK_E: gl.constexpr, GROUP_M: gl.constexpr):
    """One warp (or the default warpgroup, whose copies one thread issues): for every K step of every tile of this
    program, wait for a free ring slot and start the copies of both 64-row halves of A and the tile's NB 128-column
    pieces of B into it."""
    STAGES: gl.constexpr = empty.shape[0]
    NB: gl.constexpr = b_smem.shape[0] // STAGES
    BLOCK_N: gl.constexpr = NB * b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = b_desc.block_type.shape[1]
    nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + NB * b_desc.block_type.nbytes
    offs_e, counts, tiles, ends = _expert_table(counts_ptr, num_experts, BLOCK_E, 2 * HALF_M, gl.num_warps())
    num_n = gl.cdiv(N, BLOCK_N)
    num_m = gl.cdiv(rows, 2 * HALF_M) + num_experts
    num_k = K // BLOCK_K
    it = 0
    for t in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        e, row0, count, m0, n0 = _tile(t, offs_e, counts, tiles, ends, num_m, num_n, GROUP_M, 2 * HALF_M, BLOCK_N)
        if m0 < count:
            a_row = row0 + m0
            b_row = e * N + n0
            for kb in range(num_k):
                slot = it % STAGES
                # Empty barriers start in the completed phase 1: the first pass over the ring does not wait.
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), nbytes)
                _tma_load(a_desc, [a_row, kb * BLOCK_K], ready.index(slot), a_smem.index(2 * slot))
                _tma_load(a_desc, [a_row + HALF_M, kb * BLOCK_K], ready.index(slot), a_smem.index(2 * slot + 1))
                for j in gl.static_range(NB):
                    _tma_load(b_desc, [b_row + j * b_desc.block_type.shape[0], kb * BLOCK_K], ready.index(slot),
                              b_smem.index(NB * slot + j))
                it += 1


@gluon.jit
def _issue(a_smem, b_smem, ready, zero, a_scale_ptrs, b_scale_ptr, stride_ask, stride_bsk, it, kb,
           HALF: gl.constexpr):
    """Wait for ring step `it` (K step `kb` of the tile) and start this warpgroup's product on it, asynchronously;
    load its scales (row scale times the tile's weight scale), which arrive while the product runs."""
    STAGES: gl.constexpr = ready.shape[0]
    slot = it % STAGES
    mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
    part = warpgroup_mma(a_smem.index(2 * slot + HALF), b_smem.index(slot).permute((1, 0)), zero, use_acc=False,
                         is_async=True)
    scale = gl.load(a_scale_ptrs + kb * stride_ask) * gl.load(b_scale_ptr + kb * stride_bsk)
    return part, scale


@gluon.jit
def _retire(acc, part, scale, empty, it, in_flight: gl.constexpr):
    """Wait until at most `in_flight` products run (the older one, `part`, of ring step `it`, is done), hand its
    slot back to the producer, and add it scaled into the fp32 accumulator."""
    STAGES: gl.constexpr = empty.shape[0]
    done = warpgroup_mma_wait(num_outstanding=in_flight, deps=(part,))
    mbarrier.arrive(empty.index(it % STAGES), count=1)
    return acc + done * gl.expand_dims(scale, 1)


@gluon.jit
def _consumer(a_smem, b_smem, ready, empty, a_scale_ptr, b_scale_ptr, c_ptr, counts_ptr, num_experts, rows, N, K,
              stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_cm,
              BLOCK_E: gl.constexpr, GROUP_M: gl.constexpr, UNROLL: gl.constexpr, HALF: gl.constexpr):
    """One warpgroup: rows `HALF * 64 ...` of every tile of this program, scaled per K step into fp32, stored
    in bf16 (only the rows of the tile's expert)."""
    BLOCK_N: gl.constexpr = b_smem.shape[1]
    BLOCK_K: gl.constexpr = b_smem.shape[2]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
    offs_e, counts, tiles, ends = _expert_table(counts_ptr, num_experts, BLOCK_E, 2 * HALF_M, 4)
    num_n = gl.cdiv(N, BLOCK_N)
    num_m = gl.cdiv(rows, 2 * HALF_M) + num_experts
    num_k = K // BLOCK_K
    offs_m = HALF * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, mma))
    zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma)
    it = 0
    for t in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        e, row0, count, m0, n0 = _tile(t, offs_e, counts, tiles, ends, num_m, num_n, GROUP_M, 2 * HALF_M, BLOCK_N)
        if m0 < count:
            a_row = row0 + m0
            # Scales of rows past the count are read from the last valid row (those rows are never stored).
            a_scale_ptrs = a_scale_ptr + (a_row + gl.minimum(offs_m, count - 1 - m0)).to(gl.int64) * stride_asm
            b_scale_ptr_t = b_scale_ptr + e.to(gl.int64) * stride_bse + (n0 // 128) * stride_bsn
            acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma)
            for kb in range(0, num_k, UNROLL):
                part, scale = _issue(a_smem, b_smem, ready, zero, a_scale_ptrs, b_scale_ptr_t, stride_ask,
                                     stride_bsk, it + kb, kb, HALF)
                for u in gl.static_range(1, UNROLL):
                    nxt, next_scale = _issue(a_smem, b_smem, ready, zero, a_scale_ptrs, b_scale_ptr_t, stride_ask,
                                             stride_bsk, it + kb + u, kb + u, HALF)
                    acc = _retire(acc, part, scale, empty, it + kb + u - 1, 1)
                    part = nxt
                    scale = next_scale
                acc = _retire(acc, part, scale, empty, it + kb + UNROLL - 1, 0)
            it += num_k

            _store_tile(acc, c_ptr, stride_cm, a_row, m0, count, n0, N, HALF * HALF_M, 4)


@gluon.jit
def _scaled_product(a, b, zero, acc, scale):
    """acc + (a @ b) * scale[:, None]: a product into fresh registers, waited for, promoted in fp32."""
    part = warpgroup_mma(a, b, zero, use_acc=False, is_async=True)
    part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
    return acc + part * gl.expand_dims(scale, 1)


@gluon.jit
def _consumer_wide(a_smem, b_smem, ready, empty, a_scale_ptr, b_scale_ptr, c_ptr, counts_ptr, num_experts, rows, N,
                   K, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_cm,
                   BLOCK_E: gl.constexpr, GROUP_M: gl.constexpr, HALF: gl.constexpr):
    """One warpgroup of 128x256 tiles: rows `HALF * 64 ...` against both 128-column pieces of the weights, each
    with its own weight scale, scaled per K step into two fp32 accumulators, stored in bf16.

    Two accumulators of 64 registers and one product of 64 fill most of the warpgroup's 232 registers, so within a
    warpgroup each product is waited for before it is scaled; the other warpgroup's products keep the tensor cores
    busy meanwhile. The wider tile reads 48 KB per K step for twice the work of a 128x128 tile's 32 KB."""
    STAGES: gl.constexpr = ready.shape[0]
    PIECE_N: gl.constexpr = b_smem.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, PIECE_N, 32])
    offs_e, counts, tiles, ends = _expert_table(counts_ptr, num_experts, BLOCK_E, 2 * HALF_M, 4)
    num_n = gl.cdiv(N, 2 * PIECE_N)
    num_m = gl.cdiv(rows, 2 * HALF_M) + num_experts
    num_k = K // b_smem.shape[2]
    offs_m = HALF * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, mma))
    zero = gl.zeros([HALF_M, PIECE_N], gl.float32, mma)
    it = 0
    for t in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        e, row0, count, m0, n0 = _tile(t, offs_e, counts, tiles, ends, num_m, num_n, GROUP_M, 2 * HALF_M,
                                       2 * PIECE_N)
        if m0 < count:
            a_row = row0 + m0
            # 32-bit offsets (a_scale has far fewer than 2^31 elements) keep two registers a row free.
            a_scale_offs = (a_row + gl.minimum(offs_m, count - 1 - m0)) * stride_asm
            b_scale_l = b_scale_ptr + e.to(gl.int64) * stride_bse + (n0 // PIECE_N) * stride_bsn
            # Past N the second piece is zero-filled by TMA and never stored: its scale is read from the first's.
            b_scale_r = b_scale_l + gl.where(n0 + PIECE_N < N, stride_bsn, 0)
            acc_l = gl.zeros([HALF_M, PIECE_N], gl.float32, mma)
            acc_r = gl.zeros([HALF_M, PIECE_N], gl.float32, mma)
            for kb in range(num_k):
                slot = it % STAGES
                a_scale = gl.load(a_scale_ptr + (a_scale_offs + kb * stride_ask))
                mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
                a = a_smem.index(2 * slot + HALF)
                acc_l = _scaled_product(a, b_smem.index(2 * slot).permute((1, 0)), zero, acc_l,
                                        a_scale * gl.load(b_scale_l + kb * stride_bsk))
                acc_r = _scaled_product(a, b_smem.index(2 * slot + 1).permute((1, 0)), zero, acc_r,
                                        a_scale * gl.load(b_scale_r + kb * stride_bsk))
                mbarrier.arrive(empty.index(slot), count=1)
                it += 1

            _store_tile(acc_l, c_ptr, stride_cm, a_row, m0, count, n0, N, HALF * HALF_M, 4)
            _store_tile(acc_r, c_ptr, stride_cm, a_row, m0, count, n0 + PIECE_N, N, HALF * HALF_M, 4)


@gluon.jit
def fp8_grouped_gemm_ws_kernel(
    a_desc, b_desc, a_scale_ptr, b_scale_ptr, c_ptr, counts_ptr,
    num_experts, rows, N, K,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_cm,
    BLOCK_E: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr, NB: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """C[rows of e] = (A[rows of e] @ B[e]^T) with per-128-K block scales, fp32 accumulation, C in bf16.
    a_desc: blocks of `[64, 128]` (half a tile's rows). NB 1: tiles `[128, BLOCK_N]`, b_desc blocks `[BLOCK_N, 128]`
    with BLOCK_N dividing 128. NB 2: tiles `[128, 256]`, b_desc blocks `[128, 128]` (two pieces a K step, each with
    its own weight scale). num_warps must be 4: the default partition is the first consumer warpgroup (NB 1) or the
    producer (NB 2); the others are worker partitions."""
    gl.static_assert(num_warps == 4, "the default partition is one warpgroup")
    gl.static_assert(a_desc.block_type.shape[0] == HALF_M, "A arrives in 64-row halves, one per consumer")
    gl.static_assert(a_desc.block_type.shape[1] == 128, "one activation scale per row per K step: BLOCK_K 128")
    gl.static_assert(128 % b_desc.block_type.shape[0] == 0, "one weight scale per piece: BLOCK_N must divide 128")
    gl.static_assert(NB == 1 or (NB == 2 and b_desc.block_type.shape[0] == 128), "256-wide tiles: two 128-row pieces")
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [NB * STAGES] + b_desc.block_type.shape, b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # one arrival from each consumer

    # Worker partitions take no tensors: each one recomputes the tile schedule from the counts itself.
    if NB == 1:
        gl.warp_specialize([
            (_consumer, (a_smem, b_smem, ready, empty, a_scale_ptr, b_scale_ptr, c_ptr, counts_ptr, num_experts, rows,
                         N, K, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_cm, BLOCK_E, GROUP_M,
                         UNROLL, 0)),
            (_consumer, (a_smem, b_smem, ready, empty, a_scale_ptr, b_scale_ptr, c_ptr, counts_ptr, num_experts, rows,
                         N, K, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_cm, BLOCK_E, GROUP_M,
                         UNROLL, 1)),
            (_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, counts_ptr, num_experts, rows, N, K, BLOCK_E,
                         GROUP_M)),
        ], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([
            (_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, counts_ptr, num_experts, rows, N, K, BLOCK_E,
                         GROUP_M)),
            (_consumer_wide, (a_smem, b_smem, ready, empty, a_scale_ptr, b_scale_ptr, c_ptr, counts_ptr, num_experts,
                              rows, N, K, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_cm,
                              BLOCK_E, GROUP_M, 0)),
            (_consumer_wide, (a_smem, b_smem, ready, empty, a_scale_ptr, b_scale_ptr, c_ptr, counts_ptr, num_experts,
                              rows, N, K, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_cm,
                              BLOCK_E, GROUP_M, 1)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
