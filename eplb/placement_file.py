"""`placement.json`: a planned expert placement, what it was planned from, and how well it balances.

Layout (version 1): `format` "wideep-placement", `version`, `num_layers`, `num_experts`, `num_slots`, `inputs`
(stats file, GPUs, nodes, groups, redundant experts, algorithm asked for and policy used, model dir),
`balancedness_before` / `balancedness_after` (per layer: trivial placement / this one), then `phy2log`
`[layers][slots]`, `log2phy` `[layers][experts][max replicas]` (-1 padded) and `logcnt` `[layers][experts]`.
Readers rebuild the maps from `phy2log` and check that the stored `log2phy` and `logcnt` agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import WideepError
from eplb.placement import ExpertPlacement
from eplb.stats import atomic_output, read_json

PLACEMENT_FORMAT = "wideep-placement"
PLACEMENT_VERSION = 1


@dataclass(frozen=True)
class PlacementFile:
    """A read `placement.json`. before/after: `[L]` float64 balancedness (empty if the file has none)."""

    placement: ExpertPlacement
    inputs: dict[str, Any]
    balancedness_before: torch.Tensor
    balancedness_after: torch.Tensor

    @property
    def num_gpus(self) -> int | None:
        return self.inputs.get("num_gpus")


def write_placement(
    path: str | Path, placement: ExpertPlacement, inputs: dict[str, Any], before: torch.Tensor, after: torch.Tensor
) -> None:
    """Writes `placement.json` atomically; before, after: `[L]` balancedness. One line per layer of each map."""
    head = {
        "format": PLACEMENT_FORMAT,
        "version": PLACEMENT_VERSION,
        "num_layers": placement.num_layers,
        "num_experts": placement.num_experts,
        "num_slots": placement.num_slots,
        "inputs": inputs,
        "balancedness_before": [round(float(b), 6) for b in before],
        "balancedness_after": [round(float(b), 6) for b in after],
    }
    parts = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
    for name in ("phy2log", "log2phy", "logcnt"):
        rows = ",\n".join(f"    {json.dumps(row)}" for row in getattr(placement, name).tolist())
        parts.append(f'  "{name}": [\n{rows}\n  ]')
    text = "{\n" + ",\n".join(parts) + "\n}\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def is_placement(raw: object) -> bool:
    return isinstance(raw, dict) and ("phy2log" in raw or raw.get("format") == PLACEMENT_FORMAT)


def read_placement(path: str | Path) -> PlacementFile:
    """Reads and checks `placement.json`: integer maps, every expert placed, maps consistent, slots per GPU equal."""
    return placement_from_json(read_json(path), str(path))


def placement_from_json(raw: object, source: str) -> PlacementFile:
    """Checks a parsed `placement.json` (see `read_placement`); source names the file in messages."""
    if not isinstance(raw, dict) or "phy2log" not in raw:
        raise WideepError(f"{source}: not a placement file (no 'phy2log'); write one with `python -m eplb plan`")
    if raw.get("version", PLACEMENT_VERSION) != PLACEMENT_VERSION:
        raise WideepError(f"{source}: placement version {raw.get('version')!r} is not supported; plan it again")
    phy2log = _int_matrix(raw["phy2log"], "phy2log", 2, source)
    experts = raw.get("num_experts", int(phy2log.max()) + 1)
    if not isinstance(experts, int) or experts < 1:
        raise WideepError(f"{source}: 'num_experts' must be a positive integer, found {experts!r}")
    try:
        placement = ExpertPlacement.from_phy2log(phy2log, experts)
    except WideepError as err:
        raise WideepError(f"{source}: {err}") from None
    if "logcnt" in raw and not torch.equal(_int_matrix(raw["logcnt"], "logcnt", 2, source), placement.logcnt):
        raise WideepError(f"{source}: 'logcnt' disagrees with 'phy2log'; plan the placement again")
    if "log2phy" in raw and not torch.equal(_int_matrix(raw["log2phy"], "log2phy", 3, source), placement.log2phy):
        raise WideepError(f"{source}: 'log2phy' disagrees with 'phy2log'; plan the placement again")
    inputs = raw.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise WideepError(f"{source}: 'inputs' must be an object")
    gpus = inputs.get("num_gpus")
    if gpus is not None:
        if not isinstance(gpus, int) or gpus < 1:
            raise WideepError(f"{source}: inputs.num_gpus must be a positive integer, found {gpus!r}")
        try:
            placement.slots_per_rank(gpus)
        except WideepError as err:
            raise WideepError(f"{source}: {err}") from None
    before = torch.tensor(raw.get("balancedness_before", []), dtype=torch.float64)
    after = torch.tensor(raw.get("balancedness_after", []), dtype=torch.float64)
    return PlacementFile(placement, inputs, before, after)


def _int_matrix(value: object, name: str, dims: int, source: str) -> torch.Tensor:
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):
        array = None
    if array is None or array.dtype.kind not in "iu" or array.ndim != dims or array.size == 0:
        raise WideepError(f"{source}: '{name}' must be a non-empty rectangular {dims}-D list of integers")
    return torch.from_numpy(array.astype(np.int64))
