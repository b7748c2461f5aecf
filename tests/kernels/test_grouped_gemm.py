"""MoE grouped GEMM and expert MLP: the Triton kernels against the torch references, bf16 and FP8, contiguous and
masked layouts, at small odd sizes (rows not a multiple of the tile, empty experts, one expert with every row),
outputs poisoned with NaN first.

Without a GPU the kernels run under Triton's interpreter, which must be switched on before triton is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.fp8 import act_quant_ref, quantize_block_fp8  # noqa: E402
from kernels.grouped_gemm import TileConfig, grouped_gemm, grouped_mlp, pick_tile  # noqa: E402
from kernels.moe import grouped_gemm_ref, grouped_mlp_contiguous, grouped_mlp_masked, grouped_mlp_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter casts fp32 to bf16 by truncation (the GPU rounds to nearest), which roughly doubles the
# rounding error of each of the bf16 MLP's three rounded stages.
BF16_MLP_TOL = 1e-2 if DEV == "cuda" else 2e-2
E4M3 = torch.float8_e4m3fn
# Small tiles so that the tiny problems below still span several row, column and K tiles.
BF16_TILE = TileConfig(16, 32, 64)
FP8_TILE = TileConfig(16, 32, 128)

COUNTS = {
    "ragged": [7, 0, 40, 1, 19],  # empty expert inside, rows not a multiple of 16
    "one_expert": [0, 0, 33, 0, 0],  # every row on one expert, empty experts on both sides
    "empty_last": [16, 3, 0, 0, 0],  # trailing empty experts: the tile search must stop at the last full one
}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed)) * scale).bfloat16().to(DEV)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def fp8_experts(w):
    """`[E, N, K]` -> (e4m3 `[E, N, K]`, scales `[E, ceil(N/128), ceil(K/128)]`)."""
    pairs = [quantize_block_fp8(w[e].float().cpu()) for e in range(w.shape[0])]
    return torch.stack([p[0] for p in pairs]).to(DEV), torch.stack([p[1] for p in pairs]).to(DEV)


def valid_rows(counts, max_m):
    return torch.arange(max_m, device=DEV)[None, :] < counts[:, None]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("case", list(COUNTS))
def test_contiguous_matches_reference(case, fp8):
    counts = torch.tensor(COUNTS[case], device=DEV)
    e, n, k = len(COUNTS[case]), 96, 200  # K not a multiple of 128: a partial last K step and scale block
    a = rand(int(counts.sum()), k, seed=1)
    b = rand(e, n, k, seed=2, scale=0.1)
    kwargs = {}
    if fp8:
        a, a_s = act_quant_ref(a)
        b, b_s = fp8_experts(b)
        kwargs = dict(a_scale=a_s, b_scale=b_s)
    out = torch.full((a.shape[0], n), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = grouped_gemm(a, b, counts, "contiguous", out=out, config=FP8_TILE if fp8 else BF16_TILE, **kwargs)
    assert not y.isnan().any(), "a row was left unwritten"
    assert rel(y, grouped_gemm_ref(a, b, counts, "contiguous", **kwargs)) < 1e-2


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_masked_matches_reference_on_valid_rows(fp8):
    counts = torch.tensor([5, 0, 24, 17], device=DEV)  # one expert full (max_m rows), one empty
    e, max_m, n, k = 4, 24, 64, 256
    a = rand(e, max_m, k, seed=3)
    a[1] = float("nan")  # rows past the counts may hold anything: they must not leak into valid rows
    a[0, 5:] = float("inf")
    b = rand(e, n, k, seed=4, scale=0.1)
    kwargs = {}
    if fp8:
        a, a_s = act_quant_ref(a)
        b, b_s = fp8_experts(b)
        kwargs = dict(a_scale=a_s, b_scale=b_s)
    out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = grouped_gemm(a, b, counts, "masked", out=out, config=FP8_TILE if fp8 else BF16_TILE, **kwargs)
    ok = valid_rows(counts, max_m)
    assert not y[ok].isnan().any(), "a valid row was left unwritten"
    assert rel(y[ok], grouped_gemm_ref(a, b, counts, "masked", **kwargs)[ok]) < 1e-2


def ragged_case(layout, fp8, n, seed):
    """5 experts of 7, 0, 40, 1 and 19 rows, K = 256: (counts, a contiguous `[67, K]` or masked `[5, 40, K]`,
    b `[5, n, K]`, the FP8 scale kwargs when fp8 (a and b then e4m3))."""
    counts = torch.tensor([7, 0, 40, 1, 19], device=DEV)
    e, k = 5, 256
    a = rand(int(counts.sum()), k, seed=seed) if layout == "contiguous" else rand(e, 40, k, seed=seed)
    b = rand(e, n, k, seed=seed + 1, scale=0.1)
    if not fp8:
        return counts, a, b, {}
    a, a_s = act_quant_ref(a)
    b, b_s = fp8_experts(b)
    return counts, a, b, {"a_scale": a_s, "b_scale": b_s}


def valid_pair(layout, counts, y, y_ref):
    """(y, y_ref), in the masked layout only the rows below each expert's count."""
    if layout != "masked":
        return y, y_ref
    ok = valid_rows(counts, 40)
    return y[ok], y_ref[ok]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_bulk_copy_and_fewer_row_slots(layout, fp8):
    """The TMA variant, and a masked grid sized for 8 rows per expert (each program then walks several row tiles):
    the same results as the reference."""
    # K and the row strides 16-byte aligned, so the bulk copy engine can address them
    counts, a, b, kwargs = ragged_case(layout, fp8, n=96, seed=12)
    cfg = TileConfig(16, 32, 128 if fp8 else 64, tma=True)
    y = grouped_gemm(a, b, counts, layout, config=cfg, expected_m=8, **kwargs)
    y, y_ref = valid_pair(layout, counts, y, grouped_gemm_ref(a, b, counts, layout, **kwargs))
    assert not y.isnan().any()
    assert rel(y, y_ref) < 1e-2


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_grouped_mlp_triton_matches_reference(layout, fp8):
    e, h, inter = 4, 256, 128
    counts = torch.tensor([9, 0, 20, 3], device=DEV)
    w13 = rand(e, 2 * inter, h, seed=5, scale=0.1)
    w2 = rand(e, h, inter, seed=6, scale=0.1)
    x = rand(int(counts.sum()), h, seed=7) if layout == "contiguous" else rand(e, 20, h, seed=7)
    kwargs = {}
    if fp8:
        w13, s13 = fp8_experts(w13)
        w2, s2 = fp8_experts(w2)
        kwargs = dict(w13_scale=s13, w2_scale=s2)
    y = grouped_mlp(x, counts, layout, w13, w2, backend="triton", **kwargs)
    y_ref = grouped_mlp_ref(x, counts, layout, w13, w2, **kwargs)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    if layout == "masked":
        ok = valid_rows(counts, 20)
        y, y_ref = y[ok], y_ref[ok]
    assert rel(y, y_ref) < (3e-2 if fp8 else BF16_MLP_TOL)


