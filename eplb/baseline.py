"""DeepSeek's published EPLB method (github.com/deepseek-ai/EPLB, `eplb.py`), rewritten on our primitives.

Kept as the yardstick that `eplb.algorithm.rebalance` must match or beat, layer by layer; the engine does not
use it. The published steps: pack expert groups onto nodes by sorted greedy; inside each node give each extra
replica to the expert with the largest load per replica; pack the replicas onto the node's GPUs by sorted
greedy. The global policy is the same with one node and one group; it is used when nodes do not divide groups.
Unlike ours, it may put two replicas of one expert on the same GPU, and it stops after the greedy pass.

load: `[L, E]` tokens routed to each logical expert of each MoE layer.
"""

from __future__ import annotations

import torch

from eplb.algorithm import check_layout, check_load, node_experts
from eplb.packing import deepseek_packing, one_cpu_thread, pack_greedy
from eplb.placement import ExpertPlacement


def deepseek_rebalance(
    load: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> ExpertPlacement:
    """The published hierarchical-or-global placement. load: `[L, E]`; returns `[L, num_physical]` phy2log."""
    load = check_load(load)
    check_layout(load.shape[1], num_physical, num_groups, num_nodes, num_gpus)
    with one_cpu_thread():
        return _deepseek(load, num_physical, num_groups, num_nodes, num_gpus)


def _deepseek(load: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int):
    num_layers, num_experts = load.shape
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    group_size = num_experts // num_groups
    slots_per_node = num_physical // num_nodes
    gpus_per_node = num_gpus // num_nodes

    group_load = load.view(num_layers, num_groups, group_size).sum(2)  # [L, K]
    node_of_group = pack_greedy(group_load, None, num_nodes)  # [L, K]
    local2log, local_load = node_experts(load, node_of_group, num_nodes)  # [L*N, E/N]
    ids, _, gpu_of = deepseek_packing(local_load, slots_per_node, gpus_per_node)  # [L*N, P/N]

    order = torch.argsort(gpu_of * slots_per_node + torch.arange(slots_per_node), dim=1)
    phy2log = local2log.gather(1, ids.gather(1, order)).view(num_layers, num_physical)  # [L, P]
    return ExpertPlacement.from_phy2log(phy2log, num_experts)
