"""GPU checks of the MLA decode backends and the fused router at DeepSeek-V3 sizes, against the torch references,
and of a whole model's decode steps through each backend.

Run with `pytest -m gpu tests/kernels/test_gpu_attention.py` on a CUDA machine; skipped elsewhere.
"""

import math

import pytest
import torch

from engine.batch import ForwardBatch
from engine.build import ModelSource, build_model
from engine.errors import WideepError
from engine.presets import tiny
from kernels.attention_backend import create_attention_backend
from kernels.mla import mla_decode_torch, pages_to_slots
from kernels.mla_triton import MLADecodeConfig, mla_decode_triton
from kernels.router import grouped_topk, route
from kernels.triton import is_hopper

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
HEADS, RANK, ROPE = 128, 512, 64


def decode_case(batch, ctx, page_size=1, seed=0):
    """bfloat16 queries and a shuffled paged cache; lengths from 1 to ctx (a quarter of them exactly ctx).
    The page table's padding points at a NaN page (never to be read); `clean` pads with page 0 for the reference."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.randint(1, ctx + 1, (batch,), generator=g, device="cuda")
    lens[: batch // 4] = ctx
    lens[batch // 4] = 1
    width = ctx // page_size
    num_pages = batch * width + 1
    kv = torch.randn(num_pages * page_size, RANK + ROPE, generator=g, device="cuda", dtype=torch.bfloat16)
    kv[-page_size:] = float("nan")
    table = torch.randperm(num_pages - 1, generator=g, device="cuda").view(batch, width)
    pages = (lens + page_size - 1) // page_size
    padding = torch.arange(width, device="cuda")[None, :] >= pages[:, None]
    clean = table.masked_fill(padding, 0)
    table = table.masked_fill(padding, num_pages - 1)
    q_latent = torch.randn(batch, HEADS, RANK, generator=g, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(batch, HEADS, ROPE, generator=g, device="cuda", dtype=torch.bfloat16)
    return q_latent, q_rope, kv, table, clean, lens


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def backend_or_skip(name, page_size=1, dtype=torch.bfloat16, rank=RANK, rope=ROPE):
    try:
        return create_attention_backend(name, device="cuda", dtype=dtype, kv_lora_rank=rank, rope_dim=rope,
                                        page_size=page_size)
    except WideepError as err:
        if name == "flashinfer":
            pytest.skip(str(err))
        raise


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("name", ["triton", "flashinfer", "torch"])
def test_decode_backends_real_sizes(name, page_size):
    """B=64, H=128, r=512, d_r=64, contexts up to 2048, bfloat16: relative error < 1e-2 against the reference."""
    q_latent, q_rope, kv, table, clean, lens = decode_case(64, 2048, page_size)
    scale = 1 / math.sqrt(192)
    ref = mla_decode_torch(q_latent, q_rope, kv, pages_to_slots(clean, page_size), lens, scale)
    backend = backend_or_skip(name, page_size)
    out = backend.decode(q_latent, q_rope, kv, clean if name == "torch" else table, lens, scale)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert not out.isnan().any()
    assert rel(out, ref) < 1e-2


@pytest.mark.parametrize("cfg", [
    MLADecodeConfig(lazy_rescale=True), MLADecodeConfig(num_stages=2, lazy_rescale=True),
    MLADecodeConfig(block_n=32, num_stages=4), MLADecodeConfig(num_warps=16), MLADecodeConfig(num_splits=2),
    MLADecodeConfig(gluon=True), MLADecodeConfig(gluon=True, num_splits=1), MLADecodeConfig(gluon=True, num_splits=5),
], ids=lambda c: c.short().replace(" ", "-"))
@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_decode_variants(cfg, page_size):
    """The tilings `scripts/sweep_kernels.py` chooses among, at DeepSeek-V3 sizes: within 1e-2 of the reference.
    The Gluon kernel (Hopper) with its own split count (2 here), one split (the output written directly), and
    5 splits (the last ones past the end of the shorter sequences)."""
    q_latent, q_rope, kv, table, clean, lens = decode_case(32, 2048, page_size, seed=2)
    if cfg.gluon and not is_hopper(q_latent.device):
        pytest.skip("the Gluon MLA kernel runs on Hopper only")
    scale = 1 / math.sqrt(192)
    ref = mla_decode_torch(q_latent, q_rope, kv, pages_to_slots(clean, page_size), lens, scale)
    out = mla_decode_triton(q_latent, q_rope, kv, table, lens, scale, page_size=page_size, config=cfg)
    assert not out.isnan().any()
    assert rel(out, ref) < 1e-2


def test_flashinfer_replans_for_a_new_batch():
    backend = backend_or_skip("flashinfer")
    scale = 0.1
    q_latent, q_rope, kv, table, clean, lens = decode_case(8, 512, seed=1)
    first = backend.decode(q_latent, q_rope, kv, table, lens, scale)
    assert torch.equal(backend.decode(q_latent, q_rope, kv, table, lens, scale), first)  # plan reused
    lens -= 1  # in place, as a runner reusing its buffers might
    lens.clamp_(min=1)
    again = backend.decode(q_latent, q_rope, kv, table, lens, scale)
    assert rel(again, mla_decode_torch(q_latent, q_rope, kv, clean, lens, scale)) < 1e-2


def test_router_real_sizes_same_ids():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4096, 256, generator=g, device="cuda") * 2
    bias = torch.randn(256, generator=g, device="cuda") * 0.5 - 0.2
    ref_ids, ref_w = grouped_topk(logits, bias, 8, 8, 4, 2.5)
    ids, w = route(logits, bias, 8, 8, 4, 2.5, backend="auto")
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_decode_steps_through_each_backend(tiny_checkpoint, dtype):
    """A tiny model prefills three prompts and decodes three steps; every backend's decode logits match the torch
    backend's (fp32: to 1e-4; bf16: to 2e-2)."""
    ckpt = tiny_checkpoint(tiny(), seed=5)
    prompts = [[5, 99, 17, 3, 250, 77, 401], [300, 44], [8, 123, 7, 7, 7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    feed = [[11, 12, 13], [21, 22, 23], [31, 32, 33]]  # fixed decode inputs, so that every backend sees the same

    def decode_logits(name):
        model = build_model(ModelSource.resolve(str(ckpt)), device=torch.device("cuda"), dtype=dtype,
                            attention_backend=name, progress=False)
        cache = model.new_kv_cache(256)
        slots = [cache.alloc(len(p) + 3) for p in prompts]
        model.forward(ForwardBatch.build(prompts, [0] * 3, slots, "cuda"), cache)
        out = []
        for step in range(3):
            prefix = [len(p) + step for p in prompts]
            batch = ForwardBatch.build([[f[step]] for f in feed], prefix, slots, "cuda")
            assert batch.decode
            out.append(model.forward(batch, cache))
        return torch.stack(out)

    ref = decode_logits("torch")
    for name in ("triton", "auto"):
        assert rel(decode_logits(name), ref) < (1e-4 if dtype == torch.float32 else 2e-2), name
