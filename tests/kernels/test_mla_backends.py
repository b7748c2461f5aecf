"""MLA decode backends against the torch reference, and the backend registry.

The Triton kernel runs under Triton's interpreter on a CPU (TRITON_INTERPRET=1, set before any kernel module is
imported) at small, odd sizes: head counts and dims off the block sizes, sequences of length 1, lengths that are not
multiples of the token block, padded page tables, several KV splits, pages of more than one token. float32 and
float16 only: Triton 3.9's interpreter multiplies bfloat16 tiles as their raw 16-bit patterns in `tl.dot`, so
bfloat16 is checked on the GPU (tests/kernels/test_gpu_attention.py).
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import contextlib  # noqa: E402
import importlib  # noqa: E402

import pytest  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from engine.errors import WideepError  # noqa: E402
from kernels.attention_backend import (  # noqa: E402
    TorchAttention,
    TritonAttention,
    create_attention_backend,
)
from kernels.mla import mla_decode_torch, pages_to_slots  # noqa: E402
from kernels.mla_triton import MLADecodeConfig, mla_decode_triton, pick_num_splits  # noqa: E402
from kernels.triton import mla_decode as mla_jit  # noqa: E402

if DEVICE == "cpu" and not isinstance(mla_jit.mla_decode_split_kernel, InterpretedFunction):
    importlib.reload(mla_jit)  # imported earlier in this process without the interpreter


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty / empty_like inside returns NaN-filled memory, so unwritten outputs (and partial results a
    kernel forgot to write) show up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(x):
        return x.fill_(float("nan") if x.is_floating_point() else -7)

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def make_case(lens, heads, r, d_r, dtype, page_size=1, extra_pages=3, seed=0):
    """Random queries and a shuffled paged cache. Returns (q_latent, q_rope, kv_cache, page_table, clean_table,
    seq_lens): page_table's padding points at a NaN row, which the kernel must never read; clean_table pads with
    page 0 for the reference (which reads padding and masks it)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    pages = [-(-n // page_size) for n in lens]
    width = max(pages) + extra_pages
    num_pages = sum(pages) + 2
    kv = torch.randn(num_pages * page_size, r + d_r, generator=g)
    poison_page = num_pages - 1
    kv[poison_page * page_size:] = float("nan")
    order = torch.randperm(num_pages - 1, generator=g)
    table = torch.full((b, width), poison_page, dtype=torch.int64)
    start = 0
    for i, n in enumerate(pages):
        table[i, :n] = order[start:start + n]
        start += n
    clean = torch.where(table == poison_page, 0, table)
    q_latent = torch.randn(b, heads, r, generator=g)
    q_rope = torch.randn(b, heads, d_r, generator=g)
    to = dict(device=DEVICE)
    return (q_latent.to(dtype=dtype, **to), q_rope.to(dtype=dtype, **to), kv.to(dtype=dtype, **to),
            table.to(**to), clean.to(**to), torch.tensor(lens, dtype=torch.int64, device=DEVICE))


def reference(q_latent, q_rope, kv, clean_table, seq_lens, scale, page_size=1):
    slots = pages_to_slots(clean_table, page_size) if page_size > 1 else clean_table
    return mla_decode_torch(q_latent.float(), q_rope.float(), kv.float(), slots, seq_lens, scale)


def rel_err(out, ref):
    assert not out.isnan().any()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("lens,heads,r,d_r", [
    ([1, 37, 16, 50], 5, 40, 12),  # heads < one block, dims off powers of two
    ([1], 20, 32, 16),  # one sequence of one token, heads over a block
    ([33, 2, 64, 17, 1], 16, 64, 16),  # exactly one head block
])
@pytest.mark.parametrize("splits", [None, 1, 2, 3])
def test_triton_matches_reference_float32(lens, heads, r, d_r, splits):
    q_latent, q_rope, kv, table, clean, seq_lens = make_case(lens, heads, r, d_r, torch.float32)
    ref = reference(q_latent, q_rope, kv, clean, seq_lens, 0.2)
    with poisoned_allocations():
        out = mla_decode_triton(q_latent, q_rope, kv, table, seq_lens, 0.2,
                                config=MLADecodeConfig(block_h=16, block_n=16, num_splits=splits))
    assert out.shape == q_latent.shape and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5


def test_gluon_flag_falls_back_to_the_triton_kernel_off_hopper():
    """The Gluon MLA kernel runs on Hopper only: elsewhere (here, the interpreter) the flag leaves the Triton kernel
    with the config's other fields, and the same results."""
    q_latent, q_rope, kv, table, clean, seq_lens = make_case([5, 40, 17], 20, 32, 16, torch.float32)
    ref = reference(q_latent, q_rope, kv, clean, seq_lens, 0.2)
    with poisoned_allocations():
        out = mla_decode_triton(q_latent, q_rope, kv, table, seq_lens, 0.2,
                                config=MLADecodeConfig(block_h=16, block_n=16, num_splits=2, gluon=True))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("page_size", [2, 4])
def test_triton_pages_of_several_tokens(page_size):
    lens = [1, 9, 30, 4]  # last pages partly filled
    q_latent, q_rope, kv, table, clean, seq_lens = make_case(lens, 7, 32, 16, torch.float32, page_size=page_size)
    ref = reference(q_latent, q_rope, kv, clean, seq_lens, 0.3, page_size)
    with poisoned_allocations():
        out = mla_decode_triton(q_latent, q_rope, kv, table, seq_lens, 0.3, page_size=page_size,
                                config=MLADecodeConfig(block_h=16, block_n=16, num_splits=2))
    assert rel_err(out, ref) < 1e-5
    # The torch backend takes the same page ids.
    torch_out = TorchAttention(torch.device(DEVICE), page_size).decode(q_latent, q_rope, kv, clean, seq_lens, 0.3)
    assert rel_err(torch_out, ref) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_lazy_rescale(dtype):
    """Scores spread wide enough that some blocks raise a head's max by more than 2^8 (rescale) and others do not
    (kept): the same result as the reference."""
    q_latent, q_rope, kv, table, clean, seq_lens = make_case([1, 37, 16, 50], 5, 40, 12, dtype, seed=3)
    q_latent = q_latent * 4
    ref = reference(q_latent, q_rope, kv, clean, seq_lens, 0.5)
    with poisoned_allocations():
        out = mla_decode_triton(q_latent, q_rope, kv, table, seq_lens, 0.5,
                                config=MLADecodeConfig(block_h=16, block_n=16, num_splits=2, lazy_rescale=True))
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("splits,page_size", [(None, 1), (1, 1), (3, 2)])
@pytest.mark.parametrize("qk_in_branch", [False, True])
def test_triton_split_qk(dtype, lazy, splits, page_size, qk_in_branch):
    """split_qk (unmasked full token blocks, masked last ones), with the score products before the mask branch or
    inside it: lengths that fill whole 16-token blocks (32), end inside one (37, 50) or hold one token, heads and
    dims off the block sizes."""
    q_latent, q_rope, kv, table, clean, seq_lens = make_case([1, 37, 32, 50], 5, 40, 12, dtype, page_size=page_size,
                                                             seed=5)
    ref = reference(q_latent, q_rope, kv, clean, seq_lens, 0.3, page_size)
    cfg = MLADecodeConfig(block_h=16, block_n=16, num_splits=splits, lazy_rescale=lazy, split_qk=True,
                          qk_in_branch=qk_in_branch)
    with poisoned_allocations():
        out = mla_decode_triton(q_latent, q_rope, kv, table, seq_lens, 0.3, page_size=page_size, config=cfg)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_triton_float16_default_tiling():
    q_latent, q_rope, kv, table, clean, seq_lens = make_case([3, 70, 1], 18, 64, 16, torch.float16)
    ref = reference(q_latent, q_rope, kv, clean, seq_lens, 0.1)
    with poisoned_allocations():
        out = mla_decode_triton(q_latent, q_rope, kv, table, seq_lens, 0.1)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < 2e-3


# The split_qk tilings `scripts/sweep_kernels.py` times, at DeepSeek-V3 sizes in bfloat16 on the GPU (the interpreter
# cannot multiply bfloat16): unwritten outputs or reads of the NaN padding page would show as NaN.
_GPU_SPLIT_QK = [
    MLADecodeConfig(split_qk=True), MLADecodeConfig(split_qk=True, num_stages=2),
    MLADecodeConfig(split_qk=True, num_stages=2, lazy_rescale=True), MLADecodeConfig(split_qk=True, num_splits=2),
    MLADecodeConfig(split_qk=True, block_n=32, num_stages=4),
    MLADecodeConfig(split_qk=True, qk_in_branch=True),
    MLADecodeConfig(split_qk=True, qk_in_branch=True, block_n=32, num_stages=5),
]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", _GPU_SPLIT_QK, ids=lambda c: c.short().replace(" ", "-"))
@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_split_qk_real_sizes(cfg, page_size):
    lens = [2048, 1, 2047, 1000, 64, 1500, 2048, 7] * 4  # 32 sequences: full, single-token and ragged last blocks
    q_latent, q_rope, kv, table, clean, seq_lens = make_case(lens, 128, 512, 64, torch.bfloat16,
                                                             page_size=page_size, seed=7)
    scale = 192 ** -0.5
    ref = reference(q_latent, q_rope, kv, clean, seq_lens, scale, page_size)
    with poisoned_allocations():
        out = mla_decode_triton(q_latent, q_rope, kv, table, seq_lens, scale, page_size=page_size, config=cfg)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
    # Against the default tiling: the same products, summed in another order.
    assert rel_err(out, mla_decode_triton(q_latent, q_rope, kv, table, seq_lens, scale, page_size=page_size)) < 1e-2


def test_qk_in_branch_needs_split_qk():
    with pytest.raises(ValueError, match="split_qk"):
        MLADecodeConfig(qk_in_branch=True)


def test_empty_batch_and_bad_inputs():
    q_latent, q_rope, kv, table, _, seq_lens = make_case([4], 4, 32, 16, torch.float32)
    assert mla_decode_triton(q_latent[:0], q_rope[:0], kv, table[:0], seq_lens[:0], 0.1).shape == (0, 4, 32)
    with pytest.raises(ValueError, match="kv_cache"):
        mla_decode_triton(q_latent, q_rope, kv[:, :40], table, seq_lens, 0.1)
    with pytest.raises(ValueError, match="dtypes differ"):
        mla_decode_triton(q_latent.half(), q_rope, kv, table, seq_lens, 0.1)
    with pytest.raises(ValueError, match="page_table"):
        mla_decode_triton(q_latent, q_rope, kv, table.float(), seq_lens, 0.1)
    with pytest.raises(ValueError, match="unit stride"):
        mla_decode_triton(q_latent.transpose(1, 2).contiguous().transpose(1, 2), q_rope, kv, table, seq_lens, 0.1)


def test_split_heuristic():
    # A batch that fills the GPU on its own takes one split (no combine pass); a small batch with long sequences
    # is split to fill the multiprocessors; short sequences are never cut below 4 token blocks.
    assert pick_num_splits(batch=64, head_blocks=8, max_tokens=2048, block_n=32, num_sms=132) == 1
    assert pick_num_splits(batch=4, head_blocks=2, max_tokens=8192, block_n=32, num_sms=132) == 16
    assert pick_num_splits(batch=1, head_blocks=1, max_tokens=100, block_n=32, num_sms=132) == 1


def test_registry_resolution(monkeypatch):
    args = dict(device="cpu", dtype=torch.float32, kv_lora_rank=32, rope_dim=16)
    assert isinstance(create_attention_backend("auto", **args), TorchAttention)
    assert isinstance(create_attention_backend("torch", **args), TorchAttention)
    with pytest.raises(WideepError, match="flashinfer cannot run here: it needs a CUDA GPU"):
        create_attention_backend("flashinfer", **args)
    with pytest.raises(WideepError, match="choose one of auto, flashinfer, triton, torch"):
        create_attention_backend("flash", **args)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(create_attention_backend("triton", **args), TritonAttention)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(WideepError, match="triton cannot run here: it needs a CUDA GPU"):
        create_attention_backend("triton", **args)


def test_backends_agree_through_the_registry(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q_latent, q_rope, kv, _, clean, seq_lens = make_case([5, 1, 21], 3, 32, 16, torch.float32)
    outs = {}
    for name in ("torch", "triton"):
        backend = create_attention_backend(name, device=DEVICE, dtype=torch.float32, kv_lora_rank=32, rope_dim=16)
        outs[name] = backend.decode(q_latent, q_rope, kv, clean, seq_lens, 0.25)
    torch.testing.assert_close(outs["torch"], mla_decode_torch(q_latent, q_rope, kv, clean, seq_lens, 0.25))
    assert rel_err(outs["triton"], outs["torch"]) < 1e-5
