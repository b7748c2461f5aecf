"""Expert placement maps: which logical expert each physical slot holds, and the reverse.

phy2log: `[L, P]` int64, the logical expert in physical slot p of MoE layer l.
log2phy: `[L, E, R]` int64, the slots holding logical expert e (-1 padded, R = most replicas of any expert).
logcnt:  `[L, E]` int64, replicas of each logical expert (>= 1).
Slot p lives on rank `p // (P // world)`. L counts MoE layers only, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import WideepError


@dataclass(frozen=True)
class ExpertPlacement:
    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @classmethod
    def trivial(cls, num_layers: int, num_experts: int, num_slots: int | None = None) -> "ExpertPlacement":
        """Slot p holds expert p mod E: with redundant slots (num_slots > E) the first experts get a second replica,
        on a later rank than the first as long as each rank holds at most E slots."""
        num_slots = num_experts if num_slots is None else num_slots
        if num_slots < num_experts:
            raise WideepError(f"{num_slots} expert slots cannot hold {num_experts} experts")
        return cls.from_phy2log((torch.arange(num_slots) % num_experts).repeat(num_layers, 1), num_experts)

    @classmethod
    def from_phy2log(cls, phy2log: torch.Tensor, num_experts: int) -> "ExpertPlacement":
        """Derives `log2phy` and `logcnt` from `phy2log`; every expert must have at least one slot."""
        phy2log = phy2log.to(torch.int64).cpu()
        if phy2log.dim() != 2:
            raise WideepError(f"phy2log must be [layers, slots], found shape {tuple(phy2log.shape)}")
        if phy2log.numel() and (phy2log.min() < 0 or phy2log.max() >= num_experts):
            raise WideepError(f"phy2log holds expert ids outside [0, {num_experts})")
        layers, slots = phy2log.shape
        logcnt = torch.zeros(layers, num_experts, dtype=torch.int64)
        logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
        missing = (logcnt == 0).nonzero()
        if missing.numel():
            layer, expert = missing[0].tolist()
            raise WideepError(f"placement gives expert {expert} of MoE layer {layer} no slot; every expert needs one")
        width = int(logcnt.max())
        log2phy = torch.full((layers, num_experts, width), -1, dtype=torch.int64)
        for layer in range(layers):
            # Stable sort keeps each expert's replicas in slot order.
            order = torch.argsort(phy2log[layer], stable=True)
            experts = phy2log[layer][order]
            starts = torch.cumsum(logcnt[layer], 0) - logcnt[layer]
            rank_in_expert = torch.arange(slots) - starts[experts]
            log2phy[layer, experts, rank_in_expert] = order
        return cls(phy2log, log2phy, logcnt)

    def slots_per_rank(self, world_size: int) -> int:
        if self.num_slots % world_size:
            raise WideepError(
                f"{self.num_slots} expert slots do not split evenly over {world_size} ranks; "
                "choose --ep-num-redundant-experts so that experts + redundant is a multiple of the EP size"
            )
        return self.num_slots // world_size

    def local_experts(self, layer: int, rank: int, world_size: int) -> list[int]:
        """Logical expert held by each of `rank`'s slots in MoE layer `layer`, in slot order."""
        n = self.slots_per_rank(world_size)
        return self.phy2log[layer, rank * n : (rank + 1) * n].tolist()

    def to_device(self, device: torch.device | str) -> "ExpertPlacement":
        return ExpertPlacement(self.phy2log.to(device), self.log2phy.to(device), self.logcnt.to(device))


def map_static(placement: ExpertPlacement, layer: int, topk_ids: torch.Tensor, token_key: torch.Tensor) -> torch.Tensor:
    """Logical -> physical ids, spreading a replicated expert's tokens by a per-token key.

    topk_ids: `[T, K]` int64 logical ids; token_key: `[T]` int64 (e.g. the token's position); both on the
    placement's device. Returns `[T, K]` int64 physical slot ids. Deterministic: same token, same slot.
    """
    counts = placement.logcnt[layer][topk_ids]  # [T, K]
    replica = (token_key.unsqueeze(1) + torch.arange(topk_ids.shape[1], device=topk_ids.device)) % counts
    return placement.log2phy[layer][topk_ids, replica]


def map_random(placement: ExpertPlacement, layer: int, topk_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Logical -> physical ids, each (token, k) pair choosing one of its expert's replicas at random.

    topk_ids: `[T, K]` int64 logical ids on the placement's device; generator on that device.
    Returns `[T, K]` int64 physical slot ids.
    """
    counts = placement.logcnt[layer][topk_ids]
    draw = torch.randint(0, 1 << 30, topk_ids.shape, generator=generator, device=topk_ids.device)
    return placement.log2phy[layer][topk_ids, draw % counts]
