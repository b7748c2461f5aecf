"""Random DeepSeek-V3 weights: for tests and benchmarks without a real checkpoint, and for the checkpoint generator.

`random_tensor` is the one place a checkpoint tensor is made up: `dummy_weights` converts its output exactly as
`load_weights` converts a stored tensor, and `scripts/make_checkpoint.py` writes it to disk. So on one device and seed,
`dummy_weights(cfg, seed=s)` equals `load_weights(write_checkpoint(cfg, out, seed=s), cfg)` tensor for tensor.
Each tensor draws from its own generator seeded by (seed, name), so one rank's share of the experts holds the same
values as the whole model does. Values differ between CPU and CUDA (different random number generators).

Scales keep a forward pass finite at any size: projections ~ N(0, 1/in_features) (variance-preserving), norms ~ 1,
a small router (sigmoid scores near 0.5, but not all equal) and a small selection bias of both signs.
"""

from __future__ import annotations

import zlib
from collections.abc import MutableMapping
from typing import Iterable, Iterator

import torch

from engine.config import ModelConfig
from engine.loader import check_experts, convert, is_scale, output_specs
from engine.weights import FP8_DTYPE, SCALE_SUFFIX, TensorSpec, checkpoint_tensors, scale_shape
from kernels.fp8 import FP8_MAX

# Spread of the e4m3 values before scaling: the block maximum (~4.5 sigma) stays well inside FP8_MAX = 448
# while the bulk sits far above e4m3's subnormals (< 2^-6), as in a real quantized checkpoint.
_Q_STD = FP8_MAX / 8


def _generator(name: str, seed: int, device: torch.device) -> torch.Generator:
    """A generator of its own per tensor: values do not depend on which other tensors are made."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def random_tensor(
    name: str,
    spec: TensorSpec,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    block: tuple[int, int] = (128, 128),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One checkpoint tensor as stored, made on `device`: (`spec.shape` in `spec.dtype`, scale_inv or None).

    A quantized `[N, K]` weight comes as e4m3 plus its `[ceil(N/bn), ceil(K/bk)]` fp32 `scale_inv`, with block scales
    that differ (so a transposed or misaligned scale layout shows up in tests) and product ~ N(0, 1/K).
    Non-quantized tensors are drawn directly in their dtype: no fp32 copy of a large matrix.
    """
    device = torch.device(device)
    gen = _generator(name, seed, device)
    if spec.quantized:
        q = torch.randn(spec.shape, generator=gen, device=device, dtype=torch.bfloat16)
        q = q.mul_(_Q_STD).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale = torch.empty(scale_shape(spec.shape, block), device=device).uniform_(0.5, 1.5, generator=gen)
        return q, scale.mul_(spec.shape[1] ** -0.5 / _Q_STD)
    out = torch.empty(spec.shape, dtype=spec.dtype, device=device)
    if name.endswith("norm.weight"):  # RMSNorm gains: input_layernorm, kv_a_layernorm, model.norm, MTP enorm ...
        return out.normal_(1.0, 0.05, generator=gen), None
    if name.endswith("e_score_correction_bias"):
        return out.normal_(0.0, 0.02, generator=gen), None
    if name.endswith("embed_tokens.weight"):  # RMSNorm follows, so unit scale is as good as any
        return out.normal_(0.0, 1.0, generator=gen), None
    if name.endswith("mlp.gate.weight"):  # router logits ~ N(0, 1/4): distinct scores, none saturated
        return out.normal_(0.0, 0.5 * spec.shape[1] ** -0.5, generator=gen), None
    if len(spec.shape) == 2:  # projections and lm_head: variance-preserving
        return out.normal_(0.0, spec.shape[1] ** -0.5, generator=gen), None
    return out.normal_(0.0, 0.02, generator=gen), None


def random_tensors(
    specs: dict[str, TensorSpec],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    block: tuple[int, int] = (128, 128),
) -> Iterator[tuple[str, TensorSpec, torch.Tensor, torch.Tensor | None]]:
    """(name, spec, tensor, scale_inv or None) for each tensor of `specs` in order, one at a time.

    A quantized weight's `_scale_inv` entry is not yielded on its own: it comes with its weight.
    """
    for name, spec in specs.items():
        if not is_scale(name, specs):
            yield name, spec, *random_tensor(name, spec, seed=seed, device=device, block=block)


def dummy_weights(
    cfg: ModelConfig,
    *,
    experts: Iterable[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    keep_fp8: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random weights with the names, shapes and dtypes `load_weights(..., experts, dtype, keep_fp8)` returns.

    Built tensor by tensor on `device`; `device="meta"` allocates nothing (shapes only). With `cfg.quant` the
    weights are made in e4m3 and dequantized to `dtype` (kept as e4m3 + `_scale_inv` when `keep_fp8`).
    """
    experts = check_experts(cfg, experts)
    if torch.device(device).type == "meta":
        return {name: torch.empty(spec.shape, dtype=spec.dtype, device="meta")
                for name, spec in output_specs(cfg, experts, dtype=dtype, keep_fp8=keep_fp8).items()}
    block = cfg.quant.block if cfg.quant is not None else (128, 128)
    out: dict[str, torch.Tensor] = {}
    for name, spec, tensor, scale in random_tensors(checkpoint_tensors(cfg, experts), seed=seed, device=device,
                                                    block=block):
        out.update(convert(name, spec, tensor, scale, cfg, dtype=dtype, keep_fp8=keep_fp8))
    return out


class LazyDummyWeights(MutableMapping):
    """The mapping `dummy_weights` returns, made one tensor at a time as the model asks for it.

    A tensor is created on first access and kept until popped; the model pops each expert's tensors once it has
    copied them into its stacked layout, so building a full-width model never holds a MoE layer twice on the device.
    Values equal `dummy_weights` with the same arguments.
    """

    def __init__(self, cfg: ModelConfig, *, experts: Iterable[int] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, keep_fp8: bool = False,
                 seed: int = 0) -> None:
        experts = check_experts(cfg, experts)
        self._cfg, self._device, self._dtype, self._keep_fp8, self._seed = cfg, torch.device(device), dtype, keep_fp8, seed
        self._specs = checkpoint_tensors(cfg, experts)
        self._names = set(output_specs(cfg, experts, dtype=dtype, keep_fp8=keep_fp8))
        self._made: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._made:
            if name not in self._names:
                raise KeyError(name)
            base = name.removesuffix(SCALE_SUFFIX) if is_scale(name, self._specs) else name
            block = self._cfg.quant.block if self._cfg.quant is not None else (128, 128)
            tensor, scale = random_tensor(base, self._specs[base], seed=self._seed, device=self._device, block=block)
            self._made.update(convert(base, self._specs[base], tensor, scale, self._cfg, dtype=self._dtype,
                                      keep_fp8=self._keep_fp8))
        return self._made[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._names.add(name)
        self._made[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self._names:
            raise KeyError(name)
        self._names.discard(name)
        self._made.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)
