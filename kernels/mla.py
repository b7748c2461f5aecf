"""Multi-head latent attention over the latent KV cache: the pure-torch reference backend.

The cache holds, per token and layer, `kv_lora_rank` (r) normalised latent values followed by `qk_rope_head_dim`
(d_r) rotated key values: `kv_cache[slots, r + d_r]`. Decode uses the absorbed form: queries are projected into
the latent space once per step, so attention reads the cache as a single shared key/value head.
"""

from __future__ import annotations

import torch


def mla_decode_torch(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One new token per sequence attends to its whole cached sequence (itself included).

    q_latent: `[B, heads, r]` (q_nope already multiplied by W_UK); q_rope: `[B, heads, d_r]`;
    kv_cache: `[num_slots, r + d_r]`; page_table: `[B, S_max]` int64 cache slots of each sequence's tokens in
    order (entries past seq_lens[b] are ignored); seq_lens: `[B]` int64.
    Returns the latent attention output `[B, heads, r]` in q_latent's dtype (softmax in fp32).
    """
    r = q_latent.shape[-1]
    kv = kv_cache[page_table]  # [B, S, r + d_r]
    scores = torch.einsum("bhr,bsr->bhs", q_latent.float(), kv[..., :r].float())
    scores += torch.einsum("bhd,bsd->bhs", q_rope.float(), kv[..., r:].float())
    scores *= scale
    valid = torch.arange(page_table.shape[1], device=seq_lens.device)[None, :] < seq_lens[:, None]
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhs,bsr->bhr", probs, kv[..., :r].float()).to(q_latent.dtype)


def pages_to_slots(page_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """Paged table to per-token slots: page_table `[B, max_pages]` page ids (token t of a sequence lives in slot
    `page_table[b, t // page_size] * page_size + t % page_size`) -> `[B, max_pages * page_size]` int64 slots."""
    within = torch.arange(page_size, device=page_table.device)
    return (page_table.long()[:, :, None] * page_size + within).flatten(1)


def mla_extend_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float
) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its prefix and themselves (the non-absorbed form).

    q: `[n, heads, d_qk]` for positions prefix_len .. prefix_len + n - 1; k: `[S, heads, d_qk]` and
    v: `[S, heads, d_v]` for positions 0 .. S - 1, with S = prefix_len + n.
    Returns `[n, heads, d_v]` in q's dtype (softmax in fp32).
    """
    n, s = q.shape[0], k.shape[0]
    scores = torch.einsum("nhd,shd->hns", q.float(), k.float()) * scale
    causal = torch.arange(s, device=q.device)[None, :] <= (prefix_len + torch.arange(n, device=q.device))[:, None]
    scores.masked_fill_(~causal[None], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hns,shd->nhd", probs, v.float()).to(q.dtype)
