"""MLA (multi-head latent attention) of one decoder layer, over the latent KV cache.

Prefill and extend steps expand the cached latent into per-head keys and values (cheap when queries are many);
decode steps use the absorbed form (W_UK folded into the query, W_UV applied after attention), which reads only
the `kv_lora_rank + qk_rope_head_dim` cached values per token.
"""

from __future__ import annotations

from typing import Mapping

import torch

from engine.batch import ForwardBatch
from engine.config import ModelConfig
from engine.layers import Linear, RMSNorm, take
from engine.rope import RotaryEmbedding
from kernels.attention_backend import AttentionBackend, TorchAttention
from kernels.mla import pages_to_slots
from kernels.mla_extend import mla_extend


class MLAttention:
    def __init__(self, cfg: ModelConfig, weights: Mapping[str, torch.Tensor], layer: int, rope: RotaryEmbedding,
                 backend: AttentionBackend | None = None):
        """backend: decode attention over the latent cache (`kernels.attention_backend`; default: the reference)."""
        p = f"model.layers.{layer}.self_attn"
        self.backend = backend or TorchAttention(torch.device("cpu"))
        self.heads = cfg.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.rope = rope
        if cfg.q_lora_rank is None:
            self.q_proj = Linear.load(weights, p + ".q_proj")
        else:
            self.q_a_proj = Linear.load(weights, p + ".q_a_proj")
            self.q_a_norm = RMSNorm(take(weights, p + ".q_a_layernorm.weight"), cfg.rms_norm_eps)
            self.q_b_proj = Linear.load(weights, p + ".q_b_proj")
        self.q_lora = cfg.q_lora_rank is not None
        self.kv_a_proj = Linear.load(weights, p + ".kv_a_proj_with_mqa")
        self.kv_a_norm = RMSNorm(take(weights, p + ".kv_a_layernorm.weight"), cfg.rms_norm_eps)
        # The absorbed decode path multiplies by slices of W_UK / W_UV, which no FP8 kernel serves: keep it dense.
        self.kv_b_proj = Linear(Linear.load(weights, p + ".kv_b_proj").dequantized())
        # W_UK [heads, nope, r] and W_UV [heads, v, r] for the absorbed decode path (views, no copy).
        kv_b = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        self.w_uk, self.w_uv = kv_b[:, : self.nope], kv_b[:, self.nope :]
        self.o_proj = Linear.load(weights, p + ".o_proj")

    def __call__(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor, cos_sin) -> torch.Tensor:
        """x: `[T, hidden]`; kv_cache: `[slots, r + d_r]` of this layer, written at `batch.out_slots`;
        cos_sin: the rotary tables of the batch's positions (`RotaryEmbedding.lookup`) -> `[T, hidden]`."""
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(t, self.heads, self.nope + self.rope_dim)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        q_rope = self.rope.apply(q_rope, *cos_sin)
        latent, k_rope = self.kv_a_proj(x).split([self.rank, self.rope_dim], dim=-1)
        latent = self.kv_a_norm(latent)
        k_rope = self.rope.apply(k_rope, *cos_sin)
        kv_cache[batch.out_slots] = torch.cat([latent, k_rope], dim=-1).to(kv_cache.dtype)

        if batch.decode:
            out = self._decode(q_nope, q_rope, batch, kv_cache)
        else:
            out = self._extend(q_nope, q_rope, batch, kv_cache)
        return self.o_proj(out.reshape(t, self.heads * self.v_dim))

    def _decode(self, q_nope, q_rope, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Absorbed form: `[B, heads, nope]` queries -> `[B, heads, v]`."""
        q_latent = torch.einsum("bhn,hnr->bhr", q_nope, self.w_uk)
        table = batch.page_table
        if batch.page_size != self.backend.page_size:
            # A backend built for single-token pages reads any paged cache through the expanded slot table.
            if self.backend.page_size != 1:
                raise ValueError(f"batch pages of {batch.page_size} tokens, backend built for "
                                 f"{self.backend.page_size}")
            table = pages_to_slots(table, batch.page_size)
        o_latent = self.backend.decode(q_latent, q_rope, kv_cache, table, batch.seq_lens, self.scale)
        return torch.einsum("bhr,hvr->bhv", o_latent, self.w_uv)

    def _extend(self, q_nope, q_rope, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Per sequence: expand its cached latent to keys/values for every head; `[T, heads, *]` -> `[T, heads, v]`."""
        q = torch.cat([q_nope, q_rope], dim=-1)
        out = torch.empty(q.shape[0], self.heads, self.v_dim, dtype=q.dtype, device=q.device)
        # [B, S_max] slots of every token (page ids are slots when pages hold one token).
        table = batch.page_table if batch.page_size == 1 else pages_to_slots(batch.page_table, batch.page_size)
        start = 0
        for b, (n, prefix) in enumerate(zip(batch.extend_lens, batch.prefix_lens)):
            cached = kv_cache[table[b, : prefix + n]]  # [S, r + d_r]
            latent, k_rope = cached.split([self.rank, self.rope_dim], dim=-1)
            kv = self.kv_b_proj(latent.to(q.dtype)).view(-1, self.heads, self.nope + self.v_dim)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_rope.to(q.dtype).unsqueeze(1).expand(-1, self.heads, -1)], dim=-1)
            out[start : start + n] = mla_extend(q[start : start + n], k, v, prefix, self.scale)
            start += n
        return out
