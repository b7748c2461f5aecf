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
from eplb.manager import EplbConfig, EplbManager, initial_placement
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
                dispatcher.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.state is not None:
            destroy_parallel(self.state)


def check_step_token_limits(config: ParallelConfig, max_running: int, max_prefill: int) -> None:
    """DeepEP's low-latency kernels take at most `--deepep-max-dispatch-tokens-per-rank` tokens per rank. A step over
    it fails on that rank alone while the others wait, so the limits are checked here, on every rank, at start."""
    if config.a2a_backend != "deepep" or config.deepep_mode == "normal":
        return
    limit = config.deepep_max_dispatch_tokens_per_rank
    if max_running > limit:
        raise WideepError(f"--max-running-requests {max_running} exceeds --deepep-max-dispatch-tokens-per-rank "
                          f"{limit}: a decode step would send more tokens than DeepEP's low-latency buffers hold; "
                          "raise the DeepEP limit or lower --max-running-requests")
    if config.deepep_mode == "low_latency" and max_prefill > limit:
        raise WideepError(f"--deepep-mode low_latency runs prefill steps through the low-latency kernels too: "
                          f"--max-prefill-tokens {max_prefill} exceeds --deepep-max-dispatch-tokens-per-rank "
                          f"{limit}; lower --max-prefill-tokens or use --deepep-mode auto")


def build_parallel_model(args: argparse.Namespace, source: ModelSource, par: EngineParallel,
                         dtype: torch.dtype) -> tuple[DeepseekV3, EplbManager]:
    """This rank's model (its share of the expert slots under the initial placement, the dispatcher of
    `--moe-a2a-backend`) and the EPLB manager that records its load and rebalances it."""
    cfg = source.cfg
    check_step_token_limits(par.config, args.max_running_requests, args.max_prefill_tokens)
    eplb = EplbConfig.from_args(args)
    slots_per_rank(cfg.n_routed_experts, eplb.num_redundant, par.world_size)
    nnodes = par.state.nnodes if par.state else 1
    placement = initial_placement(eplb, cfg, par.world_size, nnodes)
    model = build_model(source, load_format=args.load_format, device=par.device, dtype=dtype, placement=placement,
                        ep_rank=par.rank, ep_size=par.world_size, dispatcher=par.dispatcher(cfg, placement, dtype),
                        seed=args.seed, progress=par.is_main, attention_backend=args.attention_backend,
                        dispatch_algorithm=eplb.dispatch_algorithm,
                        fp8_weights={"auto": None, "on": True, "off": False}[args.fp8_weights],
                        # The static runner's batches hold one token per page; the continuous runtime's, --page-size.
                        page_size=args.page_size if args.runtime == "continuous" else 1)
    group = par.state.group if par.state else None
    return model, EplbManager(model, eplb, rank=par.rank, world=par.world_size, nnodes=nnodes, group=group)
