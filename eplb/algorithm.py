"""EPLB placement algorithm: recorded expert load in, expert placement out. Pure functions on CPU tensors.

Policies (`algorithm=`):
- `hierarchical`: expert groups are packed onto nodes (so group-limited routing keeps a token's experts on few
  nodes), experts are replicated inside each node, and the replicas are packed onto that node's GPUs.
- `global`: replicate over all slots and pack onto all GPUs, ignoring groups and nodes.
- `auto`: hierarchical when the node count divides the group count, else global (as DeepSeek's EPLB chooses;
  on one node both are the same).

Both start from DeepSeek's published steps (greedy replication, sorted greedy packing) and go further:
- a replica never shares a GPU with another replica of its expert (DeepSeek's method may put two there);
- replica counts are chosen for packing, not only for the lightest largest replica: fewer, heavier replicas
  and near-empty fillers often pack far better on skewed load (Zipf 1.4: balancedness 0.82 -> 1.00);
- a local search swaps replicas between GPUs and hands slots from one expert to another while that lowers the
  hottest GPU, then seeded random restarts continue where a bound says there is room;
- every candidate, DeepSeek's own packing included where it is valid, is scored and the best kept per layer,
  so no layer ends worse than the published method wherever that method keeps replicas apart.
`eplb.baseline` keeps the published method as the yardstick.

load: `[L, E]` tokens routed to each logical expert of each MoE layer (any real dtype, >= 0, finite).
"""

from __future__ import annotations

from typing import Literal

import torch

from engine.errors import WideepError
from eplb.packing import (
    bin_loads,
    deepseek_packing,
    expand,
    has_clash,
    one_cpu_thread,
    pack_greedy,
    replicate,
    replicate_limited,
)
from eplb.placement import ExpertPlacement
from eplb.search import perturb, refine, refine_swaps

Algorithm = Literal["auto", "hierarchical", "global"]
ALGORITHMS = ("auto", "hierarchical", "global")


