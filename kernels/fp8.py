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


# --- Activations: per token per 128 channels (1x128 groups) -----------------------------------------------------
#
# x `[..., K]` -> e4m3 `[..., K]` plus fp32 scales `[..., ceil(K/128)]`, scale = amax / 448 per group (a group's
# largest magnitude maps to the e4m3 maximum), `x ~= q * scale`. These are the references of the Triton kernels in
# kernels/act_quant.py and take the same arguments; like them, they define only rows before `masked_m[e]` when given
# one (here every row is computed).

ACT_GROUP = 128
_AMAX_FLOOR = 1e-12  # an all-zero group keeps a finite scale and quantizes to zeros


def _quantize_groups(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v: `[..., K]` float32 -> (q `[..., K]` e4m3, scale `[..., ceil(K/128)]` float32)."""
    k = v.shape[-1]
    groups = -(-k // ACT_GROUP)
    padded = torch.nn.functional.pad(v, (0, groups * ACT_GROUP - k)).unflatten(-1, (groups, ACT_GROUP))
    amax = padded.abs().amax(-1).clamp(min=_AMAX_FLOOR)
    # A tensor divisor: on CUDA torch divides by a Python scalar through its reciprocal, which can differ from an
    # IEEE division (what the kernel does) in the last bit.
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (padded / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).flatten(-2)[..., :k]
    return q.to(torch.float8_e4m3fn), scale


def _written(result: tuple[torch.Tensor, torch.Tensor], out: tuple[torch.Tensor, torch.Tensor] | None):
    if out is None:
        return result
    out[0].copy_(result[0])
    out[1].copy_(result[1])
    return out


def act_quant_ref(
    x: torch.Tensor, *, masked_m: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: `[M, K]` or masked `[E, max_m, K]`, any float -> (q like x in e4m3, scale `[..., ceil(K/128)]` float32).

    masked_m is accepted for parity with the kernel: every row is computed, callers read only the valid ones.
    out: optional (q, scale) to write into.
    """
    del masked_m
    return _written(_quantize_groups(x.float()), out)


def silu_mul_quant_ref(
    h: torch.Tensor, *, masked_m: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h: `[..., 2I]` gate then up -> quantized `silu(gate) * up` (formed in fp32): (e4m3 `[..., I]`, scale
    `[..., ceil(I/128)]` float32). masked_m and out as in `act_quant_ref`."""
    del masked_m
    gate, up = h.float().chunk(2, dim=-1)
    return _written(_quantize_groups(torch.nn.functional.silu(gate) * up), out)


def dequantize_act(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q: `[..., K]` e4m3, scale: `[..., ceil(K/128)]` float32 -> `[..., K]` in `dtype` (product in fp32)."""
    k = q.shape[-1]
    return (q.float() * scale.float().repeat_interleave(ACT_GROUP, -1)[..., :k]).to(dtype)


# --- W8A8 block-scaled GEMM ---------------------------------------------------------------------------------------


def fp8_gemm_ref(
    a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    *, out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (a_q * a_scale) @ (w_q * w_scale)^T, in fp32, rounded once to `out_dtype`.

    a_q: `[M, K]` e4m3; a_scale: `[M, ceil(K/128)]` float32; w_q: `[N, K]` e4m3; w_scale: `[ceil(N/128),
    ceil(K/128)]` float32 -> `[M, N]` (written into `out` if given). The reference of kernels.fp8_gemm.fp8_gemm.
    """
    a = dequantize_act(a_q, a_scale, torch.float32)
    y = (a @ dequantize_block_fp8(w_q, w_scale, dtype=torch.float32).t()).to(out_dtype)
    return y if out is None else out.copy_(y)
