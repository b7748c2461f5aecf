"""Prefill/extend attention of MLA's expanded form: one sequence's new tokens over its prefix and themselves.

On GPUs this goes through `torch.nn.functional.scaled_dot_product_attention`, which runs fused FlashAttention-style
kernels and never holds the `[heads, n, S]` score matrix (the reference materialises it in float32: 2 GB for one
2000-token prompt of DeepSeek-V3's 128 heads, the larger part of a prefill step). Elsewhere the reference
`kernels.mla.mla_extend_torch` runs, so CPU results are the reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kernels.mla import mla_extend_torch

BACKENDS = ("auto", "sdpa", "torch")


def mla_extend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float) -> torch.Tensor:
    """`mla_extend_torch` through SDPA. q: `[n, heads, d_qk]` at positions prefix_len .. prefix_len + n - 1;
    k: `[S, heads, d_qk]`, v: `[S, heads, d_v]` at positions 0 .. S - 1 (S = prefix_len + n) -> `[n, heads, d_v]`
    in q's dtype.

    v is zero-padded to d_qk where the widths differ (DeepSeek-V3: 192 and 128): the flash kernels want one head
    width, and the padded columns of the output are zeros that are sliced away.
    """
    n, s = q.shape[0], k.shape[0]
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if d_v < d_qk:
        v = F.pad(v, (0, d_qk - d_v))
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, len, d]
    if prefix_len == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        # Token i of the chunk sits at position prefix_len + i: the causal mask aligned to the bottom right.
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(n, s), scale=scale)
    return out[0, :, :, :d_v].transpose(0, 1)


def mla_extend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float,
               backend: str = "auto") -> torch.Tensor:
    """Shapes as `mla_extend_sdpa`. backend: "sdpa", "torch" (the reference), or "auto": SDPA on CUDA tensors,
    the reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "sdpa" or (backend == "auto" and q.is_cuda):
        return mla_extend_sdpa(q, k, v, prefix_len, scale)
    return mla_extend_torch(q, k, v, prefix_len, scale)
