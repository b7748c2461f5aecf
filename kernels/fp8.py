"""Block-scaled FP8 (e4m3) weights: the pure-torch reference for quantizing and dequantizing.

A weight `w[N, K]` is stored as e4m3 `q[N, K]` plus fp32 `scale_inv[ceil(N/bn), ceil(K/bk)]`, one scale per
`bn x bk` block (the last blocks may be partial); `w ~= q * scale_inv` block by block.
"""

from __future__ import annotations

import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0


def _expand_scales(scale_inv: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """`[ceil(N/bn), ceil(K/bk)]` -> `[N, K]` by repeating each block's scale."""
    n, k = shape
    return scale_inv.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]


def dequantize_block_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """q: `[N, K]` float8_e4m3fn; scale_inv: `[ceil(N/bn), ceil(K/bk)]` float32 -> `[N, K]` in `dtype`.

    The product is formed in fp32 and rounded once to `dtype`.
    """
    if q.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"expected 2-D weight and scales, got {tuple(q.shape)} and {tuple(scale_inv.shape)}")
    want = (-(-q.shape[0] // block[0]), -(-q.shape[1] // block[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)}: "
                         f"expected {want} for {block[0]}x{block[1]} blocks")
    return (q.float() * _expand_scales(scale_inv.float(), q.shape, block)).to(dtype)


def quantize_block_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w: `[N, K]` any float -> (q `[N, K]` float8_e4m3fn, scale_inv `[ceil(N/bn), ceil(K/bk)]` float32).

    Each block's scale maps its largest magnitude to the e4m3 maximum (448), so no value saturates.
    """
    n, k = w.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [nb, kb]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(nb * bn, kb * bk)[:n, :k]
    return q.to(torch.float8_e4m3fn).contiguous(), scale_inv.contiguous()
