"""Token sampling: greedy, temperature, top-k and top-p, seeded per request.

A sampled token depends only on its logits, its request's seed and its index in the output, never on which other
requests share the batch, on the rank that runs it or on the device: the random draw for (seed, step, token id) is a
counter-based hash, and sampling is the Gumbel-max race over the tokens top-k and top-p keep. So a seeded request
gives the same text at any batch size, EP size or DP placement (given the same logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import WideepError

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    ignore_eos: bool = False
    seed: int | None = None  # None: the runner derives one from its seed and the request id

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise WideepError(f"--max-new-tokens must be >= 1, found {self.max_new_tokens}")
        if self.temperature < 0:
            raise WideepError(f"--temperature must be >= 0, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise WideepError(f"--top-p must lie in (0, 1], found {self.top_p}")
        if self.top_k < 0:
            raise WideepError(f"--top-k must be >= 0, found {self.top_k}")
        if self.seed is not None and self.seed < 0:
            raise WideepError(f"a sampling seed must be >= 0, found {self.seed}")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the 'lowbias32' finaliser) of int64 tensors holding values in [0, 2^32).

    Every product stays within int64 or wraps only above bit 32, which the mask drops, so CPU and CUDA agree."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def request_seed(job_seed: int, rid: int) -> int:
    """The seed of a request that names none: a hash of the job's seed and the request id (rank-independent).
    Host ints through the same finaliser as `_mix32` (a tensor op per request would cost more than the hash)."""

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & _MASK32
        x ^= x >> 15
        x = (x * 0x846CA68B) & _MASK32
        return x ^ (x >> 16)

    return mix(mix(job_seed & _MASK32) ^ (rid & _MASK32))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds, steps: `[R]` int64 (>= 0) -> `[R, vocab]` float32 uniform in (0, 1), a pure function of
    (seed, step, token id)."""
    row = _mix32(_mix32(seeds & _MASK32) ^ _mix32((seeds >> 32) & _MASK32) ^ (steps & _MASK32))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix32(_mix32(row[:, None] ^ ids[None, :]) ^ (row[:, None] >> 7))
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> torch.Tensor:
    """logits: `[B, V]` float32; per row its SamplingParams, its request's seed and the index of the token being
    drawn in that request's output -> next tokens `[B]` int64. Greedy rows take the argmax (lowest id on ties)."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return out
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    temps = torch.tensor([params[i].temperature for i in rows], device=dev)
    probs = (logits[idx] / temps[:, None]).softmax(-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(probs.shape[1], device=dev)[None, :]
    top_k = torch.tensor([params[i].top_k or probs.shape[1] for i in rows], device=dev)
    top_p = torch.tensor([params[i].top_p for i in rows], device=dev)
    # Keep a token if it is within top-k and the mass before it is below top-p (the first token always stays).
    keep_sorted = (ranks < top_k[:, None]) & ((sorted_p.cumsum(-1) - sorted_p) < top_p[:, None])
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    u = uniform_noise(torch.tensor([seeds[i] for i in rows], device=dev, dtype=torch.int64),
                      torch.tensor([steps[i] for i in rows], device=dev, dtype=torch.int64), probs.shape[1])
    # Gumbel-max: argmax(log p - log(-log u)) over the kept tokens draws from p renormalised over them.
    score = (probs.log() - (-u.log()).log()).masked_fill(~keep, float("-inf"))
    out[idx] = score.argmax(dim=-1)
    return out
