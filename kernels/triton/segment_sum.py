"""Fixed-order weighted row sums over a CSR term list (launched by kernels/segment_sum.py).

One program owns one output row's `BLOCK_H` columns: it walks that row's terms in their order, adds each term
(`float(row) * weight`, or `float(row)`) to an fp32 accumulator in registers, and stores the sum once, rounded to the
output dtype. Every term row is read once and every output row written once; no atomics, no fp32 temporaries in
memory. The adds happen in term order, one rounding each, exactly as the torch reference does them, so (with FMA
contraction off at launch) the two agree bit for bit.
"""

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(v):
    """fp32 `v` -> bf16 by round-to-nearest-even on the bit pattern, as torch (and the GPU's `cvt.rn`) rounds.

    Only for Triton's interpreter, whose fp32 -> bf16 cast truncates or rounds ties up; NaN becomes torch's 0x7FC0.
    Adding 0x7FFF plus the kept part's lowest bit carries into the kept half exactly when the dropped half is above
    the midpoint, or at it with an odd kept half; a carry out of the mantissa correctly bumps the exponent.
    """
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)  # NaN: exponent all ones, mantissa not 0
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def segment_sum_kernel(
    rows_ptr, indptr_ptr, src_ptr, weight_ptr, out_ptr,
    hidden, stride_rows, stride_out,
    WEIGHTED: tl.constexpr, BLOCK_H: tl.constexpr, UNROLL: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    """out[r, h] = sum over j in [indptr[r], indptr[r+1]) of weight[j] * rows[src[j], h], in j order, fp32.

    Grid `(R, cdiv(hidden, BLOCK_H))`. indptr: `[R + 1]` int64; src: `[nnz]` int64; weight: `[nnz]` float32, read
    only when WEIGHTED. A row without terms gets zeros. BF16_BY_BITS: round the bf16 output with `round_to_bf16`
    (under the interpreter) instead of the hardware cast.
    Terms go UNROLL at a time: their index and row loads do not depend on one another, so all of them are in flight
    together (a row has 2-4 terms at DeepSeek-V3 shapes), and only the adds wait, in term order.
    """
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    start = tl.load(indptr_ptr + r)
    end = tl.load(indptr_ptr + r + 1)
    # Starting from +0 and adding the first term (rather than taking it as is) matches the reference on -0.
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for first in range(start, end, UNROLL):
        for u in tl.static_range(UNROLL):
            live = first + u < end
            # Past the row's last term, re-read that term's index and weight (always in bounds) but not its row.
            j = tl.minimum(first + u, end - 1)
            s = tl.load(src_ptr + j)
            # Each term row is read by exactly one program per column block: stream it past the cache.
            # (A dead term reads no column; written as a bound because the interpreter mistypes `mask & live`.)
            term = tl.load(rows_ptr + s * stride_rows + offs, mask=offs < tl.where(live, hidden, 0), other=0.0,
                           eviction_policy="evict_first").to(tl.float32)
            if WEIGHTED:
                term = term * tl.load(weight_ptr + j)
            acc = tl.where(live, acc + term, acc)
    out_ptrs = out_ptr + r * stride_out + offs
    if BF16_BY_BITS:
        tl.store(out_ptrs, round_to_bf16(acc), mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
