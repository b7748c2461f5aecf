"""Expert MLPs over dispatched tokens: the pure-torch references for both dispatch layouts, bf16 and FP8.

Each local expert slot e applies `down_e(silu(gate_e(x)) * up_e(x))` to its own rows, with
w13: `[E_local, 2I, H]` (gate rows then up rows) and w2: `[E_local, H, I]`. `grouped_mlp_contiguous` and
`grouped_mlp_masked` are the bf16 CPU path of the engine; `grouped_gemm_ref`, `silu_mul_ref` and `grouped_mlp_ref`
are the references of the Triton launchers in kernels/grouped_gemm.py and kernels/act_quant.py, with their arguments.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kernels.fp8 import act_quant_ref, dequantize_act, dequantize_block_fp8, silu_mul_quant_ref

Layout = Literal["contiguous", "masked"]


def _expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def grouped_mlp_contiguous(
    x: torch.Tensor, tokens_per_expert: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """x: `[N, H]` rows grouped by slot; tokens_per_expert: `[E_local]` int64 summing to N -> `[N, H]`.

    Experts with zero rows are skipped.
    """
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        if n:
            out[start : start + n] = _expert(x[start : start + n], w13[e], w2[e])
        start += n
    return out


def grouped_mlp_masked(x: torch.Tensor, masked_m: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x: `[E_local, max_m, H]`; masked_m: `[E_local]` int64 valid rows per slot -> `[E_local, max_m, H]`.

    Rows past `masked_m[e]` are zero in the output.
    """
    out = torch.zeros_like(x)
    for e, n in enumerate(masked_m.tolist()):
        if n:
            out[e, :n] = _expert(x[e, :n], w13[e], w2[e])
    return out


def silu_mul_ref(h: torch.Tensor, *, masked_m: torch.Tensor | None = None, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """h: `[..., 2I]` gate then up -> `silu(gate) * up` `[..., I]` in h's dtype, formed in fp32 and rounded once.

    Every row is computed; with `masked_m` callers read only the valid rows, as with the kernel. out: optional.
    """
    del masked_m
    gate, up = h.float().chunk(2, dim=-1)
    y = (F.silu(gate) * up).to(h.dtype)
    return y if out is None else out.copy_(y)


def _expert_rows(layout: Layout, counts: torch.Tensor, rows: int) -> list[tuple[int, slice]]:
    """(expert, index into A's leading dims) for every expert with rows, read from the counts on the host."""
    picks, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if layout == "masked":
            if n > rows:
                raise ValueError(f"masked_m[{e}] = {n} exceeds max_m = {rows}")
            if n:
                picks.append((e, (e, slice(0, n))))
        else:
            if n:
                picks.append((e, slice(start, start + n)))
            start += n
    if layout == "contiguous" and start != rows:
        raise ValueError(f"tokens_per_expert sums to {start}, but the input has {rows} rows")
    return picks


def grouped_gemm_ref(
    a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, layout: Layout, *,
    a_scale: torch.Tensor | None = None, b_scale: torch.Tensor | None = None,
    expected_m: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert `A_e @ B_e^T`, formed in fp32 and rounded once to bf16 (A's dtype when A is not fp8).

    a: contiguous `[M, K]` (rows grouped by expert) or masked `[E, max_m, K]`; b: `[E, N, K]`;
    counts: `[E]` int, rows per expert; FP8 adds a_scale `[..., ceil(K/128)]` and b_scale `[E, ceil(N/128),
    ceil(K/128)]` float32. Returns `[M, N]` or `[E, max_m, N]`; masked rows past `counts[e]` are zero here (the
    kernel leaves them unwritten). `expected_m` only tunes the kernel and is ignored.
    """
    del expected_m
    fp8 = a_scale is not None
    shape = (*a.shape[:-1], b.shape[1])
    if out is None:
        out = torch.zeros(shape, dtype=torch.bfloat16 if fp8 else a.dtype, device=a.device)
    elif layout == "masked":
        out.zero_()
    for e, idx in _expert_rows(layout, counts, a.shape[-2]):
        if fp8:
            x = dequantize_act(a[idx], a_scale[idx], torch.float32)
            w = dequantize_block_fp8(b[e], b_scale[e], dtype=torch.float32)
        else:
            x, w = a[idx].float(), b[e].float()
        out[idx] = (x @ w.t()).to(out.dtype)
    return out


def grouped_mlp_ref(
    tokens_hidden: torch.Tensor, tokens_per_expert: torch.Tensor, layout: Layout,
    w13: torch.Tensor, w2: torch.Tensor, *,
    w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
    hidden_scale: torch.Tensor | None = None, expected_m: int | None = None,
) -> torch.Tensor:
    """The expert MLPs, as kernels.grouped_gemm.grouped_mlp computes them, on the CPU or any device.

    bf16 weights (no scales): `grouped_mlp_contiguous` / `grouped_mlp_masked`, the engine's CPU path, unchanged.
    FP8 weights: activations quantized per token per 128 channels before each GEMM, each GEMM in fp32 on the
    dequantized operands, the gate_up output rounded to bf16 in between, as the kernels do. Shapes as `grouped_mlp`.
    """
    if w13_scale is None:
        if hidden_scale is not None:
            tokens_hidden = dequantize_act(tokens_hidden, hidden_scale, w13.dtype)
        if layout == "masked":
            return grouped_mlp_masked(tokens_hidden, tokens_per_expert, w13, w2)
        return grouped_mlp_contiguous(tokens_hidden, tokens_per_expert, w13, w2)
    if hidden_scale is None:
        x_q, x_s = act_quant_ref(tokens_hidden)
    else:
        x_q, x_s = tokens_hidden, hidden_scale
    h = grouped_gemm_ref(x_q, w13, tokens_per_expert, layout, a_scale=x_s, b_scale=w13_scale)
    act_q, act_s = silu_mul_quant_ref(h)
    return grouped_gemm_ref(act_q, w2, tokens_per_expert, layout, a_scale=act_s, b_scale=w2_scale)
