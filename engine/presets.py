"""Built-in model shapes: `tiny` (a DeepSeek-V3-shaped toy that runs anywhere) and `v3` (the real shapes)."""

from __future__ import annotations

from engine.config import Fp8Quant, ModelConfig, YarnRope
from engine.errors import ConfigError


def tiny(num_layers: int = 3, fp8: bool = False) -> ModelConfig:
    """Every DeepSeek-V3 feature at toy size: q-LoRA, YaRN, dense then MoE layers, grouped routing, a shared expert."""
    return ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        rope_theta=10000.0,
        rope=YarnRope(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=256,
        dtype="bfloat16",
        quant=Fp8Quant() if fp8 else None,
        bos_token_id=0,
        eos_token_id=1,
    )


def v3(num_layers: int = 61, fp8: bool = True) -> ModelConfig:
    """DeepSeek-V3/R1's published shapes (671B at 61 layers); fewer layers for benchmarks that must fit."""
    return ModelConfig(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=num_layers,
        num_attention_heads=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        first_k_dense_replace=min(3, num_layers),
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_theta=10000.0,
        rope=YarnRope(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                      mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=163840,
        num_nextn_predict_layers=1,
        dtype="bfloat16",
        quant=Fp8Quant() if fp8 else None,
        bos_token_id=0,
        eos_token_id=1,
    )


PRESETS = {"tiny": tiny, "v3": v3}


def preset(name: str, num_layers: int | None = None, fp8: bool | None = None) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    kwargs = {}
    if num_layers is not None:
        kwargs["num_layers"] = num_layers
    if fp8 is not None:
        kwargs["fp8"] = fp8
    return PRESETS[name](**kwargs)
