"""The one validated description of this rank's place in the parallel job, and the code that sets it up once.

`ParallelState` is built once at the entry point (`start_parallel` or `init_parallel`) and passed explicitly to
whatever needs a rank, a device or the expert-parallel group; there are no module-level process groups. The only
global is torch's default process group, created here once: a second `init_parallel` in the same process fails loudly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

import parallel.torch_a2a  # noqa: F401 - registers the "torch" dispatcher wherever a parallel state is built
from engine.errors import WideepError
from parallel.config import ParallelConfig
from parallel.launch import LaunchEnv, LaunchSource, detect_launch_env
from parallel.watchdog import Watchdog

DeviceKind = Literal["auto", "cuda", "cpu"]


@dataclass(frozen=True)
class ParallelState:
    """This rank in the job.

    rank/world_size: global; local_rank/local_world_size: on this node; node_rank/nnodes: the node.
    master_addr/master_port: the rendezvous store (the watchdog's heartbeats go there too).
    device: `cuda:<gpu>` (one GPU per rank) or `cpu`. backend: "nccl" or "gloo", the backend of `device`'s tensors.
    ep_size: ranks sharing the routed experts; equal to world_size for now, so `ep_rank == rank`.
    group: the expert-parallel process group (dispatchers pass it to every collective); not compared or printed.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int
    device: torch.device
    backend: str
    ep_size: int
    source: LaunchSource = "single"
    group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise WideepError(f"rank {self.rank} is outside a world of {self.world_size}")
        if self.ep_size != self.world_size:
            raise WideepError(_ep_size_message(self.ep_size, self.world_size, self.source))

    @property
    def ep_rank(self) -> int:
        """This rank's index in the expert-parallel group (its slots are `[ep_rank * S, (ep_rank + 1) * S)`)."""
        return self.rank

    @property
    def is_main(self) -> bool:
        """Rank 0 writes stdout, result files and progress bars."""
        return self.rank == 0

    def num_local_slots(self, num_experts: int, num_redundant: int = 0) -> int:
        """Expert slots held by each rank of this EP group; see `slots_per_rank`."""
        return slots_per_rank(num_experts, num_redundant, self.ep_size)


def slots_per_rank(num_experts: int, num_redundant: int, world: int) -> int:
    """(routed experts + redundant slots) / EP ranks, or an error saying which flag makes it divide."""
    if num_experts < 1 or num_redundant < 0 or world < 1:
        raise WideepError(
            f"cannot place {num_experts} experts + {num_redundant} redundant slots on {world} ranks: "
            "need at least one expert, no negative --ep-num-redundant-experts and at least one rank"
        )
    total = num_experts + num_redundant
    if total % world:
        fix = (-total) % world
        raise WideepError(
            f"{num_experts} routed experts + {num_redundant} redundant (--ep-num-redundant-experts) = {total} slots "
            f"do not split evenly over {world} ranks (--ep-size {world}); raise --ep-num-redundant-experts to "
            f"{num_redundant + fix} or pick an --ep-size that divides {total}"
        )
    return total // world


def init_parallel(
    env: LaunchEnv, *, ep_size: int, timeout_s: float, device_kind: DeviceKind = "auto"
) -> ParallelState:
    """Create the default process group for `env` and return this rank's `ParallelState`.

    One GPU per rank (`cuda:local_rank`, NCCL for CUDA tensors and gloo for CPU ones) when CUDA is there or
    `device_kind="cuda"`; gloo on CPU otherwise. `timeout_s` (`--dist-timeout`) bounds the rendezvous and every
    collective. Raises RuntimeError when a process group already exists in this process.
    """
    if dist.is_initialized():
        raise RuntimeError(
            "init_parallel called twice in one process: the default process group already exists. Build the "
            "ParallelState once at the entry point and pass it down (destroy_parallel ends the old one)."
        )
    if ep_size != env.world_size:
        raise WideepError(_ep_size_message(ep_size, env.world_size, env.source))
    if timeout_s <= 0:
        raise WideepError(f"--dist-timeout {timeout_s} must be a positive number of seconds")
    device = _pick_device(device_kind, env.local_rank, env.local_world_size)
    timeout = timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # With NCCL, CPU tensors still get gloo so small control messages (agreeing on a step's mode) need no GPU copy.
    pg_backend = "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        if env.world_size == 1:
            # Nobody to meet: an in-process store, no port to pick or collide on.
            dist.init_process_group(pg_backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                    **kwargs)
        else:
            dist.init_process_group(pg_backend, init_method=env.init_method, rank=env.rank,
                                    world_size=env.world_size, timeout=timeout, **kwargs)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WideepError(
            f"rank {env.rank}: rendezvous with {env.world_size} ranks at {env.master_addr}:{env.master_port} "
            f"(from {env.source}) failed within --dist-timeout {timeout_s:g} s: {first}; check that every rank was "
            f"started and can reach {env.master_addr}:{env.master_port} (firewall, GLOO_SOCKET_IFNAME)"
        ) from err
    return ParallelState(
        rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, local_world_size=env.local_world_size,
        node_rank=env.node_rank, nnodes=env.nnodes, master_addr=env.master_addr, master_port=env.master_port,
        device=device, backend=backend, ep_size=ep_size, source=env.source, group=dist.group.WORLD,
    )


def destroy_parallel(state: ParallelState) -> None:
    """End the default process group (after `Watchdog.stop`); `init_parallel` may then run again."""
    if dist.is_initialized():
        dist.destroy_process_group()


def start_parallel(
    config: ParallelConfig, environ: Mapping[str, str] | None = None, *, device_kind: DeviceKind = "auto"
) -> tuple[ParallelState, Watchdog]:
    """Entry-point helper: detect the launcher, create the process group and start the watchdog.

    environ: defaults to `os.environ`. Returns the state and the running watchdog; stop the watchdog, then
    `destroy_parallel`, at the end.
    """
    env = detect_launch_env(
        os.environ if environ is None else environ,
        nnodes=config.nnodes, node_rank=config.node_rank, dist_init_addr=config.dist_init_addr,
    )
    state = init_parallel(env, ep_size=config.ep_size, timeout_s=config.dist_timeout, device_kind=device_kind)
    return state, Watchdog(state, config.dist_timeout).start()


def _pick_device(kind: DeviceKind, local_rank: int, local_world_size: int) -> torch.device:
    if kind not in ("auto", "cuda", "cpu"):
        raise WideepError(f"device {kind!r} is not one of auto, cuda, cpu")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise WideepError("a CUDA device was asked for but torch sees none; run on a GPU node or use the CPU")
    count = torch.cuda.device_count()
    if count >= local_world_size:
        return torch.device("cuda", local_rank)
    if count == 1:
        # The launcher gave each task its own GPU (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES per rank).
        return torch.device("cuda", 0)
    raise WideepError(
        f"{local_world_size} ranks on this node but only {count} visible GPUs; launch one rank per GPU "
        "(--nproc-per-node / --ntasks-per-node) or fix CUDA_VISIBLE_DEVICES"
    )


def _ep_size_message(ep_size: int, world: int, source: str) -> str:
    return (
        f"--ep-size {ep_size} must equal the number of ranks launched ({world}, from {source}): experts are "
        f"spread over every rank; pass --ep-size {world} or launch {ep_size} ranks"
    )
