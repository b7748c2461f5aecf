"""Token sampling: greedy, temperature, top-k and top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import WideepError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise WideepError(f"--max-new-tokens must be >= 1, found {self.max_new_tokens}")
        if self.temperature < 0:
            raise WideepError(f"--temperature must be >= 0, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise WideepError(f"--top-p must lie in (0, 1], found {self.top_p}")
        if self.top_k < 0:
            raise WideepError(f"--top-k must be >= 0, found {self.top_k}")


def sample(logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator | None) -> torch.Tensor:
    """logits: `[B, V]` float32, one SamplingParams per row -> next tokens `[B]` int64."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)
    probs = (logits[idx] / temps[:, None]).softmax(-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[1], device=logits.device)[None, :]
    top_k = torch.tensor([params[i].top_k or probs.shape[1] for i in rows], device=logits.device)
    top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
    # Keep a token if it is within top-k and the mass before it is below top-p (the first token always stays).
    keep = (ranks < top_k[:, None]) & ((sorted_p.cumsum(-1) - sorted_p) < top_p[:, None])
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator).squeeze(1)
    out[idx] = order.gather(1, choice[:, None]).squeeze(1)
    return out
