"""The fused Triton router against the reference `grouped_topk`: same ids (best first, ties to the lower index),
weights to fp32 rounding. On a CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before any
kernel module is imported); on a GPU machine the same tests run natively."""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import contextlib  # noqa: E402
import importlib  # noqa: E402

import pytest  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels.fused_router import fused_grouped_topk  # noqa: E402
from kernels.router import grouped_topk, route  # noqa: E402
from kernels.triton import router as router_jit  # noqa: E402

if DEVICE == "cpu" and not isinstance(router_jit.grouped_topk_kernel, InterpretedFunction):
    importlib.reload(router_jit)  # imported earlier in this process without the interpreter


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty / empty_like inside returns garbage (NaN, or -7 for integers), so unwritten outputs show."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(x):
        return x.fill_(float("nan") if x.is_floating_point() else -7)

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def check(logits, bias, top_k, n_group, topk_group, scale=2.5, renormalize=True):
    ref_ids, ref_w = grouped_topk(logits, bias, top_k, n_group, topk_group, scale, renormalize)
    with poisoned_allocations():
        ids, w = fused_grouped_topk(logits, bias, top_k, n_group, topk_group, scale, renormalize)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    torch.testing.assert_close(w.cpu(), ref_w.cpu(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("t,e,n_group,topk_group,top_k", [
    (37, 32, 4, 2, 4),  # odd row count
    (5, 256, 8, 4, 8),  # DeepSeek-V3's shape
    (3, 24, 3, 2, 5),  # 3 groups of 8: padded group axis
    (4, 20, 5, 5, 6),  # 5 groups of 4, every group kept
    (9, 12, 1, 1, 3),  # n_group = 1: no group stage, 12 experts (padded expert axis)
    (6, 6, 3, 1, 2),  # groups of 2: the second best is the other expert
])
def test_matches_reference_random_negative_bias(t, e, n_group, topk_group, top_k):
    g = torch.Generator().manual_seed(t * 1000 + e)
    logits = (torch.randn(t, e, generator=g) * 2).to(DEVICE)
    # Mostly negative biases: biased scores of kept experts go below 0, which a 0-mask would lose to.
    bias = (torch.randn(e, generator=g) - 1.5).to(DEVICE)
    check(logits, bias, top_k, n_group, topk_group)
    check(logits, bias, top_k, n_group, topk_group, scale=1.0, renormalize=False)


def test_ties_go_to_the_lower_index():
    # All scores equal: groups and experts tie everywhere. Row 1: two groups tie on their top-2 sums, and inside the
    # kept groups pairs of experts tie; row 2: a group whose best value appears twice (its score is twice that).
    e, n_group = 32, 4
    logits = torch.zeros(3, e)
    logits[1, [9, 10, 25, 26]] = 1.0
    logits[1, [11, 27]] = 0.5
    logits[2, [17, 18]] = 2.0
    logits[2, 0] = 2.5
    bias = torch.zeros(e)
    for top_k, topk_group in [(4, 2), (8, 4), (3, 1)]:
        check(logits.to(DEVICE), bias.to(DEVICE), top_k, n_group, topk_group)
    ids, _ = grouped_topk(logits, bias, 4, n_group, 2, 1.0)
    assert ids[0].tolist() == [0, 1, 2, 3]
    assert ids[1].tolist() == [9, 10, 25, 26]
    assert ids[2].tolist()[:3] == [0, 17, 18]
    # With one group kept, group 2 (its best value twice: 2 sigmoid(2) = 1.76) beats group 0 (sigmoid(2.5) + 0.5 =
    # 1.42); dropping both copies of the best would have scored group 2 at 1.38 and kept group 0.
    ids, _ = grouped_topk(logits, bias, 2, n_group, 1, 1.0)
    assert ids[2].tolist() == [17, 18]


def test_reference_breaks_ties_like_a_stable_sort():
    # torch.topk alone returns arbitrary members of a tie on the CPU; the reference must not.
    ids, w = grouped_topk(torch.zeros(2, 256), torch.zeros(256), 8, 8, 4, 2.5)
    assert ids.tolist() == [list(range(8))] * 2
    torch.testing.assert_close(w, torch.full((2, 8), 2.5 / 8))


def test_excluded_groups_lose_to_negative_kept_scores():
    logits = torch.zeros(1, 8)
    bias = torch.tensor([5.0, 5.0, -3.0, -3.0, 0.0, 0.0, 0.0, 0.0])
    check(logits.to(DEVICE), bias.to(DEVICE), 4, 2, 1, 1.0)
    ids, _ = fused_grouped_topk(logits.to(DEVICE), bias.to(DEVICE), 4, 2, 1, 1.0)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3]


def test_no_tokens():
    ids, w = fused_grouped_topk(torch.empty(0, 32, device=DEVICE), torch.zeros(32, device=DEVICE), 4, 4, 2, 1.0)
    assert ids.shape == (0, 4) and w.shape == (0, 4)


def test_route_picks_the_backend():
    g = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(7, 32, generator=g), torch.randn(32, generator=g)
    ref = grouped_topk(logits, bias, 4, 4, 2, 2.5)
    for backend in ("auto", "torch", "triton"):
        ids, w = route(logits.to(DEVICE), bias.to(DEVICE), 4, 4, 2, 2.5, backend=backend)
        assert torch.equal(ids.cpu(), ref[0])
        torch.testing.assert_close(w.cpu(), ref[1], rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="router backend"):
        route(logits, bias, 4, 4, 2, 2.5, backend="cuda")


@pytest.mark.parametrize("bad", ["dtype", "bias", "groups", "top_k"])
def test_launcher_rejects_bad_input(bad):
    logits, bias = torch.zeros(2, 32, device=DEVICE), torch.zeros(32, device=DEVICE)
    args = dict(top_k=4, n_group=4, topk_group=2)
    if bad == "dtype":
        logits = logits.bfloat16()
    elif bad == "bias":
        bias = torch.zeros(16, device=DEVICE)
    elif bad == "groups":
        args["n_group"] = 5
    else:
        args["top_k"] = 17  # more than the 2 kept groups of 8 hold
    with pytest.raises(ValueError):
        fused_grouped_topk(logits, bias, routed_scaling_factor=1.0, **args)
