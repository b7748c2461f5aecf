"""FP8 activation quantization (alone and fused with SiLU-and-mul), SiLU-and-mul, and the dense W8A8 GEMM: the Triton
kernels against their torch references at small odd sizes, outputs poisoned first.

Without a GPU the kernels run under Triton's interpreter, which must be switched on before triton is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.act_quant import act_quant, silu_mul, silu_mul_quant  # noqa: E402
from kernels.fp8 import (  # noqa: E402
    FP8_MAX,
    act_quant_ref,
    dequantize_act,
    fp8_gemm_ref,
    quantize_block_fp8,
    silu_mul_quant_ref,
)
from kernels.fp8_gemm import fp8_gemm, fp8_linear  # noqa: E402
from kernels.grouped_gemm import TileConfig  # noqa: E402
from kernels.moe import silu_mul_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
E4M3 = torch.float8_e4m3fn


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed, scale=1.0, dtype=torch.bfloat16):
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype).to(DEV)


def poisoned_quant(lead, width):
    """Outputs full of NaN (e4m3 0x7F is NaN) so that an unwritten element shows."""
    q = torch.full((*lead, width), 0x7F, dtype=torch.uint8, device=DEV).view(E4M3)
    s = torch.full((*lead, -(-width // 128)), float("nan"), device=DEV)
    return q, s


def bits(q):
    return q.view(torch.uint8)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("rows,width", [(1, 128), (37, 300), (70, 64)])
def test_act_quant_matches_reference_bit_for_bit(rows, width):
    # Per-row magnitudes spread over 1e-3..1e3 and one all-zero row: scales and rounding at every exponent.
    x = rand(rows, width, seed=rows) * torch.logspace(-3, 3, rows, device=DEV)[:, None].bfloat16()
    x[rows // 2] = 0
    q, s = act_quant(x, out=poisoned_quant((rows,), width))
    q_ref, s_ref = act_quant_ref(x)
    assert torch.equal(bits(q), bits(q_ref))
    assert torch.equal(s, s_ref)
    assert act_quant(x)[1].stride(-2) == 1  # rows-fastest, the order the GEMM reads them
    # The contract itself: scale = amax / 448 per 128 columns, and q * scale within half an e4m3 step of x.
    group_amax = torch.nn.functional.pad(x.float().abs(), (0, -width % 128)).view(rows, -1, 128).amax(-1)
    assert torch.allclose(s, group_amax.clamp(min=1e-12) / FP8_MAX)
    err = (dequantize_act(q, s, torch.float32) - x.float()).abs()
    assert (err <= x.float().abs() / 16 + s.repeat_interleave(128, -1)[:, :width] * 2 ** -9).all()


def test_act_quant_masked_writes_only_valid_rows():
    e, max_m, width = 4, 21, 256
    x = rand(e, max_m, width, seed=3)
    counts = torch.tensor([5, 0, 21, 1], device=DEV)
    q, s = poisoned_quant((e, max_m), width)
    act_quant(x, masked_m=counts, out=(q, s))
    q_ref, s_ref = act_quant_ref(x)
    for i, n in enumerate(counts.tolist()):
        assert torch.equal(bits(q[i, :n]), bits(q_ref[i, :n]))
        assert torch.equal(s[i, :n], s_ref[i, :n])
        # rows past the count are not touched: still the poison
        assert (bits(q[i, n:]) == 0x7F).all() and s[i, n:].isnan().all()


@pytest.mark.parametrize("rows,inter", [(29, 192), (3, 128)])
def test_silu_mul_quant_matches_reference(rows, inter):
    h = rand(rows, 2 * inter, seed=inter, scale=2.0)
    q, s = silu_mul_quant(h, out=poisoned_quant((rows,), inter))
    q_ref, s_ref = silu_mul_quant_ref(h)
    assert not q.float().isnan().any() and not s.isnan().any()
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    # sigmoid may differ in its last bit from torch's: allow rare one-step differences, compare the values closely
    assert (bits(q) != bits(q_ref)).float().mean() < 0.01
    assert rel(dequantize_act(q, s, torch.float32), dequantize_act(q_ref, s_ref, torch.float32)) < 1e-2


def test_silu_mul_quant_masked_and_silu_mul():
    e, max_m, inter = 3, 18, 128
    h = rand(e, max_m, 2 * inter, seed=11)
    counts = torch.tensor([18, 0, 7], device=DEV)
    q, s = silu_mul_quant(h, masked_m=counts, out=poisoned_quant((e, max_m), inter))
    y = silu_mul(h, masked_m=counts, out=torch.full((e, max_m, inter), float("nan"), dtype=h.dtype, device=DEV))
    q_ref, s_ref = silu_mul_quant_ref(h)
    y_ref = silu_mul_ref(h)
    for i, n in enumerate(counts.tolist()):
        torch.testing.assert_close(s[i, :n], s_ref[i, :n], rtol=1e-5, atol=0)
        torch.testing.assert_close(y[i, :n].float(), y_ref[i, :n].float(), rtol=1.6e-2, atol=1e-3)
        assert y[i, n:].isnan().all()
    dense = silu_mul(h[0])
    torch.testing.assert_close(dense.float(), y_ref[0].float(), rtol=1.6e-2, atol=1e-3)


def quantized_weight(n, k, seed):
    w_q, w_s = quantize_block_fp8(torch.randn(n, k, generator=gen(seed)) * 0.05)
    return w_q.to(DEV), w_s.to(DEV)


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (45, 200, 384), (17, 96, 200)])
def test_fp8_gemm_matches_reference(m, n, k):
    a_q, a_s = act_quant_ref(rand(m, k, seed=m))
    w_q, w_s = quantized_weight(n, k, seed=n)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = fp8_gemm(a_q, a_s, w_q, w_s, out=out, config=TileConfig(16, 32, 128))
    assert not y.isnan().any()
    assert rel(y, fp8_gemm_ref(a_q, a_s, w_q, w_s)) < 1e-2


@pytest.mark.parametrize("config", [TileConfig(16, 256, 128, persistent=1, flatten=True),
                                    TileConfig(32, 64, 128, persistent=2, tma=True)], ids=["wide_n", "persistent_tma"])
def test_fp8_gemm_variants(config):
    """The dense layout through the persistent kernel and the 256-wide column tiles (two weight scales per step)."""
    a_q, a_s = act_quant_ref(rand(45, 256, seed=3))
    w_q, w_s = quantized_weight(300, 256, seed=4)
    out = torch.full((45, 300), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = fp8_gemm(a_q, a_s, w_q, w_s, out=out, config=config)
    assert not y.isnan().any()
    assert rel(y, fp8_gemm_ref(a_q, a_s, w_q, w_s)) < 1e-2


def test_fp8_linear_backends_agree():
    x = rand(2, 9, 256, seed=5)
    w_q, w_s = quantized_weight(130, 256, seed=6)
    y = fp8_linear(x, w_q, w_s, backend="triton")
    y_ref = fp8_linear(x, w_q, w_s, backend="torch")
    assert y.shape == (2, 9, 130) and y.dtype == torch.bfloat16
    assert rel(y, y_ref) < 1e-2


def test_launchers_name_what_is_wrong():
    x = rand(4, 256, seed=0)
    with pytest.raises(ValueError, match="x must be"):
        act_quant(x.to(torch.int32))
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        act_quant(rand(256, 4, seed=0).t())
    with pytest.raises(ValueError, match="masked_m"):
        act_quant(rand(2, 4, 256, seed=0))
    with pytest.raises(ValueError, match="even"):
        silu_mul_quant(rand(4, 255, seed=0))
    a_q, a_s = act_quant_ref(x)
    w_q, w_s = quantized_weight(64, 256, seed=0)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        fp8_gemm(a_q, a_s, w_q, w_s[:, :1])
    with pytest.raises(ValueError, match="K = 256"):
        fp8_gemm(a_q, a_s, w_q[:, :128].contiguous(), w_s[:, :1])
