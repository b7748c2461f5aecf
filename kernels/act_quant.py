"""Launchers for the elementwise stages around the expert GEMMs (Triton; references beside each).

- `act_quant(x)`: per-token 1x128 FP8 quantization, the input of every W8A8 GEMM
  (reference `kernels.fp8.act_quant_ref`).
- `silu_mul_quant(h)`: SiLU-and-mul fused with that quantization, the input of the second expert GEMM
  (reference `kernels.fp8.silu_mul_quant_ref`).
- `silu_mul(h)`: SiLU-and-mul alone, for bf16 experts (reference `kernels.moe.silu_mul_ref`).

Rows are dense `[M, W]` or masked `[E, max_m, W]` with `masked_m` `[E]`: then only rows before `masked_m[e]` are
read and written (the rest of the output is left as it was), and launch shapes never depend on the counts.
Scales come back as a `[..., W/128]` view stored rows-fastest (`scale.stride(-2) == 1`), the order in which the
GEMM mainloop reads them; `.contiguous()` gives the row-major copy.
"""

from __future__ import annotations

import torch

from kernels.checks import FP8, check_counts, check_same_device, check_shape, check_tensor, require
from kernels.fp8 import ACT_GROUP
from kernels.triton import ensure_runnable

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _scale_buffer(lead: tuple[int, ...], groups: int, device: torch.device) -> torch.Tensor:
    """`[*lead, groups]` float32 stored rows-fastest: `[.., groups, rows]` transposed."""
    return torch.empty(*lead[:-1], groups, lead[-1], dtype=torch.float32, device=device).transpose(-1, -2)


def _launch(x: torch.Tensor, width: int, masked_m: torch.Tensor | None, out: torch.Tensor,
            scale: torch.Tensor | None, *, silu: bool) -> None:
    from kernels.triton.activation import act_kernel

    device = check_same_device({"input": x, "masked_m": masked_m, "out": out, "scale": scale})
    ensure_runnable(device)
    masked = x.dim() == 3
    if masked:
        require(masked_m is not None, "3-D input is the masked layout: pass masked_m `[E]`")
        check_counts(masked_m, "masked_m", x.shape[0])
    else:
        require(masked_m is None, f"masked_m goes with 3-D `[E, max_m, W]` input, got shape {tuple(x.shape)}")
    rows = x.shape[-2]
    if x.numel() == 0 or width == 0:
        return
    block_m = min(64, max(16, _next_pow2(rows)))
    row_tiles = -(-rows // block_m) * (x.shape[0] if masked else 1)

    def lead(t: torch.Tensor) -> tuple[int, int]:
        """(expert stride, row stride); no expert dim in the dense layout."""
        return (t.stride(0), t.stride(1)) if masked else (0, t.stride(0))

    s = scale if scale is not None else out  # the kernel reads no scale pointer when it does not quantize
    s_strides = (s.stride(0) if masked else 0, s.stride(-2), s.stride(-1))
    act_kernel[(row_tiles, -(-width // ACT_GROUP))](
        x, out, s, masked_m, rows, width, *lead(x), *lead(out), *s_strides,
        MASKED=masked, SILU=silu, QUANT=scale is not None, BLOCK_M=block_m, GROUP=ACT_GROUP, num_warps=4,
    )


def _outputs(x: torch.Tensor, width: int, out, quant: bool):
    lead = tuple(x.shape[:-1])
    groups = -(-width // ACT_GROUP)
    if out is None:
        q = torch.empty(*lead, width, dtype=FP8 if quant else x.dtype, device=x.device)
        return (q, _scale_buffer(lead, groups, x.device)) if quant else q
    if quant:
        q, s = out
        check_tensor(q, "out[0]", dims=x.dim(), dtypes=(FP8,))
        check_shape(q, "out[0]", (*lead, width))
        check_tensor(s, "out[1]", dims=x.dim(), dtypes=(torch.float32,), last_contiguous=False)
        check_shape(s, "out[1]", (*lead, groups))
        return q, s
    check_tensor(out, "out", dims=x.dim(), dtypes=(x.dtype,))
    check_shape(out, "out", (*lead, width))
    return out


def act_quant(
    x: torch.Tensor, *, masked_m: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: `[M, K]` or masked `[E, max_m, K]`, bf16/fp16/fp32 -> (q e4m3 like x, scale `[..., ceil(K/128)]` fp32).

    scale = amax / 448 per row per 128 columns; q = x / scale rounded to nearest-even. masked_m: `[E]` int32/int64
    with 3-D x. out: optional (q, scale) to write into.
    """
    check_tensor(x, "x", dims=(2, 3), dtypes=_INPUT_DTYPES)
    q, s = _outputs(x, x.shape[-1], out, quant=True)
    _launch(x, x.shape[-1], masked_m, q, s, silu=False)
    return q, s


def silu_mul_quant(
    h: torch.Tensor, *, masked_m: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h: `[M, 2I]` or masked `[E, max_m, 2I]` (gate columns, then up) -> (e4m3 `[..., I]`, scale `[..., ceil(I/128)]`
    fp32) of `silu(gate) * up` formed in fp32. masked_m and out as in `act_quant`."""
    check_tensor(h, "h", dims=(2, 3), dtypes=_INPUT_DTYPES)
    require(h.shape[-1] % 2 == 0, f"h holds gate then up: its last dim must be even, got {h.shape[-1]}")
    q, s = _outputs(h, h.shape[-1] // 2, out, quant=True)
    _launch(h, h.shape[-1] // 2, masked_m, q, s, silu=True)
    return q, s


def silu_mul(h: torch.Tensor, *, masked_m: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """h: `[M, 2I]` or masked `[E, max_m, 2I]` (gate, then up) -> `silu(gate) * up` `[..., I]` in h's dtype, formed
    in fp32 and rounded once. masked_m as in `act_quant`; out: optional output to write into."""
    check_tensor(h, "h", dims=(2, 3), dtypes=_INPUT_DTYPES)
    require(h.shape[-1] % 2 == 0, f"h holds gate then up: its last dim must be even, got {h.shape[-1]}")
    y = _outputs(h, h.shape[-1] // 2, out, quant=False)
    _launch(h, h.shape[-1] // 2, masked_m, y, None, silu=True)
    return y
