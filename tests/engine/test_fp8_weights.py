"""FP8 weights kept as stored (block-scaled e4m3) against the same checkpoint dequantized to bf16.

On GPUs the engine keeps FP8 weights and runs block-scaled FP8 GEMMs; on the CPU the same code path runs through
the torch references when asked (`fp8_weights=True`), so its logic is checked here without a GPU.
"""

import pytest
import torch

from engine.build import ModelSource, build_model
from engine.errors import WideepError
from engine.presets import tiny
from engine.runner import Request, Runner
from engine.sampling import SamplingParams

# Every projection and expert dimension a multiple of 128, so whole 128x128 blocks tile each weight and the experts
# stay FP8; kv_a (128 + 8 rows) and the attention heads exercise partial blocks.
ALIGNED = tiny(fp8=True).replace(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128,
                                 kv_lora_rank=128)
PROMPTS = [[5, 99, 17, 3, 250, 77, 401, 12, 9], [300, 44], [8, 123, 7, 7, 7, 1, 2, 3]]


def run(ckpt, fp8):
    model = build_model(ModelSource.resolve(str(ckpt)), device=torch.device("cpu"), dtype=torch.bfloat16,
                        fp8_weights=fp8, progress=False)
    reqs = [Request(i, p, SamplingParams(max_new_tokens=4, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    Runner(model).generate(reqs, prompt_logits=True)
    return model, reqs


def test_fp8_weights_match_dequantized_model(tiny_checkpoint):
    ckpt = tiny_checkpoint(ALIGNED, seed=9)
    fp8_model, fp8 = run(ckpt, True)
    moe = fp8_model.moe_layers()[0]
    assert moe.weights.w13.dtype == torch.float8_e4m3fn and moe.weights.w13_scale is not None
    assert fp8_model.layers[0].attn.o_proj.scale_inv is not None
    assert fp8_model.layers[0].attn.kv_b_proj.scale_inv is None  # the absorbed path needs it dense
    _, ref = run(ckpt, False)
    for a, b in zip(fp8, ref):
        # FP8 activations (per token per 128 channels) cost ~2.6% per GEMM on random weights, and a dozen GEMMs run
        # in series here, so the model differs from its dequantized twin by ~8% per position; a scale in the wrong
        # block or layout would make it garbage (~100%). The kernels-vs-references check at FP8 tolerance is the
        # GPU test (tests/engine/test_gpu.py).
        err = (a.prompt_logits - b.prompt_logits).norm(dim=-1) / b.prompt_logits.norm(dim=-1)
        assert err.median() < 0.15 and err.max() < 0.6, err


def test_unaligned_experts_fall_back_to_dense(tiny_checkpoint):
    ckpt = tiny_checkpoint(tiny(fp8=True), seed=2)  # moe_intermediate_size 32: blocks straddle gate and up
    model, _ = run(ckpt, True)
    assert model.moe_layers()[0].weights.w13.dtype == torch.bfloat16
    assert model.moe_layers()[0].weights.w13_scale is None


def test_fp8_weights_need_an_fp8_bf16_model(tiny_checkpoint):
    ckpt = tiny_checkpoint(tiny(), seed=2)
    with pytest.raises(WideepError, match="fp8 checkpoint"):
        build_model(ModelSource.resolve(str(ckpt)), device=torch.device("cpu"), dtype=torch.bfloat16,
                    fp8_weights=True, progress=False)
