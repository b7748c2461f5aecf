"""DeepSeek-V3/R1: embedding, decoder layers (MLA + dense MLP or MoE), final norm, lm_head.

Built from a mapping of checkpoint-named tensors (see engine.weights); weights are plain tensors, not nn.Parameters,
because this is an inference engine: no autograd, no module hooks.
"""

from __future__ import annotations

from typing import MutableMapping

import torch
import torch.nn.functional as F

from engine import step_timer
from engine.attention import MLAttention
from engine.batch import ForwardBatch
from engine.config import ModelConfig
from engine.kv_cache import LatentKVCache
from engine.layers import MLP, RMSNorm, take
from engine.moe import MoE
from engine.rope import RotaryEmbedding
from eplb.placement import ExpertPlacement
from kernels.attention_backend import AttentionBackend, create_attention_backend
from parallel.dispatcher import Dispatcher, LocalDispatcher


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, weights, layer: int, rope: RotaryEmbedding, moe_args: dict,
                 attn_backend: AttentionBackend):
        p = f"model.layers.{layer}"
        self.input_norm = RMSNorm(take(weights, p + ".input_layernorm.weight"), cfg.rms_norm_eps)
        self.attn = MLAttention(cfg, weights, layer, rope, attn_backend)
        self.post_attn_norm = RMSNorm(take(weights, p + ".post_attention_layernorm.weight"), cfg.rms_norm_eps)
        self.moe = cfg.is_moe_layer(layer)
        self.mlp = MoE(cfg, weights, layer, **moe_args) if self.moe else MLP(weights, p + ".mlp")

    def __call__(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor, cos_sin) -> torch.Tensor:
        h = self.input_norm(x)
        with step_timer.scope("attention"):
            h = self.attn(h, batch, kv_cache, cos_sin)
        x = x + h
        h = self.post_attn_norm(x)
        return x + (self.mlp(h, batch.positions, batch.mode) if self.moe else self.mlp(h))


class DeepseekV3:
    """The model of one rank: replicated attention and dense parts, and the routed expert slots it holds.

    placement: which logical expert fills each physical slot (trivial: slot = expert); rank `ep_rank` of `ep_size`
    holds slots `[ep_rank * P/ep_size, (ep_rank + 1) * P/ep_size)`. `weights` must hold those experts; tensors are
    consumed from it as layers are built. attention_backend: decode attention by name (`kernels.attention_backend`:
    auto, flashinfer, triton, torch; auto is the torch reference on the CPU), reading a KV cache of `page_size`-token
    pages (the page size of the runtime's batches).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        weights: MutableMapping[str, torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        placement: ExpertPlacement | None = None,
        ep_rank: int = 0,
        ep_size: int = 1,
        dispatcher: Dispatcher | None = None,
        attention_backend: str = "auto",
        dispatch_algorithm: str = "static",
        page_size: int = 1,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.placement = placement or ExpertPlacement.trivial(len(cfg.moe_layers), cfg.n_routed_experts)
        slots = self.placement.slots_per_rank(ep_size)
        self.dispatcher = dispatcher or LocalDispatcher(num_local_slots=slots)
        self.embed = take(weights, "model.embed_tokens.weight")
        self.dtype = self.embed.dtype
        self.rope = rope = RotaryEmbedding(cfg, self.device)
        moe_args = dict(placement=self.placement.to_device(self.device), ep_rank=ep_rank, ep_size=ep_size,
                        dispatcher=self.dispatcher, dispatch_algorithm=dispatch_algorithm)
        self.attention_backend = create_attention_backend(
            attention_backend, device=self.device, dtype=self.dtype, kv_lora_rank=cfg.kv_lora_rank,
            rope_dim=cfg.qk_rope_head_dim, page_size=page_size)
        self.layers = [DecoderLayer(cfg, weights, i, rope, moe_args, self.attention_backend)
                       for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(take(weights, "model.norm.weight"), cfg.rms_norm_eps)
        self.lm_head = self.embed if cfg.tie_word_embeddings else take(weights, "lm_head.weight")

    def moe_layers(self) -> list[MoE]:
        """The MoE layers in order (index i is MoE layer i of the placement)."""
        return [layer.mlp for layer in self.layers if layer.moe]

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Switches routing to `placement`, once the expert weights have been moved to match it."""
        self.placement = placement
        on_device = placement.to_device(self.device)
        for layer in self.moe_layers():
            layer.set_placement(on_device)

    def weight_bytes(self) -> int:
        """Bytes of all weight tensors this rank holds (shared tensors counted once)."""
        seen: dict[int, int] = {}

        def visit(obj) -> None:
            for value in vars(obj).values():
                if isinstance(value, torch.Tensor):
                    seen[value.data_ptr()] = value.numel() * value.element_size()
                elif hasattr(value, "__dict__") and not isinstance(
                    value, (Dispatcher, ExpertPlacement, AttentionBackend, type)  # scratch buffers are no weights
                ):
                    visit(value)
                elif isinstance(value, list):
                    for item in value:
                        if hasattr(item, "__dict__"):
                            visit(item)

        visit(self)
        return sum(seen.values())

    def new_kv_cache(self, capacity: int) -> LatentKVCache:
        """A cache for `capacity` tokens across all layers, in the model's dtype."""
        return LatentKVCache(self.cfg.num_hidden_layers, capacity, self.cfg.kv_cache_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: LatentKVCache, all_logits: bool = False) -> torch.Tensor:
        """Runs the batch's new tokens, writing their latents to `kv_cache`.

        Returns float32 logits `[B, vocab]` for each sequence's last new token, or `[T, vocab]` for every new
        token when `all_logits`. Decode batches (one new token per sequence, T == B) gather no rows, so their
        forward builds no index on the host and can be captured in a CUDA graph.
        """
        x = F.embedding(batch.input_ids, self.embed)
        cos_sin = self.rope.lookup(batch.positions, batch.max_seq_len)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, kv_cache.layer(i), cos_sin)
        if not all_logits and not batch.decode:
            x = x[batch.last_token_index]
        return F.linear(self.norm(x), self.lm_head).float()