def test_grouped_mlp_takes_fp8_dispatched_tokens():
    """An FP8 dispatch hands over e4m3 tokens plus scales: the same result as quantizing inside."""
    e, h, inter = 3, 256, 128
    counts = torch.tensor([4, 6, 1], device=DEV)
    x = rand(11, h, seed=8)
    w13, s13 = fp8_experts(rand(e, 2 * inter, h, seed=9, scale=0.1))
    w2, s2 = fp8_experts(rand(e, h, inter, seed=10, scale=0.1))
    x_q, x_s = act_quant_ref(x)
    y = grouped_mlp(x_q, counts, "contiguous", w13, w2, w13_scale=s13, w2_scale=s2, hidden_scale=x_s,
                    backend="triton")
    y_ref = grouped_mlp_ref(x, counts, "contiguous", w13, w2, w13_scale=s13, w2_scale=s2)
    assert rel(y, y_ref) < 3e-2


def test_masked_mlp_takes_deepep_fp8_dispatch_with_transposed_scales():
    """DeepEP's low-latency FP8 dispatch: e4m3 rows `[E, max_m, H]` and scales stored `[E, H/128, max_m]` then
    transposed (row-fastest), with an expected_m far below some counts (programs walk several row tiles): the
    same valid rows as the reference, and nothing needs a copy of the scales."""
    e, max_m, h, inter = 3, 20, 256, 128
    counts = torch.tensor([17, 0, 3], device=DEV)
    x = rand(e, max_m, h, seed=11)
    x_q, x_s = act_quant_ref(x)
    x_s_t = x_s.transpose(1, 2).contiguous().transpose(1, 2)  # DeepEP's layout: rows fastest
    assert x_s_t.stride(1) == 1 and torch.equal(x_s_t, x_s)
    w13, s13 = fp8_experts(rand(e, 2 * inter, h, seed=12, scale=0.1))
    w2, s2 = fp8_experts(rand(e, h, inter, seed=13, scale=0.1))
    y = grouped_mlp(x_q, counts, "masked", w13, w2, w13_scale=s13, w2_scale=s2, hidden_scale=x_s_t,
                    expected_m=4, backend="triton")
    y_ref = grouped_mlp_ref(x_q, counts, "masked", w13, w2, w13_scale=s13, w2_scale=s2, hidden_scale=x_s)
    ok = valid_rows(counts, max_m)
    assert rel(y[ok], y_ref[ok]) < 3e-2


