"""Expert MLPs over dispatched tokens: the pure-torch reference for both dispatch layouts.

Each local expert slot e applies `down_e(silu(gate_e(x)) * up_e(x))` to its own rows, with
w13: `[E_local, 2I, H]` (gate rows then up rows) and w2: `[E_local, H, I]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def grouped_mlp_contiguous(
    x: torch.Tensor, tokens_per_expert: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """x: `[N, H]` rows grouped by slot; tokens_per_expert: `[E_local]` int64 summing to N -> `[N, H]`.

    Experts with zero rows are skipped.
    """
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        if n:
            out[start : start + n] = _expert(x[start : start + n], w13[e], w2[e])
        start += n
    return out


def grouped_mlp_masked(x: torch.Tensor, masked_m: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x: `[E_local, max_m, H]`; masked_m: `[E_local]` int64 valid rows per slot -> `[E_local, max_m, H]`.

    Rows past `masked_m[e]` are zero in the output.
    """
    out = torch.zeros_like(x)
    for e, n in enumerate(masked_m.tolist()):
        if n:
            out[e, :n] = _expert(x[e, :n], w13[e], w2[e])
    return out
