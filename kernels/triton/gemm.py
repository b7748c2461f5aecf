"""One GEMM mainloop `C = A @ B^T` for the dense projections and the expert MLPs, bf16 or block-scaled FP8.

Row layouts (`LAYOUT`):
- 0, dense: A `[M, K]`, one B `[N, K]`.
- 1, contiguous: A `[M, K]` holds each expert's rows back to back, `counts[e]` of them (zero allowed); B `[E, N, K]`.
  The grid has `cdiv(M, BLOCK_M) + E` row tiles (an upper bound on the sum of per-expert tile counts, known without
  reading the counts); each program finds its expert from a prefix sum of per-expert tile counts computed in
  registers, and the tiles past the last expert exit. No host sync, no schedule kernel.
- 2, masked: A `[E, max_m, K]`, only the first `counts[e]` rows of expert e valid. The grid is `E x m_slots x column
  tiles`; a program walks the row tiles `slot, slot + m_slots, ...` below `counts[e]`. With `m_slots = cdiv(max_m,
  BLOCK_M)` that is one program per row tile, those past the count exiting at once; fewer slots (sized from the
  expected rows) spare the launch of programs that would only exit. Launch shapes never depend on the counts, so the
  kernel can be captured in a CUDA graph.

FP8: A and B are e4m3 with fp32 scales, A's per row per 128 columns of K (`a_scale[.., row, k // 128]`), B's per
128x128 block (`b_scale[e, n // 128, k // 128]`). BLOCK_K is 128, so each K step multiplies one fresh fp32 tile
product by its scales before adding it to the accumulator; the tensor cores' reduced-precision fp8 accumulation never
spans more than one scale block. When BLOCK_N divides 128 the program's columns share one weight scale, folded into
the row scales first (one fused multiply-add per element); a BLOCK_N of 256 (twice the work per loaded A tile) takes
one weight scale per column (two distinct values), one multiply more per element.

Persistent (`gemm_persistent_kernel`): a fixed grid of about one or two programs per multiprocessor walks every
output tile of every expert, `(expert, row tile, column tile)` found on the device from the counts, so the last wave
is never half empty and, with FLATTEN, the loads of a program's next tile are issued while it finishes the current
one (the K loop and the tile loop are pipelined as one loop; short K loops, as in decode, keep the memory busy).

TMA: A and B arrive as host-made tensor descriptors (2-D: A `[rows, K]`, B `[E * N, K]`) and tiles are fetched by
Hopper's bulk copy engine, zero-filled past the edges; otherwise through pointers (cp.async), with rows past an
expert's count and columns past N clamped onto valid ones so that every load is a full unmasked tile. Either way
the extra rows and columns are computed but never stored.
"""

import triton
import triton.language as tl

DENSE = tl.constexpr(0)
CONTIGUOUS = tl.constexpr(1)
MASKED = tl.constexpr(2)


@triton.jit
def _tile_of(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Program index -> (row tile, col tile), walking GROUP_M row tiles down each column so that programs running
    together share B's columns (and A's rows) in L2."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (tile % per_group) % size_m
    tile_n = (tile % per_group) // size_m
    return tile_m, tile_n


@triton.jit
def _load_step(a_src, b_src, a_ptrs, b_ptrs, a_row, b_row, kb, K,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr):
    """The A `[BLOCK_M, BLOCK_K]` and B `[BLOCK_N, BLOCK_K]` tiles of K step kb (pointers already at step kb)."""
    if TMA:
        a = a_src.load([a_row, kb * BLOCK_K])
        b = b_src.load([b_row, kb * BLOCK_K])
    elif EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        k_ok = tl.arange(0, BLOCK_K) < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
    return a, b


