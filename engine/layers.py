"""Building blocks shared by attention and MLPs: RMSNorm, a linear layer over checkpoint weights, the SiLU MLP."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from engine.weights import SCALE_SUFFIX
from kernels.fp8 import dequantize_block_fp8
from kernels.fp8_gemm import fp8_linear

# FP8 weights are kept only with the official 128x128 blocks and a bf16 model (engine.build decides).
FP8_BLOCK = (128, 128)
FP8_COMPUTE_DTYPE = torch.bfloat16


def take(weights: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """A tensor the loader must have produced; a missing one is a bug in the weight table, not user input."""
    try:
        return weights[name]
    except KeyError:
        raise KeyError(f"weight '{name}' was not loaded; engine.weights.checkpoint_tensors and the model disagree")


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight  # [D]
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[..., D]` -> same shape and dtype; the statistics in fp32, as the reference model computes them."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear:
    """`y = x @ W^T` over a checkpoint weight `W[out, in]`.

    Either W in the compute dtype, or (FP8 checkpoints on GPUs) W as stored, e4m3 with `scale_inv`
    `[ceil(out/128), ceil(in/128)]`: then activations are quantized per token per 128 channels and the block-scaled
    FP8 GEMM runs (`kernels.fp8_gemm.fp8_linear`).
    """

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.scale_inv = scale_inv

    @classmethod
    def load(cls, weights: Mapping[str, torch.Tensor], prefix: str) -> "Linear":
        return cls(take(weights, prefix + ".weight"), weights.get(prefix + ".weight" + SCALE_SUFFIX))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dequantized(self) -> torch.Tensor:
        """W in the compute dtype `[out, in]` (bf16 for an FP8 weight): for products no FP8 kernel serves."""
        if self.scale_inv is None:
            return self.weight
        return dequantize_block_fp8(self.weight, self.scale_inv, FP8_BLOCK, FP8_COMPUTE_DTYPE)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[..., in]` -> `[..., out]`."""
        if self.scale_inv is None:
            return F.linear(x, self.weight)
        return fp8_linear(x, self.weight, self.scale_inv)


def stack_rows(parts: list[Linear]) -> Linear:
    """One linear layer computing `parts` side by side (their weights stacked along `out`).

    FP8 weights stay FP8 when every part but the last fills whole 128-row scale blocks; otherwise they are
    dequantized, since a scale block would straddle two parts.
    """
    if all(p.scale_inv is None for p in parts):
        return Linear(torch.cat([p.weight for p in parts], 0))
    if all(p.out_features % FP8_BLOCK[0] == 0 for p in parts[:-1]):
        return Linear(torch.cat([p.weight for p in parts], 0), torch.cat([p.scale_inv for p in parts], 0))
    return Linear(torch.cat([p.dequantized() for p in parts], 0))


class MLP:
    """SwiGLU MLP `down(silu(gate(x)) * up(x))`: the dense layers and the shared experts."""

    def __init__(self, weights: Mapping[str, torch.Tensor], prefix: str) -> None:
        gate = Linear.load(weights, prefix + ".gate_proj")
        up = Linear.load(weights, prefix + ".up_proj")
        self.inter = gate.out_features
        self.gate_up = stack_rows([gate, up])  # one GEMM for both: [2I, H]
        self.down = Linear.load(weights, prefix + ".down_proj")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[T, H]` -> `[T, H]`."""
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down(F.silu(gate) * up)
