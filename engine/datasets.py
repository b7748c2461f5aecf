"""The bench's prompt sets: `--dataset-name random` (uniform token ids) and `skewed` (Zipf-distributed token ids)."""

from __future__ import annotations

import argparse

import torch

from engine.runner import Request
from engine.sampling import SamplingParams


def random_requests(args: argparse.Namespace, vocab: int, seed: int) -> list[Request]:
    """Prompts of `--dataset-name`, with lengths drawn as sglang's random dataset draws them; the same for a seed.

    random: token ids uniform over `[0, vocab)`. skewed: token ids from a Zipf law, `P(k-th most frequent) ~
    k^-skew_exponent`, the frequency ranks spread over the vocabulary by a seeded permutation (so the most frequent
    token is no special token). With dummy weights a repeated token routes alike, so skewed prompts load a few
    experts more than the rest.
    """
    g = torch.Generator().manual_seed(seed)

    def lengths(full: int) -> list[int]:
        low = max(int(full * args.random_range_ratio), 1)
        return torch.randint(low, full + 1, (args.num_prompts,), generator=g).tolist()

    inputs, outputs = lengths(args.random_input_len), lengths(args.random_output_len)
    if args.dataset_name == "skewed":
        token_of_rank = torch.randperm(vocab, generator=g)
        weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-args.skew_exponent)

        def draw(n: int) -> list[int]:
            return token_of_rank[torch.multinomial(weights, n, replacement=True, generator=g)].tolist()
    else:
        def draw(n: int) -> list[int]:
            return torch.randint(0, vocab, (n,), generator=g).tolist()
    return [
        Request(i, draw(n_in), SamplingParams(max_new_tokens=n_out, ignore_eos=not args.disable_ignore_eos))
        for i, (n_in, n_out) in enumerate(zip(inputs, outputs))
    ]
