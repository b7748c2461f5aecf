"""Prefill/extend attention through SDPA against the reference `mla_extend_torch`: fresh prompts and chunks that
continue a cached prefix (the bottom-right causal mask), with DeepSeek's unequal q/k and v head widths."""

import pytest
import torch

from kernels.mla import mla_extend_torch
from kernels.mla_extend import mla_extend, mla_extend_sdpa


def inputs(n, prefix, heads, d_qk, d_v, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = prefix + n
    q = torch.randn(n, heads, d_qk, generator=g, device=device).to(dtype)
    k = torch.randn(s, heads, d_qk, generator=g, device=device).to(dtype)
    v = torch.randn(s, heads, d_v, generator=g, device=device).to(dtype)
    return q, k, v


@pytest.mark.parametrize("n,prefix", [(1, 0), (7, 0), (5, 11), (1, 30), (33, 3)])
def test_sdpa_matches_reference_on_cpu(n, prefix):
    q, k, v = inputs(n, prefix, heads=4, d_qk=24, d_v=16, dtype=torch.float32)
    want = mla_extend_torch(q, k, v, prefix, 0.2)
    got = mla_extend_sdpa(q, k, v, prefix, 0.2)
    assert got.shape == want.shape == (n, 4, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_auto_is_the_reference_on_cpu_and_bad_backend_is_refused():
    q, k, v = inputs(3, 2, heads=2, d_qk=8, d_v=8, dtype=torch.float32)
    assert torch.equal(mla_extend(q, k, v, 2, 0.3), mla_extend_torch(q, k, v, 2, 0.3))
    with pytest.raises(ValueError, match="backend"):
        mla_extend(q, k, v, 2, 0.3, backend="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,prefix", [(2000, 0), (1024, 3000), (1, 500)])
def test_sdpa_matches_reference_at_deepseek_sizes(n, prefix):
    """128 heads, q/k 192 wide, v 128 wide, bf16: within bf16 tolerance of the float32-softmax reference."""
    q, k, v = inputs(n, prefix, heads=128, d_qk=192, d_v=128, dtype=torch.bfloat16, device="cuda")
    want = mla_extend_torch(q, k, v, prefix, 192 ** -0.5).float()
    got = mla_extend(q, k, v, prefix, 192 ** -0.5).float()
    assert ((got - want).norm() / want.norm()) < 1e-2
