"""Rotary position embedding for MLA's rotary sub-head, with YaRN context extension.

DeepSeek-V3 rotates interleaved pairs `(x0, x1), (x2, x3), ...` of the `qk_rope_head_dim` channels;
`rope_interleave: false` (a transformers option) rotates the halves `(x_i, x_{i+d/2})` instead.
"""

from __future__ import annotations

import math

import torch

from engine.config import ModelConfig, YarnRope


def _yarn_inv_freq(dim: int, base: float, yarn: YarnRope) -> torch.Tensor:
    """`[dim/2]` float32: extrapolated (high-frequency) and interpolated (low-frequency) channels blended by a ramp."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return (1.0 / (yarn.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


class RotaryEmbedding:
    """Precomputed cos/sin tables; `apply` rotates `[..., qk_rope_head_dim]` tensors at given positions."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str, max_positions: int | None = None) -> None:
        dim = cfg.qk_rope_head_dim
        if cfg.rope is None:
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            scale = 1.0
        else:
            inv_freq = _yarn_inv_freq(dim, cfg.rope_theta, cfg.rope)
            scale = cfg.rope.cos_sin_scale
        self.interleave = cfg.rope_interleave
        self.inv_freq = inv_freq.to(device)
        self.scale = scale
        self._build(max_positions or min(cfg.max_position_embeddings, 8192), device)

    def _build(self, n: int, device: torch.device | str) -> None:
        freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=device), self.inv_freq)  # [n, dim/2]
        self.cos = freqs.cos() * self.scale
        self.sin = freqs.sin() * self.scale

    def lookup(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: `[T]` int64, all < max_position (known on the host, so no device sync) -> cos, sin `[T, d/2]`."""
        if max_position > self.cos.shape[0]:
            self._build(max(max_position, 2 * self.cos.shape[0]), self.cos.device)
        return self.cos[positions], self.sin[positions]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: `[T, ..., d]`; cos, sin: `[T, d/2]` from `lookup` -> rotated x, same shape and dtype (math in fp32)."""
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        cos, sin = cos.view(shape), sin.view(shape)
        xf = x.float()
        if self.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            half = x.shape[-1] // 2
            x1, x2 = xf[..., :half], xf[..., half:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)
