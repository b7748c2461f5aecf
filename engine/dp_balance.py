"""Which data-parallel attention rank runs each request (`--load-balance-method`).

Every rank computes the same assignment from the same request list, so no message is exchanged:
- `round_robin`: request i goes to rank i mod world (request 0 on rank 0);
- `shortest_queue`: requests in order, each to the rank with the fewest tokens (prompt + new) assigned so far,
  ties to the lower rank, so ranks finish together even when lengths vary.
"""

from __future__ import annotations

from typing import Sequence

from engine.errors import WideepError

METHODS = ("round_robin", "shortest_queue")


def assign_ranks(costs: Sequence[int], world: int, method: str = "round_robin") -> list[int]:
    """costs[i]: tokens of request i (prompt + new) -> the rank of each request."""
    if method not in METHODS:
        raise WideepError(f"--load-balance-method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "round_robin":
        return [i % world for i in range(len(costs))]
    load = [0] * world
    ranks = []
    for cost in costs:
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += cost
        ranks.append(rank)
    return ranks