@triton.jit
def _gemm_tile(
    a_src, a_scale_ptr, b_src, b_scale_ptr, c_ptr,
    e, row0, m0, count, tile_n, a_row, N, K,
    stride_ae, stride_am, stride_ase, stride_asm, stride_ask,
    stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk,
    stride_ce, stride_cm,
    FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, WIDEN: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, PREFETCH: tl.constexpr,
):
    """C rows `row0 + m0 ...` (of expert e, `count` valid rows) by columns of `tile_n`: the K loop and the store.

    a_row: first A row of the tile in the TMA descriptor's 2-D view. Each operand is addressed as one 64-bit base
    (expert, first row, first column) plus 32-bit offsets within the tile, which keeps the per-element address
    arithmetic (and registers) small. WS: ask Triton to warp-specialize the K loop (loads, MMAs and the scaling in
    separate warps), where the compiler supports it.
    """
    idx_m = tl.arange(0, BLOCK_M)
    idx_n = tl.arange(0, BLOCK_N)
    n0 = tile_n * BLOCK_N
    first = (row0 + m0).to(tl.int64)
    # Rows past the expert's count and columns past N are clamped onto the tile's valid ones, so pointer loads are
    # full unmasked tiles; their results are never stored.
    in_m = tl.minimum(idx_m, count - 1 - m0)
    in_n = tl.where(n0 + idx_n < N, idx_n, 0)
    a_ptrs = a_src
    b_ptrs = b_src
    if not TMA:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_src + e * stride_ae + first * stride_am + (in_m[:, None] * stride_am + offs_k[None, :])
        b_ptrs = b_src + e * stride_be + n0.to(tl.int64) * stride_bn + (in_n[:, None] * stride_bn + offs_k[None, :])
    a_row = a_row.to(tl.int32)  # bulk-copy coordinates are 32-bit
    b_row = (e * N + n0).to(tl.int32)
    num_k = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FP8:
        tl.static_assert(BLOCK_K == 128, "FP8 scales cover 128 columns of K: BLOCK_K must be 128")
        tl.static_assert(128 % BLOCK_N == 0 or BLOCK_N % 128 == 0,
                         "FP8 weight scales: BLOCK_N must divide 128 or be a multiple of it")
        a_scale_ptrs = a_scale_ptr + e * stride_ase + first * stride_asm + in_m * stride_asm
        # One weight scale per program when BLOCK_N divides 128 (folded into the row scales), else one per column.
        if BLOCK_N <= 128:
            b_scale_ptrs = b_scale_ptr + e * stride_bse + (n0 // 128) * stride_bsn
        else:
            b_scale_ptrs = b_scale_ptr + e * stride_bse + ((n0 + in_n) // 128) * stride_bsn
        if PREFETCH:
            a_s_next = tl.load(a_scale_ptrs)
            b_s_next = tl.load(b_scale_ptrs)
        for kb in tl.range(0, num_k, warp_specialize=WS):
            a, b = _load_step(a_src, b_src, a_ptrs, b_ptrs, a_row, b_row, kb, K, BLOCK_K, EVEN_K, TMA)
            if PREFETCH:
                # The scales are plain loads that Triton does not pipeline: fetch step kb + 1's during step kb, so
                # their latency hides behind this step's MMA instead of stalling the scaling after it.
                a_s, b_s = a_s_next, b_s_next
                kn = tl.minimum(kb + 1, num_k - 1)
                a_s_next = tl.load(a_scale_ptrs + kn * stride_ask)
                b_s_next = tl.load(b_scale_ptrs + kn * stride_bsk)
            else:
                a_s = tl.load(a_scale_ptrs + kb * stride_ask)
                b_s = tl.load(b_scale_ptrs + kb * stride_bsk)
            if BLOCK_N <= 128:
                acc += tl.dot(a, tl.trans(b)) * (a_s * b_s)[:, None]
            else:
                acc += (tl.dot(a, tl.trans(b)) * a_s[:, None]) * b_s[None, :]
            if not TMA:
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
    else:
        for kb in tl.range(0, num_k, warp_specialize=WS):
            a, b = _load_step(a_src, b_src, a_ptrs, b_ptrs, a_row, b_row, kb, K, BLOCK_K, EVEN_K, TMA)
            if WIDEN:
                acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc)
            else:
                acc = tl.dot(a, tl.trans(b), acc)
            if not TMA:
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
    c_ptrs = c_ptr + e * stride_ce + first * stride_cm + n0 + (idx_m[:, None] * stride_cm + idx_n[None, :])
    c_ok = (m0 + idx_m < count)[:, None] & (n0 + idx_n < N)[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def gemm_kernel(
    a_src, a_scale_ptr, b_src, b_scale_ptr, c_ptr, counts_ptr,
    num_experts, rows, m_slots, N, K,
    stride_ae, stride_am, stride_ase, stride_asm, stride_ask,
    stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk,
    stride_ce, stride_cm,
    LAYOUT: tl.constexpr, FP8: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, WIDEN: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr = False,
    PREFETCH: tl.constexpr = False,
):
    """C[rows of e] = A[rows of e] @ B[e]^T, fp32 accumulation, C in its own dtype.

    a_src / b_src: pointers, or tensor descriptors when TMA. rows: M (dense, contiguous) or max_m (masked);
    m_slots: programs per expert and column tile (masked only); counts: `[E]` int32/int64 (unused when dense).
    The last dims of A, B and C are contiguous; every other stride is an argument (expert strides 0 when absent).
    WIDEN: multiply bf16 tiles as fp32 (exact), only for Triton's CPU interpreter, which multiplies bf16 tiles as
    their raw 16-bit patterns.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    if LAYOUT == MASKED:
        per_expert = m_slots * num_n
        e = (pid // per_expert).to(tl.int64)
        slot, tile_n = _tile_of(pid % per_expert, m_slots, num_n, GROUP_M)
        count = tl.load(counts_ptr + e).to(tl.int32)
        for tile_m in range(slot, tl.cdiv(count, BLOCK_M), m_slots):
            m0 = tile_m * BLOCK_M
            _gemm_tile(a_src, a_scale_ptr, b_src, b_scale_ptr, c_ptr, e, 0, m0, count, tile_n, e * rows + m0, N, K,
                       stride_ae, stride_am, stride_ase, stride_asm, stride_ask,
                       stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk, stride_ce, stride_cm,
                       FP8, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, WIDEN, TMA, WS, PREFETCH)
    else:
        if LAYOUT == CONTIGUOUS:
            tile_m, tile_n = _tile_of(pid, tl.cdiv(rows, BLOCK_M) + num_experts, num_n, GROUP_M)
            offs_e = tl.arange(0, BLOCK_E)
            counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0).to(tl.int32)
            tiles = (counts + BLOCK_M - 1) // BLOCK_M
            # Expert of this row tile: how many experts' tiles all end at or before it (an empty expert ends where
            # the one before it ends, so it is skipped). Past the last tile, e == num_experts and count == 0.
            e32 = tl.sum((tl.cumsum(tiles, 0) <= tile_m).to(tl.int32), 0)
            before = offs_e < e32
            row0 = tl.sum(tl.where(before, counts, 0), 0)
            count = tl.sum(tl.where(offs_e == e32, counts, 0), 0)
            m0 = (tile_m - tl.sum(tl.where(before, tiles, 0), 0)) * BLOCK_M
            e = e32.to(tl.int64)
        else:
            tile_m, tile_n = _tile_of(pid, tl.cdiv(rows, BLOCK_M), num_n, GROUP_M)
            e = 0
            row0 = 0
            count = rows
            m0 = tile_m * BLOCK_M
        if m0 < count:
            _gemm_tile(a_src, a_scale_ptr, b_src, b_scale_ptr, c_ptr, e, row0, m0, count, tile_n, row0 + m0, N, K,
                       stride_ae, stride_am, stride_ase, stride_asm, stride_ask,
                       stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk, stride_ce, stride_cm,
                       FP8, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, WIDEN, TMA, WS, PREFETCH)


@triton.jit
def gemm_persistent_kernel(
    a_src, a_scale_ptr, b_src, b_scale_ptr, c_ptr, counts_ptr,
    num_experts, rows, N, K,
    stride_ae, stride_am, stride_ase, stride_asm, stride_ask,
    stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk,
    stride_ce, stride_cm,
    LAYOUT: tl.constexpr, FP8: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, WIDEN: tl.constexpr, TMA: tl.constexpr,
    FLATTEN: tl.constexpr, WS: tl.constexpr, PREFETCH: tl.constexpr = False,
):
    """`gemm_kernel`'s product over a fixed grid of P programs, each walking tiles `pid, pid + P, ...`
    of the list of every expert's output tiles (expert-major; within an expert, `_tile_of` order).

    The per-expert tile counts come from `counts` (all rows when dense), so the tile list is exactly the non-empty
    tiles and no program ever starts on nothing. FLATTEN pipelines the tile loop and the K loop as one; WS asks for
    warp specialization of the tile loop.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    if LAYOUT == DENSE:
        counts = tl.where(offs_e == 0, rows, 0)
    else:
        counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0).to(tl.int32)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M * num_n  # output tiles per expert
    ends = tl.cumsum(tiles, 0)
    total = tl.sum(tiles, 0)
    for tile in tl.range(pid, total, tl.num_programs(0), flatten=FLATTEN, warp_specialize=WS):
        # This tile's expert: how many experts' tiles all end at or before it (empty experts end where the one before
        # them ends, so they are skipped).
        e32 = tl.sum((ends <= tile).to(tl.int32), 0)
        before = offs_e < e32
        count = tl.sum(tl.where(offs_e == e32, counts, 0), 0)
        local = tile - tl.sum(tl.where(before, tiles, 0), 0)
        tile_m, tile_n = _tile_of(local, (count + BLOCK_M - 1) // BLOCK_M, num_n, GROUP_M)
        m0 = tile_m * BLOCK_M
        e = e32.to(tl.int64)
        if LAYOUT == MASKED:
            row0 = 0
            a_row = e * rows + m0
        else:
            row0 = tl.sum(tl.where(before, counts, 0), 0)
            a_row = row0 + m0
        _gemm_tile(a_src, a_scale_ptr, b_src, b_scale_ptr, c_ptr, e, row0, m0, count, tile_n, a_row, N, K,
                   stride_ae, stride_am, stride_ase, stride_asm, stride_ask,
                   stride_be, stride_bn, stride_bse, stride_bsn, stride_bsk, stride_ce, stride_cm,
                   FP8, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, WIDEN, TMA, False, PREFETCH)
