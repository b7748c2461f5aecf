"""Stickiness: relabel a planned placement so that as many slots as possible keep the expert they hold now.

The planner (`eplb.algorithm.rebalance`) decides from load alone which experts share a GPU; which physical GPU
gets which of those sets, and which slot of a GPU holds which of its experts, does not change any GPU's load.
`keep_in_place` uses that freedom to cut the weights a rebalance moves:

1. per layer, planned GPU expert sets are matched to physical GPUs to maximise the slots whose expert is already
   there (optimal assignment, Hungarian method). With nodes, whole planned nodes are matched to physical nodes
   and GPUs only within a node, so every expert group the hierarchical policy keeps on one node stays on one node;
2. inside a GPU, an expert it already holds stays in its slot; the others fill the freed slots in order.

Each GPU's multiset of experts is one the plan made, so per-GPU loads (up to their order), balancedness, replica
counts and "no GPU two replicas of one expert" are exactly the plan's. Pure functions on CPU tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.errors import WideepError
from eplb.packing import one_cpu_thread
from eplb.placement import ExpertPlacement


def keep_in_place(new: ExpertPlacement, old: ExpertPlacement, num_gpus: int, num_nodes: int = 1) -> ExpertPlacement:
    """`new` with its GPUs' expert sets moved to the GPUs (and slots) that already hold most of them in `old`.

    new, old: placements of the same `[L, P]` shape; slot p lives on GPU `p // (P / num_gpus)`, GPUs
    `[n G/N, (n+1) G/N)` form node n. num_nodes: 1 lets a set go to any GPU (the global policy); more keeps each
    planned node's sets together on one node (the hierarchical policy). Deterministic; ties keep the planned GPU.
    Returns an `ExpertPlacement` whose GPUs hold the same expert multisets as `new`'s, permuted.
    """
    if new.phy2log.shape != old.phy2log.shape or new.num_experts != old.num_experts:
        raise WideepError(f"cannot relabel a placement of {tuple(new.phy2log.shape)} slots and {new.num_experts} "
                          f"experts against one of {tuple(old.phy2log.shape)} and {old.num_experts}")
    if num_gpus < 1 or num_nodes < 1 or num_gpus % num_nodes:
        raise WideepError(f"{num_gpus} GPUs do not split evenly over {num_nodes} nodes")
    per_gpu = new.slots_per_rank(num_gpus)
    with one_cpu_thread():  # small tensors: threads only add barriers (see eplb.algorithm)
        rows = [_relabel_layer(n_row, o_row, new.num_experts, num_gpus, num_nodes, per_gpu)
                for n_row, o_row in zip(new.phy2log, old.phy2log)]
    return ExpertPlacement.from_phy2log(torch.stack(rows), new.num_experts)


def slots_kept(new: ExpertPlacement, old: ExpertPlacement) -> int:
    """Slots (over all layers) whose expert is the same in both placements."""
    return int((new.phy2log == old.phy2log).sum())


def _relabel_layer(new: torch.Tensor, old: torch.Tensor, num_experts: int, num_gpus: int, num_nodes: int,
                   per_gpu: int) -> torch.Tensor:
    """new, old: `[P]` int64 phy2log of one layer. Returns the relabelled `[P]` row."""
    new_g, old_g = new.view(num_gpus, per_gpu), old.view(num_gpus, per_gpu)  # [G, S]
    new_cnt = torch.zeros(num_gpus, num_experts, dtype=torch.int64).scatter_add_(1, new_g, torch.ones_like(new_g))
    old_cnt = torch.zeros(num_gpus, num_experts, dtype=torch.int64).scatter_add_(1, old_g, torch.ones_like(old_g))
    # overlap[a, b]: slots planned GPU a could keep on physical GPU b, the multiset intersection of their experts:
    # sum over e of min(count on a, count on b) = sum over k >= 1 of [both hold e at least k times].
    overlap = sum((new_cnt >= k).double() @ (old_cnt >= k).double().T
                  for k in range(1, int(max(new_cnt.max(), old_cnt.max())) + 1))  # [G, G]
    overlap = overlap.round().to(torch.int64).numpy()
    gpn = num_gpus // num_nodes
    # Within every (planned node, physical node) pair the best GPU matching, then the best node matching on
    # those totals: the best relabelling that moves whole nodes and GPUs only inside a node.
    inner = {}
    node_score = np.zeros((num_nodes, num_nodes), dtype=np.int64)
    for a in range(num_nodes):
        for b in range(num_nodes):
            block = overlap[a * gpn:(a + 1) * gpn, b * gpn:(b + 1) * gpn]
            inner[a, b] = _max_assignment(block) if block.any() else np.arange(gpn)
            node_score[a, b] = block[np.arange(gpn), inner[a, b]].sum()
    node_of = _max_assignment(node_score)
    gpu_of = np.empty(num_gpus, dtype=np.int64)  # physical GPU of each planned GPU
    for a in range(num_nodes):
        gpu_of[a * gpn:(a + 1) * gpn] = node_of[a] * gpn + inner[a, int(node_of[a])]

    out = torch.empty_like(old_g)
    for a in range(num_gpus):
        out[gpu_of[a]] = torch.tensor(_keep_slots(new_g[a].tolist(), old_g[gpu_of[a]].tolist()))
    return out.view(-1)


def _keep_slots(planned: list[int], current: list[int]) -> list[int]:
    """One GPU's slots: each planned expert the GPU holds now stays in (one of) its current slots; the rest fill
    the freed slots in slot order, in planned order."""
    left = {}
    for e in planned:
        left[e] = left.get(e, 0) + 1
    slots: list[int | None] = []
    for e in current:
        if left.get(e, 0):
            left[e] -= 1
            slots.append(e)
        else:
            slots.append(None)
    rest = []
    for e in planned:
        if left.get(e, 0):
            left[e] -= 1
            rest.append(e)
    it = iter(rest)
    return [e if e is not None else next(it) for e in slots]


def _max_assignment(score: np.ndarray) -> np.ndarray:
    """Row -> column permutation maximising the summed `score` `[n, n]` (int), ties to the identity.

    Hungarian method (shortest augmenting paths, O(n^3), the inner loop over columns vectorised). A bonus below
    one score unit on the diagonal makes the identity win every tie, so a placement relabelled against itself
    stays as it is.
    """
    n = score.shape[0]
    cost = -(score.astype(np.float64) * (n + 1) + np.eye(n))  # minimise; the bonus sums to < one unit
    inf = np.inf
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j]: row (1-based) on column j; column 0 is the root
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = np.full(n + 1, inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            free = ~used
            reduced = cost[i0 - 1] - u[i0] - v[1:]  # [n], columns 1..n
            better = free[1:] & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            masked = np.where(free[1:], minv[1:], inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    result = np.empty(n, dtype=np.int64)
    result[match[1:] - 1] = np.arange(n)
    return result
