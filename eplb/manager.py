"""EPLB in the running engine: the initial placement, load recording, and periodic rebalancing with migration.

Deciding *where* experts go is `eplb.algorithm` (pure); *moving* weights is `eplb.migration`; this module decides
*when*: every `rebalance_every` steps, at a step boundary that every rank reaches together, so no request is
in flight inside a layer while its weights move.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import ModelConfig
from engine.errors import WideepError
from eplb.algorithm import balancedness, rebalance, resolve_algorithm
from eplb.migration import migrate_layer, plan_moves
from eplb.placement import ExpertPlacement
from eplb.placement_file import is_placement, read_placement
from eplb.recorder import MODES, ExpertLoadRecorder
from eplb.stats import read_expert_load, read_json, save_dump, sniff
from eplb.sticky import keep_in_place

log = logging.getLogger("wideep")
DISPATCH_ALGORITHMS = ("static", "random")


def add_eplb_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("expert placement (EPLB)")
    g.add_argument("--ep-num-redundant-experts", type=int, default=0,
                   help="extra expert slots holding replicas (experts + this must divide by --ep-size)")
    g.add_argument("--init-expert-location", default="trivial",
                   help="trivial, a placement.json (python -m eplb plan), or expert-load statistics (our dump, "
                        "JSON, or an SGLang .pt dump) to plan the first placement from")
    g.add_argument("--ep-dispatch-algorithm", choices=DISPATCH_ALGORITHMS, default="static",
                   help="which replica of a replicated expert a token uses: static (by position) or random (seeded)")
    g.add_argument("--enable-eplb", action="store_true", help="rebalance the placement while the engine runs")
    g.add_argument("--eplb-rebalance-num-iterations", type=int, default=1000,
                   help="steps between rebalances (with --enable-eplb)")
    g.add_argument("--eplb-algorithm", choices=["auto", "hierarchical", "global"], default="auto")
    g.add_argument("--expert-distribution-recorder-mode", choices=MODES, default="stat")
    g.add_argument("--expert-distribution-recorder-window", type=int, default=None,
                   help="steps of load kept for rebalancing and dumps (default: --eplb-rebalance-num-iterations)")
    g.add_argument("--expert-distribution-dump", default=None, metavar="FILE",
                   help="record expert load and write it here at the end (safetensors; python -m eplb reads it)")


@dataclass(frozen=True)
class EplbConfig:
    num_redundant: int = 0
    init_location: str = "trivial"
    dispatch_algorithm: str = "static"
    enable: bool = False
    rebalance_every: int = 1000
    algorithm: str = "auto"
    recorder_mode: str = "stat"
    window: int | None = None
    dump_path: str | None = None

    def __post_init__(self) -> None:
        if self.num_redundant < 0:
            raise WideepError(f"--ep-num-redundant-experts {self.num_redundant} must be >= 0")
        if self.rebalance_every < 1:
            raise WideepError(f"--eplb-rebalance-num-iterations {self.rebalance_every} must be >= 1")
        if self.window is not None and self.window < 1:
            raise WideepError(f"--expert-distribution-recorder-window {self.window} must be >= 1")
        if self.dump_path and not Path(self.dump_path).resolve().parent.is_dir():
            raise WideepError(f"--expert-distribution-dump {self.dump_path}: its folder does not exist")

    @property
    def records(self) -> bool:
        return self.enable or self.dump_path is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EplbConfig":
        return cls(args.ep_num_redundant_experts, args.init_expert_location, args.ep_dispatch_algorithm,
                   args.enable_eplb, args.eplb_rebalance_num_iterations, args.eplb_algorithm,
                   args.expert_distribution_recorder_mode, args.expert_distribution_recorder_window,
                   args.expert_distribution_dump)


def initial_placement(config: EplbConfig, cfg: ModelConfig, world: int, nnodes: int) -> ExpertPlacement:
    """The placement the engine starts with (`--init-expert-location`)."""
    layers, experts = len(cfg.moe_layers), cfg.n_routed_experts
    slots = experts + config.num_redundant
    if config.init_location == "trivial":
        placement = ExpertPlacement.trivial(layers, experts, slots)
    else:
        path = config.init_location
        if not Path(path).is_file():
            raise WideepError(f"--init-expert-location {path}: no such file; give trivial, a placement.json or "
                              "an expert-load dump")
        if sniff(path) == "json" and is_placement(read_json(path)):
            placement = read_placement(path).placement
        else:
            load = read_expert_load(path).load
            if tuple(load.shape) != (layers, experts):
                raise WideepError(f"--init-expert-location {path}: load of {tuple(load.shape)} [layers, experts] "
                                  f"does not fit this model's {layers} MoE layers x {experts} experts")
            placement = rebalance(load, slots, cfg.n_group, nnodes, world, config.algorithm)
    if (placement.num_layers, placement.num_experts, placement.num_slots) != (layers, experts, slots):
        raise WideepError(
            f"--init-expert-location {config.init_location}: a placement of {placement.num_layers} layers x "
            f"{placement.num_experts} experts in {placement.num_slots} slots does not fit this model ({layers} MoE "
            f"layers, {experts} experts, {slots} slots with --ep-num-redundant-experts {config.num_redundant})"
        )
    placement.slots_per_rank(world)
    return placement


@dataclass
class RebalanceReport:
    step: int
    seconds: float
    bytes_received: int
    balancedness_before: float  # mean over layers, of the old placement on the window's load
    balancedness_after: float
    per_layer_seconds: list[float] = field(default_factory=list)
    slots_moved: int = 0  # slots, over all layers and ranks, whose expert changed


class EplbManager:
    """Records load on every MoE layer of `model` and, with `config.enable`, rebalances every N steps.

    group: the EP process group (None on one process); rank/world: this rank in it; nnodes: nodes of the job.
    """

    def __init__(self, model, config: EplbConfig, *, rank: int = 0, world: int = 1, nnodes: int = 1,
                 group: dist.ProcessGroup | None = None) -> None:
        self.model = model
        self.config = config
        self.rank, self.world, self.nnodes, self.group = rank, world, nnodes, group
        self.reports: list[RebalanceReport] = []
        cfg = model.cfg
        window = config.window or config.rebalance_every
        self.recorder = ExpertLoadRecorder(len(cfg.moe_layers), cfg.n_routed_experts, window, config.recorder_mode,
                                           model.device)
        if config.records:
            for layer in model.moe_layers():
                layer.recorder = self.recorder

    def on_step_end(self, step: int) -> None:
        """Called by the runner on every rank after every step (idle steps too), with the job-wide step index."""
        if not self.config.records:
            return
        self.recorder.end_step()
        if self.config.enable and (step + 1) % self.config.rebalance_every == 0:
            self.rebalance(step)

    def global_load(self) -> torch.Tensor:
        """`[L, E]` int64 load of the window summed over all ranks (a collective: every rank calls it)."""
        load = self.recorder.window_load()
        if self.group is not None and self.world > 1:
            dist.all_reduce(load, group=self.group)
        return load.cpu()

    def rebalance(self, step: int) -> RebalanceReport:
        """Plans a placement from the window's load (summed over ranks), relabels it so that slots keep the
        experts they hold where the balance allows (`eplb.sticky`), and moves the experts to it."""
        load = self.global_load().double()
        cfg, old = self.model.cfg, self.model.placement
        new = rebalance(load, old.num_slots, cfg.n_group, self.nnodes, self.world, self.config.algorithm)
        # The global policy ignores nodes, so any GPU may take any planned set; hierarchical keeps node blocks.
        global_policy = resolve_algorithm(self.config.algorithm, cfg.n_group, self.nnodes) == "global"
        new = keep_in_place(new, old, self.world, 1 if global_policy else self.nnodes)
        return self.apply(new, load, step)

    def apply(self, new: ExpertPlacement, load: torch.Tensor, step: int = -1) -> RebalanceReport:
        """Moves expert weights layer by layer to `new` (every rank calls it with the same placement), then
        switches routing to it. load: `[L, E]`, for the balancedness in the report."""
        start = time.perf_counter()
        old = self.model.placement
        slots = old.slots_per_rank(self.world)
        received, moved, per_layer = 0, 0, []
        for i, layer in enumerate(self.model.moe_layers()):
            t0 = time.perf_counter()
            moves = plan_moves(old.phy2log[i], new.phy2log[i], slots)
            moved += len(moves)
            received += migrate_layer(layer.expert_tensors(), moves, self.rank, slots, self.group)
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
            per_layer.append(time.perf_counter() - t0)
        self.model.set_placement(new)
        report = RebalanceReport(step, time.perf_counter() - start, received,
                                 float(balancedness(load, old, self.world).mean()),
                                 float(balancedness(load, new, self.world).mean()), per_layer, moved)
        self.reports.append(report)
        log.info("EPLB rebalance at step %d: balancedness %.3f -> %.3f, %.2f s, %d of %d slots moved, %.1f MB "
                 "received on rank %d", step, report.balancedness_before, report.balancedness_after, report.seconds,
                 moved, old.phy2log.numel(), received / 1e6, self.rank)
        return report

    def dump(self) -> None:
        """Writes the recorded load (summed over ranks) to `--expert-distribution-dump` on rank 0."""
        if self.config.dump_path is None:
            return
        counts = self.recorder.logical_count().to(self.model.device)
        if self.group is not None and self.world > 1:
            dist.all_reduce(counts, group=self.group)
        if self.rank == 0:
            save_dump(self.config.dump_path, counts.cpu(), self.config.recorder_mode,
                      {"steps": self.recorder.steps, "num_gpus": self.world, "source": "engine"})
