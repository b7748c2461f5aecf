"""W8A8 block-scaled FP8 GEMM for the dense projections (attention, dense MLPs, shared experts): Triton launchers.

Weights stay as the checkpoint stores them (e4m3 `[N, K]` plus `weight_scale_inv` `[ceil(N/128), ceil(K/128)]`);
activations are quantized per token per 128 channels on the fly (`kernels.act_quant.act_quant`).
"""

from __future__ import annotations

import torch

from kernels.act_quant import act_quant
from kernels.checks import FP8, check_same_device, check_shape, check_tensor, require
from kernels.fp8 import ACT_GROUP, act_quant_ref, fp8_gemm_ref
from kernels.gluon_gemm import gluon_supported
from kernels.grouped_gemm import BACKENDS, TileConfig, pick_tile, run_gemm


def fp8_gemm(
    a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *,
    out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None, config: TileConfig | None = None,
) -> torch.Tensor:
    """y = (a_q * a_scale) @ (w_q * w_scale)^T with fp32 accumulation, in Triton. Reference: `kernels.fp8.fp8_gemm_ref`.

    a_q: `[M, K]` e4m3; a_scale: `[M, ceil(K/128)]` float32, any strides; w_q: `[N, K]` e4m3; w_scale:
    `[ceil(N/128), ceil(K/128)]` float32 -> `[M, N]` in out_dtype (bf16/fp16/fp32), written into `out` if given.
    """
    check_tensor(a_q, "a_q", dims=2, dtypes=(FP8,))
    check_tensor(w_q, "w_q", dims=2, dtypes=(FP8,))
    (m, k), n = a_q.shape, w_q.shape[0]
    require(w_q.shape[1] == k, f"a_q is `[M, K]` with K = {k} but w_q is `[N, K]` with K = {w_q.shape[1]}")
    check_tensor(a_scale, "a_scale", dims=2, dtypes=(torch.float32,), last_contiguous=False)
    check_shape(a_scale, "a_scale", (m, -(-k // ACT_GROUP)))
    check_tensor(w_scale, "w_scale", dims=2, dtypes=(torch.float32,), last_contiguous=False)
    check_shape(w_scale, "w_scale", (-(-n // ACT_GROUP), -(-k // ACT_GROUP)))
    require(out_dtype in (torch.bfloat16, torch.float16, torch.float32), f"out_dtype {out_dtype} is not supported")
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    else:
        check_tensor(out, "out", dims=2, dtypes=(out_dtype,))
        check_shape(out, "out", (m, n))
    check_same_device({"a_q": a_q, "a_scale": a_scale, "w_q": w_q, "w_scale": w_scale, "out": out})
    cfg = config or pick_tile(True, m, n, k)
    if cfg.gluon and gluon_supported("contiguous", a_q, k, True) and w_q.is_contiguous():
        # One expert holding every row: the contiguous layout's Gluon kernels serve dense GEMMs too. The count
        # is made on the device (no host sync, fine inside a CUDA graph).
        counts = torch.full((1,), m, dtype=torch.int32, device=a_q.device)
        return run_gemm("contiguous", a_q, w_q[None], out, counts=counts, a_scale=a_scale, b_scale=w_scale[None],
                        config=cfg)
    if config is None:
        cfg = pick_tile(True, m, n, k, "dense")
    return run_gemm("dense", a_q, w_q, out, a_scale=a_scale, b_scale=w_scale, config=cfg)


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """`x @ W^T` for an FP8 checkpoint weight: x `[..., K]` bf16/fp16/fp32 -> `[..., N]` bf16.

    x is quantized per token per 128 channels, then multiplied by w_q `[N, K]` e4m3 with w_scale `[ceil(N/128),
    ceil(K/128)]` float32. backend: "triton", "torch" (references), "auto" (Triton on CUDA, references elsewhere).
    """
    require(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "torch":
        y = fp8_gemm_ref(*act_quant_ref(x2), w_q, w_scale)
    else:
        y = fp8_gemm(*act_quant(x2.contiguous()), w_q, w_scale)
    return y.reshape(*lead, w_q.shape[0])