def check_layout(num_experts: int, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    """Raises `WideepError` naming the first count that cannot form a placement, and how to fix it."""
    for name, value in (("experts", num_experts), ("groups", num_groups), ("nodes", num_nodes), ("GPUs", num_gpus)):
        if value < 1:
            raise WideepError(f"the number of {name} must be at least 1, found {value}")
    if num_physical < num_experts:
        raise WideepError(
            f"{num_physical} physical slots cannot hold {num_experts} experts; redundant experts must be >= 0"
        )
    if num_gpus % num_nodes:
        raise WideepError(f"{num_gpus} GPUs do not split evenly over {num_nodes} nodes; use a GPU count that is a "
                          "multiple of the node count")
    if num_physical % num_gpus:
        raise WideepError(
            f"{num_physical} slots ({num_experts} experts + {num_physical - num_experts} redundant) do not split "
            f"evenly over {num_gpus} GPUs; choose the redundant count so that experts + redundant is a multiple "
            f"of {num_gpus}"
        )
    if num_experts % num_groups:
        raise WideepError(f"{num_groups} expert groups do not divide {num_experts} experts; use the model's "
                          "n_group (a divisor of the expert count)")
    if num_physical > num_experts * num_gpus:
        raise WideepError(f"{num_physical} slots need some expert on one GPU twice ({num_experts} experts x "
                          f"{num_gpus} GPUs at most); use fewer redundant experts")


def resolve_algorithm(algorithm: str, num_groups: int, num_nodes: int) -> str:
    """The policy `algorithm` stands for: `auto` becomes hierarchical when nodes divide groups, else global.

    On one node the two policies place alike (all groups share the node), and `auto` says global.
    """
    if algorithm not in ALGORITHMS:
        raise WideepError(f"unknown EPLB algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if algorithm == "auto":
        return "hierarchical" if num_nodes > 1 and num_groups % num_nodes == 0 else "global"
    if algorithm == "hierarchical" and num_groups % num_nodes:
        raise WideepError(f"the hierarchical policy packs whole expert groups onto nodes, but {num_groups} groups "
                          f"do not split over {num_nodes} nodes; use --algorithm global (or auto)")
    return algorithm


def check_load(load: torch.Tensor) -> torch.Tensor:
    """Validates `load` `[L, E]` and returns it as float64 on CPU."""
    if not isinstance(load, torch.Tensor) or load.dim() != 2 or 0 in load.shape:
        shape = tuple(load.shape) if isinstance(load, torch.Tensor) else type(load).__name__
        raise WideepError(f"expert load must be a non-empty [layers, experts] matrix, found {shape}")
    if load.dtype == torch.bool or load.is_complex():
        raise WideepError(f"expert load must hold real counts, found dtype {load.dtype}")
    load = load.detach().to("cpu", torch.float64)
    if not torch.isfinite(load).all():
        raise WideepError("expert load holds NaN or infinite counts; record the statistics again")
    if (load < 0).any():
        raise WideepError("expert load holds negative counts; token counts are >= 0")
    return load


def rebalance(
    load: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int,
    algorithm: Algorithm = "auto",
) -> ExpertPlacement:
    """Plans which logical expert each of `num_physical` slots holds, per MoE layer.

    load: `[L, E]` expert load. Slot p lives on GPU `p // (num_physical // num_gpus)`; GPUs
    `[n * G/N, (n + 1) * G/N)` form node n. Every expert gets >= 1 slot, every GPU the same number of slots, and
    no GPU two slots of one expert. Under the hierarchical policy each expert group lives on a single node.
    Deterministic: equal inputs give equal placements. Returns an `ExpertPlacement` with `[L, num_physical]`
    phy2log, each GPU's slots in ascending expert order.
    """
    load = check_load(load)
    check_layout(load.shape[1], num_physical, num_groups, num_nodes, num_gpus)
    with one_cpu_thread():
        return _rebalance(load, num_physical, num_groups, num_nodes, num_gpus, algorithm)


def _rebalance(
    load: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int, algorithm: str
) -> ExpertPlacement:
    """`rebalance` after validation. load: `[L, E]` float64."""
    num_layers, num_experts = load.shape
    if resolve_algorithm(algorithm, num_groups, num_nodes) == "global":
        num_groups, num_nodes = 1, 1
    group_size = num_experts // num_groups
    gpus_per_node, experts_per_node = num_gpus // num_nodes, num_experts // num_nodes
    slots_per_node = num_physical // num_nodes
    if slots_per_node > experts_per_node * gpus_per_node:
        raise WideepError(
            f"each node has {slots_per_node} slots but only {experts_per_node} experts x {gpus_per_node} GPUs "
            "can be placed there without repeating an expert on a GPU; use fewer redundant experts or --algorithm "
            "global"
        )

    # 1. Whole groups onto nodes. Two candidates per layer: the plain greedy packing (DeepSeek's) and the same
    # after swaps that lower the hottest node. Least node load is not always least GPU load (a node with one
    # very hot expert is bound by its replicas, not its total), so both are planned through and the better kept.
    group_load = load.view(num_layers, num_groups, group_size).sum(2)  # [L, K]
    node_of_group = pack_greedy(group_load, None, num_nodes)  # [L, K]
    if num_nodes > 1:
        refined = refine_swaps(group_load, None, node_of_group, num_nodes, 4 * num_groups)
        node_of_group = torch.cat([node_of_group, refined])  # [C*L, K], candidate-major
    choices = node_of_group.shape[0] // num_layers
    local2log, local_load = node_experts(load.repeat(choices, 1), node_of_group, num_nodes)  # [C*L*N, E/N]

    # 2-3. Replicas and GPUs inside every node of every candidate, then the better candidate of each layer.
    cnt, ids, gpu_of, floor = _place_in_nodes(local_load, slots_per_node, gpus_per_node)
    peak = _row_peaks(local_load, cnt, ids, gpu_of, gpus_per_node).view(choices, num_layers, num_nodes)
    best = peak.amax(2).argmin(0)  # [L]; a tie keeps the first candidate
    rows = ((best * num_layers + torch.arange(num_layers)).unsqueeze(1) * num_nodes + torch.arange(num_nodes))
    rows = rows.flatten()  # [L*N] chosen rows, layer-major
    local2log, local_load, floor = local2log[rows], local_load[rows], floor[rows]
    cnt, ids, gpu_of = cnt[rows], ids[rows], gpu_of[rows]

    # 4. Random restarts where they can pay: a node's hottest GPU carries at least the node's mean and the
    # largest replica, and lowering a node below the hottest other node of its layer changes nothing.
    peak = _row_peaks(local_load, cnt, ids, gpu_of, gpus_per_node).view(num_layers, num_nodes)
    bound = torch.maximum(local_load.sum(1) / gpus_per_node, floor).view(num_layers, num_nodes)  # [L, N]
    target = torch.maximum(bound.max(1, keepdim=True).values, _max_of_others(peak))  # [L, N]
    cnt, ids, gpu_of = perturb(local_load, cnt, ids, gpu_of, gpus_per_node, target.flatten(), _KICKS, _BUDGET)

    # 5. Slots: GPU-major, ascending expert inside a GPU; local ids back to logical ids.
    order = torch.argsort(gpu_of * experts_per_node + ids, dim=1)  # keys are unique within a row
    phy2log = local2log.gather(1, ids.gather(1, order)).view(num_layers, num_physical)  # [L, P]
    return ExpertPlacement.from_phy2log(phy2log, num_experts)


# Replica size limits tried, as multiples of the smallest possible largest replica (see `replicate_limited`).
_LIMITS = (1.1, 1.25, 1.4, 1.6, 1.8, 2.0, 2.5)
# Random restarts for rows well above their bound (see `perturb`): at most _KICKS each, and rows x replicas
# kicked in all at most _BUDGET, which keeps DeepSeek-scale plans well under a second on 2 cores.
_KICKS = 16
_BUDGET = 65536


def node_experts(
    load: torch.Tensor, node_of_group: torch.Tensor, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each node's experts, ascending, given the node of each group.

    load: `[L, E]`; node_of_group: `[L, K]` int64 with K / N groups per node. Returns local2log `[L*N, E/N]`
    int64 (row l*N + n: the experts of node n in layer l) and their load `[L*N, E/N]`.
    """
    num_layers, num_experts = load.shape
    node_of_expert = node_of_group.repeat_interleave(num_experts // node_of_group.shape[1], dim=1)  # [L, E]
    # A stable sort by node keeps expert ids ascending inside each node.
    local2log = torch.sort(node_of_expert, dim=1, stable=True).indices  # [L, E], node-major
    local_load = load.gather(1, local2log)
    return local2log.view(num_layers * num_nodes, -1), local_load.view(num_layers * num_nodes, -1)


def _place_in_nodes(
    local_load: torch.Tensor, slots_per_node: int, gpus_per_node: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replica counts and GPUs for each node's experts. local_load: `[R, M]` (one row per node and layer).

    Returns cnt `[R, M]`, ids and gpu_of `[R, slots_per_node]` (local expert and GPU of each replica), and
    floor `[R]`, the smallest largest replica any counts reach.
    """
    rows, experts_per_node = local_load.shape
    # Candidates, at most one replica per GPU: DeepSeek's greedy counts, plus fewer-but-heavier variants, all
    # packed by the clash-free sorted greedy. DeepSeek's own packing joins them in rows where it happens to keep
    # replicas apart, so a row never ends worse than the published method where that is valid.
    greedy = replicate(local_load, slots_per_node, gpus_per_node)  # [R, M]
    floor = (local_load / greedy).max(1).values  # [R]
    candidates = [greedy] + [
        replicate_limited(local_load, slots_per_node, gpus_per_node, floor * factor) for factor in _LIMITS
    ]
    cnt = torch.cat(candidates)  # [C*R, M]
    ids = expand(cnt)  # [C*R, P/N] local expert of each replica
    weight = (local_load.repeat(len(candidates), 1) / cnt).gather(1, ids)  # load each replica serves
    gpu_of = pack_greedy(weight, ids, gpus_per_node)  # [C*R, P/N]
    ds_ids, ds_weight, ds_gpu_of = deepseek_packing(local_load, slots_per_node, gpus_per_node)  # [R, P/N]
    ds_cnt = torch.zeros_like(greedy).scatter_add_(1, ds_ids, torch.ones_like(ds_ids))
    cnt, ids, weight = torch.cat([cnt, ds_cnt]), torch.cat([ids, ds_ids]), torch.cat([weight, ds_weight])
    gpu_of = torch.cat([gpu_of, ds_gpu_of])
    peak = bin_loads(weight, gpu_of, gpus_per_node).max(1).values.view(-1, rows)  # [C+1, R]
    peak[-1].masked_fill_(has_clash(ds_ids, ds_gpu_of, experts_per_node), float("inf"))
    pick = peak.argmin(0) * rows + torch.arange(rows)  # [R] first best candidate of each row
    cnt, ids, gpu_of = cnt[pick], ids[pick], gpu_of[pick]
    # Local search on the kept candidate only (it is the costly step): swaps between GPUs, and moves of one slot
    # from an expert with spare replicas to another.
    cnt, ids, gpu_of = refine(local_load, cnt, ids, gpu_of, gpus_per_node, 8 * slots_per_node)
    return cnt, ids, gpu_of, floor


def _row_peaks(local_load, cnt, ids, gpu_of, num_gpus: int) -> torch.Tensor:
    """Hottest GPU of each row. local_load, cnt: `[R, M]`; ids, gpu_of: `[R, N]`. Returns `[R]`."""
    return bin_loads((local_load / cnt).gather(1, ids), gpu_of, num_gpus).max(1).values


def _max_of_others(values: torch.Tensor) -> torch.Tensor:
    """For each entry of `[L, N]`, the largest other entry of its row (-inf when N == 1)."""
    if values.shape[1] == 1:
        return torch.full_like(values, float("-inf"))
    top2 = values.topk(2, dim=1).values  # [L, 2]
    is_top = values == top2[:, :1]
    return torch.where(is_top, top2[:, 1:], top2[:, :1])


def trivial_placement(num_layers: int, num_experts: int, num_physical: int, num_gpus: int) -> ExpertPlacement:
    """The placement without EPLB: slot p holds expert p (`arange(E)`), when E splits over the GPUs.

    When it does not, the engine needs the redundant slots to even out the GPUs, and slot p holds expert
    `p % E`. Used as the "before" of every plan.
    """
    slots = num_experts if num_experts % num_gpus == 0 else num_physical
    return ExpertPlacement.from_phy2log(torch.arange(slots).remainder(num_experts).repeat(num_layers, 1), num_experts)


def gpu_load(load: torch.Tensor, placement: ExpertPlacement, num_gpus: int) -> torch.Tensor:
    """Load each GPU serves when each expert's load splits evenly over its replicas.

    load: `[L, E]`; returns `[L, G]` float64.
    """
    load = check_load(load)
    if load.shape != placement.logcnt.shape:
        raise WideepError(
            f"load is {tuple(load.shape)} [layers, experts] but the placement is for "
            f"{tuple(placement.logcnt.shape)}; use statistics of the same model"
        )
    per_rank = placement.slots_per_rank(num_gpus)
    per_slot = (load / placement.logcnt).gather(1, placement.phy2log)  # [L, P]
    gpu_of = torch.arange(placement.num_slots).div(per_rank, rounding_mode="floor").expand_as(per_slot)
    return bin_loads(per_slot, gpu_of, num_gpus)


def balancedness(load: torch.Tensor, placement: ExpertPlacement, num_gpus: int) -> torch.Tensor:
    """Per layer, mean GPU load over max GPU load (1.0 = perfectly even; a layer with no load counts as 1.0).

    load: `[L, E]`; returns `[L]` float64 in (0, 1].
    """
    per_gpu = gpu_load(load, placement, num_gpus)  # [L, G]
    peak = per_gpu.max(1).values
    return torch.where(peak > 0, per_gpu.mean(1) / peak.clamp_min(1e-300), torch.ones_like(peak))
