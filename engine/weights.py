"""The tensors of a DeepSeek-V3 checkpoint in the official release's names, shapes and dtypes.

One table serves the loader (what to read and check), the dummy-weight builder and the checkpoint generator.
In an FP8 checkpoint every projection matrix is e4m3 with a companion `<name>_scale_inv` holding one fp32 scale per
128x128 block (multiply to dequantize); embeddings, norms, the router and lm_head stay in the checkpoint dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from engine.config import ModelConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    quantized: bool = False  # an fp8 weight whose `<name>_scale_inv` follows it in the table


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """`weight_scale_inv` shape for a `[out, in]` weight: one scale per (partial) block."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _projections(cfg: ModelConfig, layer: int, experts: Iterable[int]) -> dict[str, tuple[int, int]]:
    """Every projection matrix of one decoder layer, `[out_features, in_features]`."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    p = f"model.layers.{layer}."
    out: dict[str, tuple[int, int]] = {}
    if cfg.q_lora_rank is None:
        out[p + "self_attn.q_proj.weight"] = (heads * cfg.qk_head_dim, h)
    else:
        out[p + "self_attn.q_a_proj.weight"] = (cfg.q_lora_rank, h)
        out[p + "self_attn.q_b_proj.weight"] = (heads * cfg.qk_head_dim, cfg.q_lora_rank)
    out[p + "self_attn.kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
    out[p + "self_attn.kv_b_proj.weight"] = (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    out[p + "self_attn.o_proj.weight"] = (h, heads * cfg.v_head_dim)

    def mlp(prefix: str, inter: int) -> None:
        out[prefix + "gate_proj.weight"] = (inter, h)
        out[prefix + "up_proj.weight"] = (inter, h)
        out[prefix + "down_proj.weight"] = (h, inter)

    if not cfg.is_moe_layer(layer):
        mlp(p + "mlp.", cfg.intermediate_size)
        return out
    for e in experts:
        mlp(p + f"mlp.experts.{e}.", cfg.moe_intermediate_size)
    if cfg.n_shared_experts:
        mlp(p + "mlp.shared_experts.", cfg.moe_intermediate_size * cfg.n_shared_experts)
    return out


def _plain(cfg: ModelConfig, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Norms and the router of one layer: never quantized."""
    dt = DTYPES[cfg.dtype]
    p = f"model.layers.{layer}."
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        p + "input_layernorm.weight": ((cfg.hidden_size,), dt),
        p + "post_attention_layernorm.weight": ((cfg.hidden_size,), dt),
        p + "self_attn.kv_a_layernorm.weight": ((cfg.kv_lora_rank,), dt),
    }
    if cfg.q_lora_rank is not None:
        out[p + "self_attn.q_a_layernorm.weight"] = ((cfg.q_lora_rank,), dt)
    if cfg.is_moe_layer(layer):
        out[p + "mlp.gate.weight"] = ((cfg.n_routed_experts, cfg.hidden_size), dt)
        # The official release keeps the selection bias in fp32.
        out[p + "mlp.gate.e_score_correction_bias"] = ((cfg.n_routed_experts,), torch.float32)
    return out


def checkpoint_tensors(
    cfg: ModelConfig,
    experts: Iterable[int] | None = None,
    layers: Iterable[int] | None = None,
) -> dict[str, TensorSpec]:
    """Name -> spec of every tensor this process needs, in checkpoint order.

    experts: logical routed-expert ids to include (None: all); a rank of an expert-parallel run passes its share.
    layers: decoder layers to include (None: all `num_hidden_layers`). The MTP layer(s) after them are never listed:
    the engine does not run them yet, and the loader skips their tensors.
    """
    expert_ids = sorted(set(range(cfg.n_routed_experts) if experts is None else experts))
    dt = DTYPES[cfg.dtype]
    specs: dict[str, TensorSpec] = {"model.embed_tokens.weight": TensorSpec((cfg.vocab_size, cfg.hidden_size), dt)}
    for layer in range(cfg.num_hidden_layers) if layers is None else layers:
        for name, (shape, dtype) in _plain(cfg, layer).items():
            specs[name] = TensorSpec(shape, dtype)
        for name, shape in _projections(cfg, layer, expert_ids).items():
            if cfg.quant is None:
                specs[name] = TensorSpec(shape, dt)
            else:
                specs[name] = TensorSpec(shape, FP8_DTYPE, quantized=True)
                specs[name + SCALE_SUFFIX] = TensorSpec(scale_shape(shape, cfg.quant.block), torch.float32)
    specs["model.norm.weight"] = TensorSpec((cfg.hidden_size,), dt)
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec((cfg.vocab_size, cfg.hidden_size), dt)
    return specs