def test_auto_on_cpu_is_the_engine_reference_bit_for_bit():
    counts = torch.tensor([3, 0, 5])
    x = torch.randn(8, 64, generator=gen(1)).bfloat16()
    w13 = torch.randn(3, 64, 64, generator=gen(2)).bfloat16()
    w2 = torch.randn(3, 64, 32, generator=gen(3)).bfloat16()
    assert torch.equal(grouped_mlp(x, counts, "contiguous", w13, w2), grouped_mlp_contiguous(x, counts, w13, w2))
    xm = torch.randn(3, 5, 64, generator=gen(4)).bfloat16()
    assert torch.equal(grouped_mlp(xm, counts, "masked", w13, w2), grouped_mlp_masked(xm, counts, w13, w2))


def test_no_rows_at_all():
    counts = torch.zeros(3, dtype=torch.int64, device=DEV)
    y = grouped_gemm(rand(0, 64, seed=0), rand(3, 32, 64, seed=0), counts, "contiguous")
    assert y.shape == (0, 32)


def test_tiles_follow_the_shape_class():
    assert pick_tile(True, 8, 4096, 7168).block_m == 16
    assert pick_tile(True, 4096, 4096, 7168).block_m >= 64
    for rows in (1, 16, 100, 1000, 10000):
        cfg = pick_tile(True, rows, 4096, 7168)
        assert cfg.block_k == 128 and (128 % cfg.block_n == 0 or cfg.block_n % 128 == 0)
    # The Gluon kernels serve only the contiguous layout: the masked and dense layouts get Triton tiles.
    assert pick_tile(True, 4096, 4096, 7168).warp_specialize and pick_tile(True, 4096, 4096, 7168).gluon
    for layout in ("masked", "dense"):
        assert not any(pick_tile(True, rows, 4096, 7168, layout).gluon for rows in (1, 64, 200, 4096))


