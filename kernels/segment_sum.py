"""Fixed-order weighted row sums, the fold and gather of the EP dispatchers' combine: a Triton launcher and its
pure-torch reference, with the same signature.

    out[r, :] = sum_j weight[j] * rows[src[j], :]   for j in [indptr[r], indptr[r + 1]), in increasing j

Terms are a CSR list: `indptr` `[R + 1]` int64 (indptr[0] = 0, non-decreasing), `src` `[nnz]` int64 rows of `rows`,
`weight` `[nnz]` float32 or None for a plain sum. Every term is `float(row) * weight` (or `float(row)`) rounded to
fp32, the adds run in j order in fp32 starting from +0, and the sum is rounded once to rows' dtype. Both
implementations perform exactly these operations, so they agree bit for bit.

- `segment_sum`: one Triton program per (output row, column block), accumulating in registers.
- `segment_sum_ref`: the torch reference (the CPU path): output rows visited by decreasing term count, so the j-th
  terms of all rows are one gather and one add into a prefix of an fp32 accumulator.

Index values (indptr non-decreasing and ending at nnz, src within rows) are not checked: that would cost a device
synchronisation on every call.
"""

from __future__ import annotations

import torch

from kernels.checks import check_same_device, check_shape, check_tensor, require
from kernels.triton import ensure_runnable, interpreting

_ROW_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Columns per program: one 16-byte bf16 vector per thread at 4 warps, and 7 column blocks at DeepSeek-V3's H = 7168,
# so a fold of ~15k rows launches ~100k small programs, enough in flight to keep HBM busy.
_BLOCK_H = 1024
_NUM_WARPS = 4
# Terms loaded together: the EP folds have 2-4 terms per output row (top-8 over 4 ranks; one per rank at home).
_UNROLL = 4


def _check(rows: torch.Tensor, indptr: torch.Tensor, src: torch.Tensor, weight: torch.Tensor | None,
           out: torch.Tensor | None) -> torch.Tensor:
    """Check the arguments; return the output to write (`out`, or a new `[R, H]` tensor in rows' dtype)."""
    # `is_contiguous()` rather than checks.py's unit-stride test: torch leaves any stride on a dimension of size 1
    # (a one-term list, a one-column row), and the kernel never steps along such a dimension.
    check_tensor(rows, "rows", dims=2, dtypes=_ROW_DTYPES, last_contiguous=False)
    require(rows[:1].is_contiguous(), f"rows must be contiguous in its last dim, got strides {rows.stride()}; "
                                      "call .contiguous() first")
    lists = (("indptr", indptr, torch.int64), ("src", src, torch.int64), ("weight", weight, torch.float32))
    for name, t, dtype in lists:
        if t is not None:
            check_tensor(t, name, dims=1, dtypes=(dtype,), last_contiguous=False)
            require(t.is_contiguous(), f"{name} must be contiguous, got strides {t.stride()}")
    require(indptr.shape[0] >= 1, "indptr must hold R + 1 >= 1 offsets (indptr[0] = 0)")
    if weight is not None:
        check_shape(weight, "weight", tuple(src.shape))
    shape = (indptr.shape[0] - 1, rows.shape[1])
    if out is None:
        out = torch.empty(shape, dtype=rows.dtype, device=rows.device)
    else:
        check_tensor(out, "out", dims=2, dtypes=(rows.dtype,), last_contiguous=False)
        check_shape(out, "out", shape)
        require(out[:1].is_contiguous(), f"out must be contiguous in its last dim, got strides {out.stride()}")
    check_same_device({"rows": rows, "indptr": indptr, "src": src, "weight": weight, "out": out})
    return out


def segment_sum(rows: torch.Tensor, indptr: torch.Tensor, src: torch.Tensor, weight: torch.Tensor | None = None,
                *, out: torch.Tensor | None = None) -> torch.Tensor:
    """rows: `[M, H]` bf16/fp16/fp32, unit column stride; indptr `[R + 1]`, src `[nnz]`, weight `[nnz]` or None as
    in the module docstring; out: optional `[R, H]` in rows' dtype. Returns out `[R, H]`; rows without terms are 0.

    Runs on CUDA tensors, or on CPU ones under Triton's interpreter. No host synchronisation.
    """
    from kernels.triton.segment_sum import segment_sum_kernel

    out = _check(rows, indptr, src, weight, out)
    ensure_runnable(rows.device)
    num_out, hidden = out.shape
    if num_out == 0 or hidden == 0:
        return out
    block_h = min(_BLOCK_H, max(16, 1 << (hidden - 1).bit_length()))
    segment_sum_kernel[(num_out, -(-hidden // block_h))](
        rows, indptr, src, weight if weight is not None else src, out,
        hidden, rows.stride(0), out.stride(0),
        WEIGHTED=weight is not None, BLOCK_H=block_h, UNROLL=_UNROLL,
        BF16_BY_BITS=rows.dtype == torch.bfloat16 and interpreting(),
        num_warps=_NUM_WARPS,
        # A fused multiply-add would skip the product's rounding and break equality with the reference.
        enable_fp_fusion=False,
    )
    return out


def segment_sum_ref(rows: torch.Tensor, indptr: torch.Tensor, src: torch.Tensor, weight: torch.Tensor | None = None,
                    *, out: torch.Tensor | None = None, step_sizes: list[int] | None = None) -> torch.Tensor:
    """The torch reference of `segment_sum`, same arguments and result, bit for bit.

    step_sizes: optional host ints, step_sizes[j] = output rows with more than j terms; callers that already hold
    them (the dispatchers do) spare the reference its one host read of the term counts.
    """
    out = _check(rows, indptr, src, weight, out)
    num_out, hidden = out.shape
    depth = indptr[1:] - indptr[:-1]  # [R] terms per output row
    if step_sizes is None:
        top = int(depth.max()) if num_out else 0
        step_sizes = (depth.unsqueeze(1) > torch.arange(top, device=depth.device)).sum(0).tolist()
    # Accumulator row i holds output row by_depth[i]; the rows with a j-th term are then a prefix of length n_j.
    by_depth = torch.argsort(depth, descending=True, stable=True)  # [R]
    first = indptr[:-1][by_depth]  # [R] each accumulator row's first term
    acc = torch.zeros(num_out, hidden, dtype=torch.float32, device=rows.device)
    for j, n in enumerate(step_sizes):
        if n == 0:
            break
        term = first[:n] + j  # [n_j] the j-th term of the n_j deepest rows
        picked = rows[src[term]]
        # bf16 x fp32 promotes to fp32 in one kernel: float(row) * weight, rounded once.
        acc[:n] += picked.float() if weight is None else torch.mul(picked, weight[term].unsqueeze(1))
    out.index_copy_(0, by_depth, acc.to(rows.dtype))
    return out
