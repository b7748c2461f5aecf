"""Elementwise stages around the expert GEMMs: SiLU-and-mul, per-token 1x128 FP8 quantization, or both fused.

One program handles `BLOCK_M` rows by one 128-column group, so a group's amax is a row reduction in registers and
each input byte is read once. Rows are either dense (`[M, W]`) or masked (`[E, max_m, W]` with per-expert counts;
tiles past an expert's count exit at once, so nothing reads or writes rows that the dispatcher left undefined).
"""

import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)
# An all-zero group gets this amax, so its scale stays finite and its values quantize to 0.
AMAX_FLOOR = tl.constexpr(1e-12)


@triton.jit
def round_to_e4m3(v):
    """fp32 `v` within [-448, 448] -> the nearest e4m3 value (ties to even), still as fp32.

    The cast to e4m3 that follows is then exact, so the GPU, Triton's interpreter (whose fp32->fp8 cast mis-rounds
    when the mantissa carries into the exponent) and torch's `.to(torch.float8_e4m3fn)` agree bit for bit.
    Adding 2^20 * 2^floor(log2|v|) makes fp32's spacing at the sum equal e4m3's (3 mantissa bits), so the fp32 add
    itself rounds to nearest-even; below e4m3's smallest normal (2^-6) the spacing is fixed at 2^-9.
    """
    mag = tl.abs(v)
    pow2 = (mag.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    big = tl.maximum(pow2, 0.015625) * 1048576.0
    r = (mag + big) - big
    return tl.where(v < 0, -r, r)


@triton.jit
def act_kernel(
    x_ptr, out_ptr, scale_ptr, counts_ptr,
    rows, width,
    stride_xe, stride_xm, stride_oe, stride_om, stride_se, stride_sm, stride_sg,
    MASKED: tl.constexpr, SILU: tl.constexpr, QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
):
    """out[.., :width] = f(x) for one `[BLOCK_M, GROUP]` tile; grid `(row tiles (x experts if MASKED), groups)`.

    SILU: x holds gate then up (`2 * width` columns) and f = silu(gate) * up, computed in fp32; else f = x.
    QUANT: out is e4m3 and scale[row, group] = amax / 448 is written; else out takes f rounded to its dtype.
    rows: rows per expert when MASKED (max_m), else all rows; counts: `[E]` valid rows per expert when MASKED.
    """
    pid = tl.program_id(0)
    group = tl.program_id(1)
    if MASKED:
        row_tiles = tl.cdiv(rows, BLOCK_M)
        e = (pid // row_tiles).to(tl.int64)
        m0 = (pid % row_tiles) * BLOCK_M
        valid = tl.load(counts_ptr + e).to(tl.int32)
    else:
        e = 0
        m0 = pid * BLOCK_M
        valid = rows
    if m0 >= valid:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_c = group * GROUP + tl.arange(0, GROUP)
    row_ok = offs_m < valid
    col_ok = offs_c < width
    mask = row_ok[:, None] & col_ok[None, :]
    x_rows = x_ptr + e * stride_xe + offs_m.to(tl.int64)[:, None] * stride_xm
    if SILU:
        gate = tl.load(x_rows + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_rows + width + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        v = gate * tl.sigmoid(gate) * up
    else:
        v = tl.load(x_rows + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + e * stride_oe + offs_m.to(tl.int64)[:, None] * stride_om + offs_c[None, :]
    if QUANT:
        amax = tl.maximum(tl.max(tl.abs(v), axis=1), AMAX_FLOOR)
        # IEEE divisions, as torch divides, so both pick the same scale and the same e4m3 value at rounding ties.
        scale = tl.math.div_rn(amax, E4M3_MAX)
        q = tl.clamp(tl.math.div_rn(v, scale[:, None]), -E4M3_MAX, E4M3_MAX)
        tl.store(out_ptrs, round_to_e4m3(q).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + e * stride_se + offs_m * stride_sm + group * stride_sg, scale, mask=row_ok)
    else:
        tl.store(out_ptrs, v.to(out_ptr.dtype.element_ty), mask=mask)