def test_launcher_names_what_is_wrong():
    counts = torch.tensor([2, 2], device=DEV)
    a, b = rand(4, 64, seed=0), rand(2, 32, 64, seed=0)
    with pytest.raises(ValueError, match="layout"):
        grouped_gemm(a, b, counts, "padded")
    with pytest.raises(ValueError, match="counts must have one entry per expert"):
        grouped_gemm(a, b, counts[:1], "contiguous")
    with pytest.raises(ValueError, match="K = 64"):
        grouped_gemm(a, rand(2, 32, 48, seed=0), counts, "contiguous")
    with pytest.raises(ValueError, match="b must be"):
        grouped_gemm(a, b.float(), counts, "contiguous")
    with pytest.raises(ValueError, match="a must have 3 dims"):
        grouped_gemm(a, b, counts, "masked")
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        grouped_gemm(rand(64, 4, seed=0).t(), b, counts, "contiguous")
    with pytest.raises(ValueError, match="both a_scale and b_scale"):
        grouped_gemm(a, b, counts, "contiguous", a_scale=torch.ones(4, 1, device=DEV))
    with pytest.raises(ValueError, match="w2_scale"):
        grouped_mlp(a, counts, "contiguous", b, b, w13_scale=torch.ones(1))


VARIANTS = {  # (bf16 config, FP8 config): the kernel variants the sweep chooses among, at tiles small enough here
    "persistent_flat": (TileConfig(16, 32, 64, persistent=1, flatten=True),
                        TileConfig(16, 32, 128, persistent=1, flatten=True)),
    "persistent_tma_ws": (TileConfig(16, 64, 64, persistent=2, tma=True, warp_specialize=True),
                          TileConfig(16, 64, 128, persistent=2, tma=True, warp_specialize=True)),
    "wide_n": (TileConfig(16, 256, 64, tma=True), TileConfig(16, 256, 128, tma=True)),
    "wide_n_persistent": (TileConfig(32, 256, 64, persistent=1, flatten=True),
                          TileConfig(32, 256, 128, persistent=1, flatten=True)),
    "prefetch_scales": (TileConfig(16, 32, 64, prefetch_scales=True),
                        TileConfig(16, 32, 128, persistent=1, flatten=True, prefetch_scales=True)),
    "prefetch_scales_wide_n": (TileConfig(16, 256, 64, tma=True, prefetch_scales=True),
                               TileConfig(16, 256, 128, tma=True, prefetch_scales=True)),
    # The Gluon kernel runs on Hopper only: elsewhere the flag falls back to the Triton kernel.
    "gluon_fallback": (TileConfig(16, 32, 64, gluon=True), TileConfig(16, 32, 128, gluon=True)),
    "gluon_ws_fallback": (TileConfig(16, 32, 64, gluon=True, warp_specialize=True, persistent=1),
                          TileConfig(16, 32, 128, gluon=True, warp_specialize=True, persistent=1)),
    # The FP8 default above 128 rows is 256 wide: off Hopper the Triton kernel runs it with a scale per column.
    "gluon_ws_wide_fallback": (TileConfig(16, 256, 64, gluon=True, warp_specialize=True, persistent=1),
                               TileConfig(16, 256, 128, gluon=True, warp_specialize=True, persistent=1)),
}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_kernel_variants_match_reference(layout, variant, fp8):
    """Persistent programs (several tiles each, across experts, empty experts skipped), 256-wide column tiles (FP8:
    one weight scale per column, N past one 128-column scale block and off the tile), warp specialization and scales
    fetched a K step ahead (the last step's fetch is clamped: K = 256 is two steps)."""
    n = 300
    counts, a, b, kwargs = ragged_case(layout, fp8, n=n, seed=14)
    out = torch.full((*a.shape[:-1], n), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = grouped_gemm(a, b, counts, layout, config=VARIANTS[variant][fp8], out=out, **kwargs)
    y, y_ref = valid_pair(layout, counts, y, grouped_gemm_ref(a, b, counts, layout, **kwargs))
    assert not y.isnan().any(), "a row was left unwritten"
    assert rel(y, y_ref) < 1e-2


def test_fp8_tiles_accept_wide_column_blocks_only_in_multiples_of_128():
    counts = torch.tensor([3], device=DEV)
    a, a_s = act_quant_ref(rand(3, 128, seed=0))
    b, b_s = fp8_experts(rand(1, 192, 128, seed=1))
    with pytest.raises(ValueError, match="block_n dividing 128 or a multiple"):
        grouped_gemm(a, b, counts, "contiguous", a_scale=a_s, b_scale=b_s, config=TileConfig(16, 192, 128))
