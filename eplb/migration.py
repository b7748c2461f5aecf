"""Online weight migration: moving expert weights between ranks when the placement changes.

`plan_moves` is pure: from one MoE layer's old and new `phy2log` it lists, in one global order every rank computes
alike, which slot's weights go where. `migrate_layer` carries the moves out point-to-point (a rank that already
holds the expert copies locally), receiving into a staging buffer that holds only this rank's changed slots of
this one layer, and writing them into place once every send of the layer is done, so no slot is overwritten
while another rank still reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Move:
    """Copy the weights of physical slot `src` (on `src_rank`) into physical slot `dst` (on `dst_rank`)."""

    src: int
    dst: int
    src_rank: int
    dst_rank: int


def plan_moves(old: torch.Tensor, new: torch.Tensor, slots_per_rank: int) -> list[Move]:
    """old, new: `[P]` int64 logical expert of each physical slot, before and after.

    A slot whose expert changes receives it from a slot that holds it now: one on its own rank if there is one
    (no transfer), else the holders in turn, so the copies of a hot expert are read from all of its replicas.
    Returns the moves in destination-slot order.
    """
    old_l, new_l = old.tolist(), new.tolist()
    holders: dict[int, list[int]] = {}
    for p, e in enumerate(old_l):
        holders.setdefault(e, []).append(p)
    moves = []
    served: dict[int, int] = {}
    for p, e in enumerate(new_l):
        if old_l[p] == e:
            continue
        if e not in holders:
            raise ValueError(f"expert {e} has no slot in the old placement; nothing to copy it from")
        rank = p // slots_per_rank
        local = [h for h in holders[e] if h // slots_per_rank == rank]
        if local:
            src = local[0]
        else:
            turn = served.get(e, 0)
            src = holders[e][turn % len(holders[e])]
            served[e] = turn + 1
        moves.append(Move(src, p, src // slots_per_rank, rank))
    return moves


def migrate_layer(
    tensors: list[torch.Tensor], moves: list[Move], rank: int, slots_per_rank: int,
    group: dist.ProcessGroup | None = None,
) -> int:
    """Applies `moves` to this rank's slots of one layer, in place.

    tensors: this rank's expert weights of the layer, each `[slots_per_rank, ...]` contiguous (w13, w2, and fp8
    scales where kept). Every rank calls this with the same `moves`. Returns the bytes this rank received.
    """
    base = rank * slots_per_rank
    incoming = [m for m in moves if m.dst_rank == rank]
    staging = [t.new_empty((len(incoming),) + t.shape[1:]) for t in tensors]
    ops: list[dist.P2POp] = []
    received = 0
    # Every rank walks the same global list, so the sends from A to B and the receives at B from A are posted
    # in the same order: NCCL and gloo both match point-to-point messages between a pair in order.
    for m in moves:
        if m.dst_rank == rank and m.src_rank == rank:
            i = incoming.index(m)
            for t, s in zip(tensors, staging):
                s[i].copy_(t[m.src - base])
        elif m.dst_rank == rank:
            i = incoming.index(m)
            for s in staging:
                ops.append(dist.P2POp(dist.irecv, s[i], m.src_rank, group))
                received += s[i].numel() * s[i].element_size()
        elif m.src_rank == rank:
            for t in tensors:
                ops.append(dist.P2POp(dist.isend, t[m.src - base], m.dst_rank, group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    # Sends read the old weights; all of them have completed (ours above, and the others' before our receives
    # completed), so overwriting now cannot corrupt a copy in flight.
    for i, m in enumerate(incoming):
        for t, s in zip(tensors, staging):
            t[m.dst - base].copy_(s[i])
    return received
