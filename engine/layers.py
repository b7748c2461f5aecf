"""Building blocks shared by attention and MLPs: RMSNorm, a linear layer over checkpoint weights, the SiLU MLP."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F


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
    """`y = x @ W^T` over a checkpoint weight `W[out, in]` already in the compute dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    @classmethod
    def load(cls, weights: Mapping[str, torch.Tensor], prefix: str) -> "Linear":
        return cls(take(weights, prefix + ".weight"))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[..., in]` -> `[..., out]`."""
        return F.linear(x, self.weight)


class MLP:
    """SwiGLU MLP `down(silu(gate(x)) * up(x))`: the dense layers and the shared experts."""

    def __init__(self, weights: Mapping[str, torch.Tensor], prefix: str) -> None:
        gate = take(weights, prefix + ".gate_proj.weight")
        up = take(weights, prefix + ".up_proj.weight")
        self.inter = gate.shape[0]
        self.gate_up = Linear(torch.cat([gate, up], 0))  # one GEMM for both: [2I, H]
        self.down = Linear.load(weights, prefix + ".down_proj")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[T, H]` -> `[T, H]`."""
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down(F.silu(gate) * up)
