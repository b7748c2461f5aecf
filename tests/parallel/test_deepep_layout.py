"""The DeepEP backend's bookkeeping on the CPU: settings checks and messages, FP8 rows, grouping received rows, the
weighted fold, masked <-> contiguous, and the whole dispatcher over a stand-in for `deep_ep` on gloo ranks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _parallel_ranks import REPO, worker_env

from engine.errors import WideepError
from parallel.deepep_layout import (
    HostInts,
    check_deepep_settings,
    check_low_latency_tokens,
    contiguous_to_masked,
    dequantize_rows,
    dequantize_tokens,
    fold_step_sizes,
    group_received,
    masked_to_contiguous,
    plan_fold,
    quantize_per_token,
    uses_low_latency,
)
from parallel.dispatcher import DispatchedTokens, make_dispatcher

CHECKS = REPO / "tests" / "parallel" / "_deepep_checks.py"


def random_local_ids(r: int, k: int, slots: int, seed: int) -> torch.Tensor:
    """`[R, K]` local slot ids as DeepEP hands them: distinct per row, -1 elsewhere, at least one local per row."""
    g = torch.Generator().manual_seed(seed)
    # K distinct slots out of this rank's and two other ranks' worth; the others' become -1.
    picks = [torch.randperm(3 * max(slots, k), generator=g)[:k] for _ in range(r)]
    ids = torch.stack(picks) if r else torch.empty(0, k, dtype=torch.int64)
    ids = torch.where(ids < slots, ids, -1)
    if r:  # DeepEP sends a rank only the tokens that have an expert there
        ids[:, 0] = torch.where(ids.max(1).values < 0, torch.randint(slots, (r,), generator=g), ids[:, 0])
    return ids


# ---- modes and settings --------------------------------------------------------------------------------------------


def test_mode_per_step():
    assert [uses_low_latency("auto", s) for s in ("prefill", "decode")] == [False, True]
    assert [uses_low_latency("normal", s) for s in ("prefill", "decode")] == [False, False]
    assert [uses_low_latency("low_latency", s) for s in ("prefill", "decode")] == [True, True]
    with pytest.raises(WideepError, match="--deepep-mode"):
        uses_low_latency("fast", "decode")


def test_too_many_tokens_names_the_flag():
    check_low_latency_tokens(128, 128)
    with pytest.raises(WideepError) as err:
        check_low_latency_tokens(129, 128)
    msg = str(err.value)
    assert "129" in msg and "--deepep-max-dispatch-tokens-per-rank 128" in msg and "at least 129" in msg


@pytest.mark.parametrize(
    "change, words",
    [
        ({"dtype": torch.float32}, "--dtype bfloat16"),
        ({"world": 3, "deepep_mode": "normal", "num_slots": 24}, "--ep-size 3"),
        ({"world": 12, "deepep_mode": "low_latency", "num_slots": 24}, "--ep-size 12"),
        ({"hidden_size": 64}, "--deepep-mode normal"),
        ({"hidden_size": 2056, "deepep_mode": "normal"}, "--no-deepep-fp8-dispatch"),
        ({"max_tokens": 0}, "--deepep-max-dispatch-tokens-per-rank 0"),
        ({"max_tokens": 3, "world": 2}, "--deepep-max-dispatch-tokens-per-rank 3"),
        ({"deepep_mode": "turbo"}, "--deepep-mode 'turbo'"),
    ],
)
def test_settings_refused_with_the_flag_to_change(change, words):
    base = {"world": 4, "hidden_size": 7168, "dtype": torch.bfloat16, "deepep_mode": "auto", "fp8_dispatch": True,
            "num_slots": 256, "max_tokens": 128}
    check_deepep_settings(**base)
    with pytest.raises(WideepError) as err:
        check_deepep_settings(**{**base, **change})
    assert words in str(err.value)


def test_normal_mode_takes_any_hidden_multiple_of_8_in_bf16():
    check_deepep_settings(world=2, hidden_size=64, dtype=torch.bfloat16, deepep_mode="normal", fp8_dispatch=False,
                          num_slots=32, max_tokens=128)


def test_missing_deep_ep_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_ep", None)  # `import deep_ep` raises ImportError
    import parallel.deepep  # noqa: F401 - registers "deepep"

    with pytest.raises(WideepError) as err:
        make_dispatcher("deepep", state=None, num_local_slots=4, hidden_size=2048, dtype=torch.bfloat16)
    msg = str(err.value)
    assert "not on PyPI" in msg and 'README\'s "DeepEP" section' in msg and "v1.2.1" in msg


# ---- FP8 rows ------------------------------------------------------------------------------------------------------


def test_fp8_rows_round_trip_per_128_channels():
    x = torch.randn(5, 512) * torch.tensor([1e-3, 1.0, 30.0, 1e3]).repeat_interleave(128)  # each group its own range
    q, s = quantize_per_token(x.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (5, 512) and s.shape == (5, 4) and s.dtype == torch.float32
    back = dequantize_rows(q, s, torch.float32)
    err = ((back - x).abs() / x.abs().view(5, 4, 128).amax(-1).repeat_interleave(128, -1)).max()
    assert err < 2 ** -4  # e4m3 keeps 3 mantissa bits, relative to each group's largest value
    assert torch.equal(quantize_per_token(torch.zeros(2, 256, dtype=torch.bfloat16))[0].float(), torch.zeros(2, 256))


def test_dequantize_takes_column_major_scales_like_low_latency():
    q, s = quantize_per_token(torch.randn(2 * 8, 256))
    q, s = q.view(2, 8, 256), s.view(2, 8, 2)
    col_major = s.transpose(1, 2).contiguous().transpose(1, 2)  # DeepEP's layout: same values, other strides
    assert torch.equal(dequantize_rows(q, col_major), dequantize_rows(q, s))
    tokens = DispatchedTokens("masked", q, torch.tensor([3, 8]), col_major)
    plain = dequantize_tokens(tokens)
    assert plain.scales is None and plain.hidden.dtype == torch.bfloat16 and plain.layout == "masked"
    assert dequantize_tokens(plain) is plain


# ---- normal mode: grouping received rows and the fold -------------------------------------------------------------


@pytest.mark.parametrize("r, k, slots", [(0, 4, 3), (1, 1, 1), (9, 4, 3), (40, 8, 6)])
def test_grouping_received_rows_by_slot(r, k, slots):
    ids = random_local_ids(r, k, slots, seed=r + k)
    x = torch.randn(r, 16)
    n = int((ids >= 0).sum())
    src_row, per_slot, row = group_received(ids, slots, n)
    assert per_slot.tolist() == [int((ids == e).sum()) for e in range(slots)]
    # Reference: for each slot in order, the (row, k) pairs that chose it, in row order.
    want = [i for e in range(slots) for i in range(r) for j in range(k) if ids[i, j] == e]
    assert src_row.tolist() == want
    for i in range(r):
        for j in range(k):
            assert (row[i, j] >= 0) == (ids[i, j] >= 0)
            if ids[i, j] >= 0:
                assert src_row[row[i, j]] == i and torch.equal(x[src_row][row[i, j]], x[i])


@pytest.mark.parametrize("r, k, slots", [(0, 4, 3), (1, 1, 1), (9, 4, 3), (40, 8, 6)])
def test_fold_is_the_weighted_top_k_sum_in_k_order(r, k, slots):
    ids = random_local_ids(r, k, slots, seed=7 * r + k)
    weights = torch.rand(r, k)
    n = int((ids >= 0).sum())
    _, _, row = group_received(ids, slots, n)
    steps = HostInts.start(fold_step_sizes(row)).get()
    assert steps == [int(((ids >= 0).sum(1) > j).sum()) for j in range(k)]
    y = torch.randn(n, 32).to(torch.bfloat16)
    partial = plan_fold(row, weights, steps).apply(y)
    assert partial.shape == (r, 32) and partial.dtype == torch.bfloat16
    want = torch.zeros(r, 32)
    for i in range(r):
        acc = torch.zeros(32)
        for j in range(k):  # the order the torch backend's receiver uses, so rounding matches bit for bit
            if row[i, j] >= 0:
                acc = acc + y[row[i, j]].float() * weights[i, j]
        want[i] = acc
    assert torch.equal(partial, want.to(torch.bfloat16))


# ---- masked <-> contiguous -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True])
def test_masked_and_contiguous_convert_both_ways(fp8):
    counts = torch.tensor([3, 0, 5, 1])
    hidden = torch.randn(9, 256)
    scales = None
    if fp8:
        hidden, scales = quantize_per_token(hidden)
    contiguous = DispatchedTokens("contiguous", hidden, counts, scales)
    masked = contiguous_to_masked(contiguous, max_m=6)
    assert masked.hidden.shape == (4, 6, 256) and masked.tokens_per_expert.tolist() == [3, 0, 5, 1]
    start = 0
    for e, c in enumerate(counts.tolist()):
        assert torch.equal(masked.hidden[e, :c].float(), hidden[start:start + c].float())
        assert masked.hidden[e, c:].float().abs().sum() == 0
        if fp8:
            assert torch.equal(masked.scales[e, :c], scales[start:start + c])
        start += c
    again = masked_to_contiguous(masked)
    assert again.layout == "contiguous" and torch.equal(again.hidden.float(), hidden.float())
    assert torch.equal(again.tokens_per_expert, counts)
    if fp8:
        assert torch.equal(again.scales, scales)
    with pytest.raises(ValueError, match="max_m"):
        contiguous_to_masked(contiguous, max_m=4)


# ---- the whole dispatcher over the stand-in, on gloo ranks ------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_dispatcher_on_a_stand_in_for_deep_ep(world):
    """Every mode (normal, low-latency, auto; bf16 and FP8) against the torch backend and the direct weighted sum,
    with an idle rank, slots of -1, a token with no expert, everything to one rank, and the token limit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--standalone", str(CHECKS),
           "fake"]
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300, check=False)
    out = f"exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-6000:]}"
    assert proc.returncode == 0, out
    assert all(f"rank {r} ok" in proc.stdout for r in range(world)), out
