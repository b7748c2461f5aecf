"""Fixed-order segment sums: the Triton kernel against the torch reference, bit for bit (`torch.equal`), and both
against the `torch` dispatcher's `SegmentSum` plans.

CPU: small odd sizes under Triton's interpreter (H not a multiple of the column block, rows with no terms, output
rows with more terms than the others, an input row used twice, bf16/fp16/fp32, weighted and plain sums), outputs
poisoned with NaN first. GPU (`-m gpu`): DeepSeek-V3's fold and gather at EP4 sizes, the fused path of
`SegmentSum.apply` against its torch path.

Without a GPU the kernel runs under Triton's interpreter, which must be switched on before triton is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.segment_sum import segment_sum, segment_sum_ref  # noqa: E402
from parallel.torch_a2a import SegmentSum, _plan_segment_sum  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def plan(depth: list[int], num_rows: int, *, weighted: bool, seed: int, device=DEV):
    """A random CSR term list: output row r gets depth[r] terms, each a random input row of `num_rows`."""
    g = torch.Generator().manual_seed(seed)
    depth_t = torch.tensor(depth, dtype=torch.int64)
    nnz = int(depth_t.sum())
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), depth_t.cumsum(0)])
    src = torch.randint(0, num_rows, (nnz,), generator=g)
    weight = torch.rand(nnz, generator=g) * 2 - 0.5 if weighted else None
    move = (lambda t: None if t is None else t.to(device))
    return move(indptr), move(src), move(weight), depth_t.to(device)


def rows_like(m: int, h: int, dtype, seed: int, device=DEV):
    g = torch.Generator().manual_seed(seed)
    # Magnitudes over several decades, so that sums of terms round differently in a different order.
    scale = torch.logspace(-3, 3, m).unsqueeze(1)
    return (torch.randn(m, h, generator=g) * scale).to(dtype).to(device)


def step_sizes(depth: torch.Tensor) -> list[int]:
    top = int(depth.max()) if depth.numel() else 0
    return (depth.unsqueeze(1) > torch.arange(top, device=depth.device)).sum(0).tolist()


CASES = {
    "ragged": [2, 0, 3, 1, 0, 5, 2],  # empty rows inside, one row much deeper than the rest
    "all_empty": [0, 0, 0],
    "single": [1],
    "leading_empty": [0, 4, 4, 1],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_reference_bitwise(case, weighted, dtype):
    h, m = 37, 9  # H below one column block and not a power of two; 9 input rows, so some are used twice
    indptr, src, weight, depth = plan(CASES[case], m, weighted=weighted, seed=1)
    rows = rows_like(m, h, dtype, seed=2)
    out = torch.full((len(CASES[case]), h), float("nan"), dtype=dtype, device=DEV)
    got = segment_sum(rows, indptr, src, weight, out=out)
    assert got is out and not got.isnan().any(), "an output element was left unwritten"
    ref = segment_sum_ref(rows, indptr, src, weight)
    assert torch.equal(got, ref)
    assert torch.equal(ref, segment_sum_ref(rows, indptr, src, weight, step_sizes=step_sizes(depth)))
    assert torch.equal(got[depth == 0], torch.zeros_like(got[depth == 0]))


def test_several_column_blocks_and_strided_rows():
    h = 2500  # three 1024-column blocks, the last one partial
    wide = rows_like(6, 2 * h, torch.bfloat16, seed=3)
    rows = wide[:, 1:h + 1]  # row stride 2H, unit column stride: accepted as is
    indptr, src, weight, _ = plan([3, 0, 2, 1], 6, weighted=True, seed=4)
    got = segment_sum(rows, indptr, src, weight)
    assert torch.equal(got, segment_sum_ref(rows, indptr, src, weight))
    assert torch.equal(got, segment_sum_ref(rows.contiguous(), indptr, src, weight))


def test_term_order_is_kept():
    # 1 + 2^-24 + 2^-24 in fp32: adding the small terms first reaches 1 + 2^-23, adding them last rounds to 1. The
    # result, rounded to fp32 output, tells the orders apart.
    rows = torch.tensor([[1.0], [2.0**-24]], device=DEV)
    indptr = torch.tensor([0, 3, 6], device=DEV)
    src = torch.tensor([0, 1, 1, 1, 1, 0], device=DEV)
    got = segment_sum(rows, indptr, src)
    assert got[0].item() == 1.0 and got[1].item() == 1.0 + 2.0**-23
    assert torch.equal(got, segment_sum_ref(rows, indptr, src))


def test_bf16_rounding_ties_and_carries():
    # Two bf16 terms whose fp32 sum lies exactly between two bf16 values (ties go to the even one, up or down),
    # just below or above such a midpoint, rounds up across a binade, overflows to inf, or is NaN.
    pairs = [(1, 2**-8), (1 + 2**-7, 2**-8), (2, -(2**-9)), (-1, -(2**-8)), (1, 2**-9), (1, 3 * 2**-9),
             (3.3895313892515355e38, 2.0**119), (float("nan"), 1)]
    terms = torch.tensor(pairs).reshape(-1, 1).to(torch.bfloat16).to(DEV)  # [2P, 1], every value exact in bf16
    indptr = torch.arange(0, terms.shape[0] + 1, 2, device=DEV)
    src = torch.arange(terms.shape[0], device=DEV)
    got = segment_sum(terms, indptr, src)
    ref = segment_sum_ref(terms, indptr, src)
    assert torch.equal(got.isnan(), ref.isnan())
    # NaN bit patterns are not compared: torch's CPU cast and the GPU's differ there (0x7FC0 vs 0x7FFF).
    assert torch.equal(got[~got.isnan()].view(torch.int16), ref[~ref.isnan()].view(torch.int16))
    expected = [1, 1 + 2**-6, 2, -1, 1, 1 + 2**-7, float("inf")]
    assert got[:-1, 0].float().tolist() == expected


def test_empty_shapes():
    rows = rows_like(3, 8, torch.bfloat16, seed=5)
    indptr = torch.zeros(1, dtype=torch.int64, device=DEV)
    src = torch.zeros(0, dtype=torch.int64, device=DEV)
    assert segment_sum(rows, indptr, src).shape == (0, 8)
    assert segment_sum_ref(rows, indptr, src).shape == (0, 8)
    none = torch.empty(0, 8, dtype=torch.bfloat16, device=DEV)
    indptr = torch.zeros(3, dtype=torch.int64, device=DEV)
    assert torch.equal(segment_sum(none, indptr, src), torch.zeros(2, 8, dtype=torch.bfloat16, device=DEV))


def test_bad_arguments_name_the_problem():
    rows = rows_like(4, 8, torch.bfloat16, seed=6)
    indptr, src, weight, _ = plan([1, 2], 4, weighted=True, seed=7)
    with pytest.raises(ValueError, match="indptr must be torch.int64"):
        segment_sum(rows, indptr.int(), src, weight)
    with pytest.raises(ValueError, match="weight must be torch.float32"):
        segment_sum(rows, indptr, src, weight.double())
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        segment_sum(rows, indptr, src, weight[:2])
    with pytest.raises(ValueError, match="rows must be contiguous in its last dim"):
        segment_sum(rows.t(), indptr, src, weight)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 8\)"):
        segment_sum(rows, indptr, src, weight, out=torch.empty(3, 8, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="out must be torch.bfloat16"):
        segment_sum_ref(rows, indptr, src, weight, out=torch.empty(2, 8, device=DEV))


@pytest.mark.parametrize("weighted", [True, False], ids=["fold", "gather"])
def test_dispatcher_plan_paths_agree(weighted):
    # The dispatcher's plan (CSR from term groups and host step sizes) through both backends of `SegmentSum.apply`.
    depth = torch.tensor([3, 0, 1, 4, 2, 0, 1], device=DEV)
    g = torch.Generator().manual_seed(8)
    m = int(depth.sum())
    term_src = torch.randperm(m, generator=g).to(DEV)
    term_weight = torch.rand(m, generator=g).to(DEV) if weighted else None
    fold = _plan_segment_sum(term_src, depth, step_sizes(depth), term_weight)
    assert isinstance(fold, SegmentSum)
    y = rows_like(m, 19, torch.bfloat16, seed=9)
    assert torch.equal(fold.apply(y, backend="triton"), fold.apply(y, backend="torch"))


# ---- GPU, at DeepSeek-V3 sizes ----------------------------------------------------------------------------------

H = 7168  # DeepSeek-V3 hidden size


def ep4_plans(device):
    """The fold and the gather of one EP4 rank at 4096 tokens, top-8 of 256 experts (64 per rank), random routing.

    Fold: received rows (one per token per destination rank) summing their local top-k outputs (weighted).
    Gather: each home token summing its per-rank partial sums (plain).
    """
    g = torch.Generator(device=device).manual_seed(0)
    tokens, k, world, slots = 4096 * 4, 8, 4, 64  # all ranks' tokens, as the receiver sees them
    ids = (torch.rand(tokens, 256, generator=g, device=device)).topk(k, dim=1).indices
    dest = ids // slots  # [T, K]
    per_rank = torch.zeros(tokens, world, dtype=torch.int64, device=device).scatter_add_(
        1, dest, torch.ones_like(dest))
    depth_fold = per_rank[:, 0][per_rank[:, 0] > 0]  # received rows on rank 0 and their local top-k counts
    n = int(depth_fold.sum())
    fold = _plan_segment_sum(torch.randperm(n, generator=g, device=device), depth_fold, step_sizes(depth_fold),
                             torch.rand(n, generator=g, device=device))
    spread = (per_rank[:4096] > 0).sum(1)  # rank 0's own tokens: ranks each reaches
    s = int(spread.sum())
    gather = _plan_segment_sum(torch.randperm(s, generator=g, device=device), spread, step_sizes(spread), None)
    return fold, n, gather, s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_equals_torch_path_at_ep4_sizes():
    import triton.testing

    fold, n, gather, s = ep4_plans("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    for name, plan_, m in (("fold", fold, n), ("gather", gather, s)):
        rows = torch.randn(m, H, generator=g, device="cuda").bfloat16()
        fused = plan_.apply(rows)
        ref = plan_.apply(rows, backend="torch")
        assert torch.equal(fused, ref), f"{name}: fused differs from the torch path in {(fused != ref).sum()} values"
        # Timing for the log only (asserted: nothing): bytes are each term row read and each output row written.
        us_fused, us_ref = (
            triton.testing.do_bench(lambda p=plan_, x=rows, b=b: p.apply(x, backend=b), return_mode="median") * 1e3
            for b in ("triton", "torch"))
        gbytes = (m + fused.shape[0]) * H * 2 / 1e9
        print(f"\nsegment_sum {name}: {m} term rows -> {fused.shape[0]} rows x {H} bf16: fused {us_fused:.0f} us "
              f"({gbytes / us_fused * 1e6:.0f} GB/s), torch path {us_ref:.0f} us")
