"""Load generators shared by the EPLB tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch


def zipf_load(layers: int, experts: int, s: float, seed: int, tokens: float = 1e5) -> torch.Tensor:
    """`[layers, experts]` float64 Poisson counts with Zipf(s) popularity, shuffled per layer."""
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.arange(1, experts + 1, dtype=torch.float64) ** -s
    popularity = popularity / popularity.sum() * tokens
    return torch.stack([torch.poisson(popularity[torch.randperm(experts, generator=gen)], generator=gen)
                        for _ in range(layers)])


def random_load(kind: str, layers: int, experts: int, seed: int) -> torch.Tensor:
    """`[layers, experts]` float64 load of one of the kinds: uniform, zipf, int (small ties), sparse, poisson."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(layers, experts, generator=gen, dtype=torch.float64) * 100
    if kind == "zipf":
        return zipf_load(layers, experts, 0.5 + (seed % 7) * 0.25, seed)
    if kind == "int":
        return torch.randint(0, 20, (layers, experts), generator=gen).double()
    if kind == "sparse":
        hot = torch.rand(layers, experts, generator=gen) < 0.25
        return hot * torch.randint(1, 1000, (layers, experts), generator=gen).double()
    if kind == "poisson":
        return torch.poisson(torch.full((layers, experts), 50.0, dtype=torch.float64), generator=gen)
    raise ValueError(kind)
