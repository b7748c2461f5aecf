"""The entry points' view of the parallel job: who we are, which device, which dispatcher, how steps agree.

Built once at an entry point from the parsed flags; everything below receives its parts explicitly.
One process with the local dispatcher creates no process group at all.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch

import parallel.deepep  # noqa: F401 - registers the "deepep" dispatcher (DeepEP itself is imported only when used)
from engine.build import ModelSource, build_model, pick_device
from engine.config import ModelConfig
from engine.errors import WideepError
from engine.model import DeepseekV3
from eplb.placement import ExpertPlacement
from parallel.config import ParallelConfig
from parallel.dispatcher import Dispatcher, make_dispatcher
from parallel.state import ParallelState, destroy_parallel, slots_per_rank, start_parallel
from parallel.step_sync import DistributedStepSync, LocalStepSync, StepSync
from parallel.watchdog import Watchdog


@dataclass
class EngineParallel:
    config: ParallelConfig
    device: torch.device
    sync: StepSync
    state: ParallelState | None = None
    watchdog: Watchdog | None = None
    dispatchers: list[Dispatcher] = field(default_factory=list)  # built here, closed in `close`

    @property
    def rank(self) -> int:
        return self.state.rank if self.state else 0

    @property
    def world_size(self) -> int:
        return self.state.world_size if self.state else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, args: argparse.Namespace) -> "EngineParallel":
        """From the flags of `add_parallel_args` and `--device`: a process group only when there are several
        ranks or a communicating dispatcher was asked for."""
        config = ParallelConfig.from_args(args)
        if config.a2a_backend == "local":
            return cls(config, pick_device(args.device), LocalStepSync())
        if args.device not in ("auto", "cpu", "cuda"):
            raise WideepError(f"--device {args.device}: with several ranks use auto, cpu or cuda (one GPU per rank)")
        state, watchdog = start_parallel(config, device_kind=args.device)
        return cls(config, state.device, DistributedStepSync(state, watchdog), state, watchdog)

    def dispatcher(self, cfg: ModelConfig, placement: ExpertPlacement, dtype: torch.dtype) -> Dispatcher:
        slots = placement.slots_per_rank(self.world_size)
        c = self.config
        dispatcher = make_dispatcher(c.a2a_backend, state=self.state, num_local_slots=slots,
                                     hidden_size=cfg.hidden_size, dtype=dtype, deepep_mode=c.deepep_mode,
                                     max_dispatch_tokens_per_rank=c.deepep_max_dispatch_tokens_per_rank,
                                     fp8_dispatch=c.deepep_fp8_dispatch)
        self.dispatchers.append(dispatcher)
        return dispatcher

    def close(self) -> None:
        # DeepEP frees its buffers with a barrier across ranks. While an error unwinds, the other ranks may never
        # reach that barrier, so then the buffers are left to the process's exit.
        if sys.exc_info()[0] is None:
            for dispatcher in self.dispatchers:
                getattr(dispatcher, "close", lambda: None)()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.state is not None:
            destroy_parallel(self.state)


def build_parallel_model(args: argparse.Namespace, source: ModelSource, par: EngineParallel,
                         dtype: torch.dtype) -> DeepseekV3:
    """This rank's model: its share of the expert slots (trivial placement plus `--ep-num-redundant-experts`) and
    the dispatcher of `--moe-a2a-backend`."""
    cfg = source.cfg
    placement = ExpertPlacement.trivial(len(cfg.moe_layers), cfg.n_routed_experts,
                                        cfg.n_routed_experts + args.ep_num_redundant_experts)
    slots_per_rank(cfg.n_routed_experts, args.ep_num_redundant_experts, par.world_size)
    return build_model(source, load_format=args.load_format, device=par.device, dtype=dtype, placement=placement,
                       ep_rank=par.rank, ep_size=par.world_size, dispatcher=par.dispatcher(cfg, placement, dtype),
                       seed=args.seed, progress=par.is_main, attention_backend=args.attention_backend)
