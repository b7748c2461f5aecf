"""MLA decode attention backends, chosen by name (`--attention-backend {auto,flashinfer,triton,torch}`).

Every backend computes what `kernels.mla.mla_decode_torch` computes, over the same paged latent cache:
`decode(q_latent [B, H, r], q_rope [B, H, d_r], kv_cache [slots, r + d_r], page_table [B, max_pages] int page ids,
seq_lens [B] int, scale) -> [B, H, r]` in q's dtype. `auto` takes the first of flashinfer, triton, torch that can
run the model on its device: flashinfer on a GPU where it is installed, else our Triton kernel on a GPU, the torch
reference on the CPU. Backends import their kernels on first use, so choosing one never imports another's.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from engine.errors import WideepError
from kernels.mla import mla_decode_torch, pages_to_slots

ATTENTION_BACKENDS = ("flashinfer", "triton", "torch")  # the order `auto` tries them in
_REGISTRY: dict[str, type[AttentionBackend]] = {}
log = logging.getLogger("wideep")


class AttentionBackend(ABC):
    """Decode attention of one new token per sequence over the latent cache (absorbed MLA: one shared KV head).

    One object serves every layer of a model; it holds the page size of the cache (1: page ids are slots).
    """

    name: ClassVar[str]

    def __init__(self, device: torch.device, page_size: int = 1):
        self.device = torch.device(device)
        self.page_size = page_size

    @classmethod
    def unsupported(cls, device: torch.device, dtype: torch.dtype, kv_lora_rank: int, rope_dim: int) -> str | None:
        """Why this backend cannot run a model of these sizes on `device`, or None when it can."""
        return None

    @abstractmethod
    def decode(
        self,
        q_latent: torch.Tensor,
        q_rope: torch.Tensor,
        kv_cache: torch.Tensor,
        page_table: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q_latent: `[B, H, r]`; q_rope: `[B, H, d_r]`; kv_cache: `[slots, r + d_r]`; page_table: `[B, max_pages]`
        int64 page ids; seq_lens: `[B]` int64 (>= 1) -> `[B, H, r]` in q_latent's dtype."""

    def plan_graph(self, page_table: torch.Tensor, seq_lens: torch.Tensor, *, num_heads: int, kv_lora_rank: int,
                   rope_dim: int, scale: float, dtype: torch.dtype) -> None:
        """Host-side preparation, outside any CUDA graph, for decode calls that read these very tensors inside one:
        page_table `[B, max_pages]` int64 and seq_lens `[B]` int64, static buffers whose contents change between
        replays and whose addresses never do. Called before capturing and before every replay, with their contents
        for that replay. Default: nothing to prepare (the kernel reads everything on the device)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(page_size={self.page_size})"


def register_attention_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    """Class decorator: makes `cls` choosable by its `name`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"attention backend {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


@register_attention_backend
class TorchAttention(AttentionBackend):
    """The pure-torch reference: any device and dtype; gathers the whole padded page table (slow on GPUs)."""

    name = "torch"

    def decode(self, q_latent, q_rope, kv_cache, page_table, seq_lens, scale):
        if self.page_size > 1:
            page_table = pages_to_slots(page_table, self.page_size)
        return mla_decode_torch(q_latent, q_rope, kv_cache, page_table, seq_lens, scale)


@register_attention_backend
class TritonAttention(AttentionBackend):
    """Our split-KV Triton kernel (`kernels.mla_triton`): any sizes, bfloat16/float16/float32."""

    name = "triton"

    @classmethod
    def unsupported(cls, device, dtype, kv_lora_rank, rope_dim):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "it needs a CUDA GPU (or TRITON_INTERPRET=1, Triton's slow CPU interpreter, for debugging)"
        return None

    def decode(self, q_latent, q_rope, kv_cache, page_table, seq_lens, scale):
        from kernels.mla_triton import mla_decode_triton

        return mla_decode_triton(q_latent, q_rope, kv_cache, page_table, seq_lens, scale, page_size=self.page_size)


@register_attention_backend
class FlashInferAttention(AttentionBackend):
    """flashinfer's MLA paged decode (`kernels.mla_flashinfer`): CUDA, bfloat16/float16, r = 512 and d_r = 64."""

    name = "flashinfer"

    def __init__(self, device: torch.device, page_size: int = 1):
        super().__init__(device, page_size)
        from kernels.mla_flashinfer import FlashInferMLADecode

        self._decode = FlashInferMLADecode(self.device, page_size)

    @classmethod
    def unsupported(cls, device, dtype, kv_lora_rank, rope_dim):
        if device.type != "cuda":
            return "it needs a CUDA GPU"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"it runs bfloat16 or float16, not {str(dtype).removeprefix('torch.')}"
        if (kv_lora_rank, rope_dim) != (512, 64):
            return (f"its kernels are built for kv_lora_rank 512 and qk_rope_head_dim 64, this model has "
                    f"{kv_lora_rank} and {rope_dim}")
        from kernels.mla_flashinfer import import_flashinfer

        try:
            import_flashinfer()
        except ImportError as err:
            return str(err)
        return None

    def decode(self, q_latent, q_rope, kv_cache, page_table, seq_lens, scale):
        return self._decode(q_latent, q_rope, kv_cache, page_table, seq_lens, scale)

    def plan_graph(self, page_table, seq_lens, *, num_heads, kv_lora_rank, rope_dim, scale, dtype):
        self._decode.plan_graph(page_table, seq_lens, num_heads, kv_lora_rank, rope_dim, scale, dtype)


def create_attention_backend(
    name: str = "auto",
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    kv_lora_rank: int,
    rope_dim: int,
    page_size: int = 1,
) -> AttentionBackend:
    """The backend `name` (or, for `auto`, the first of `ATTENTION_BACKENDS` that can run here) for a model whose
    cache holds `kv_lora_rank + rope_dim` values per token in `dtype` on `device`.

    Raises WideepError naming the reason when an explicitly chosen backend cannot run.
    """
    device = torch.device(device)
    if name == "auto":
        # Off the GPU, auto is always the reference: CPU results must not depend on TRITON_INTERPRET being set.
        for candidate in ATTENTION_BACKENDS if device.type == "cuda" else ("torch",):
            reason = _REGISTRY[candidate].unsupported(device, dtype, kv_lora_rank, rope_dim)
            if reason is None:
                log.info("attention backend: %s (auto)", candidate)
                return _REGISTRY[candidate](device, page_size)
            log.debug("attention backend auto: not %s, %s", candidate, reason)
    if name not in _REGISTRY:
        raise WideepError(f"--attention-backend {name}: choose one of auto, {', '.join(ATTENTION_BACKENDS)}")
    reason = _REGISTRY[name].unsupported(device, dtype, kv_lora_rank, rope_dim)
    if reason is not None:
        raise WideepError(f"--attention-backend {name} cannot run here: {reason}")
    return _REGISTRY[name](device, page_size)
