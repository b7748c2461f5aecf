"""Where this process sits in the job, read from whoever launched it: torchrun, Slurm, MPI or explicit flags.

`detect_launch_env` is a function of the environment mapping and the flags only (MPI facts come through an
injectable query), so every launcher can be unit-tested with a fake `environ`. No process group is made here;
`parallel.state.init_parallel` turns the `LaunchEnv` into one.

Which launcher, in this order (first match wins):
1. torchrun (or anything that follows its contract): `TORCHELASTIC_RUN_ID`, or `RANK` + `WORLD_SIZE` + `LOCAL_RANK`;
   rendezvous at `MASTER_ADDR:MASTER_PORT`.
2. Open MPI's mpirun (`OMPI_COMM_WORLD_RANK`): rank, size and local rank from mpi4py, rendezvous chosen on rank 0 and
   broadcast over MPI. Checked before Slurm because mpirun inside an allocation inherits the batch step's `SLURM_*`.
3. Slurm's srun (`SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS`, ...), unless a PMI rank disagrees with
   `SLURM_PROCID` (then another launcher started us inside the allocation); rendezvous on the first host of the step's
   node list.
4. Other MPI launchers (`PMI_RANK`, `PMIX_RANK`, `MV2_COMM_WORLD_RANK`), as 2.
5. Flags only: `--nnodes N --node-rank R --dist-init-addr host:port`, one process per node (world = nnodes).
6. Nothing: one process, world 1.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from engine.errors import WideepError
from parallel.hostlist import expand_hostlist, expand_tasks_per_node

LaunchSource = Literal["single", "flags", "torchrun", "slurm", "mpi"]

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job before any process group exists.

    master_addr/master_port: the TCP rendezvous, hosted by rank 0's process (or torchrun's agent). Port 0 only for a
    one-process world, which needs no rendezvous.
    """

    source: LaunchSource
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        where = f"from {self.source}"
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise WideepError(f"rank {self.rank} of world size {self.world_size} {where} is not a valid rank")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise WideepError(f"local rank {self.local_rank} of {self.local_world_size} {where} is not valid")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise WideepError(f"node rank {self.node_rank} of {self.nnodes} nodes {where} is not valid (--node-rank)")
        if not 0 < self.master_port < 65536 and not (self.world_size == 1 and self.master_port == 0):
            raise WideepError(f"rendezvous port {self.master_port} {where} is not a TCP port (1-65535)")

    @property
    def init_method(self) -> str:
        """`tcp://host:port` for `torch.distributed.init_process_group` (brackets around an IPv6 host)."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


@dataclass(frozen=True)
class MpiWorld:
    """What MPI says about this process: `COMM_WORLD` rank/size, the node-local split, and the agreed rendezvous."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int


MpiQuery = Callable[[str | None, Mapping[str, str]], MpiWorld]


def parse_dist_init_addr(text: str) -> tuple[str, int]:
    """`"10.0.0.1:29500"` or `"[fe80::1]:29500"` -> (host, port); a clear error naming `--dist-init-addr` otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WideepError(f"--dist-init-addr {text!r} is not host:port (e.g. 10.0.0.1:29500)")
    return host, int(port)


def detect_launch_env(
    environ: Mapping[str, str],
    *,
    nnodes: int | None = None,
    node_rank: int | None = None,
    dist_init_addr: str | None = None,
    mpi: MpiQuery | None = None,
) -> LaunchEnv:
    """Read this process's place in the job from `environ` and the `--nnodes/--node-rank/--dist-init-addr` flags.

    mpi: how to ask MPI (default `query_mpi`, which is collective over `COMM_WORLD`); tests pass a fake.
    Flags given alongside a launcher must agree with it; a disagreement is an error naming the flag.
    """
    if "TORCHELASTIC_RUN_ID" in environ or all(k in environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        env = _from_torchrun(environ, dist_init_addr)
    elif "OMPI_COMM_WORLD_RANK" in environ:
        env = _from_mpi(environ, dist_init_addr, mpi or query_mpi)
    elif "SLURM_PROCID" in environ and _pmi_agrees_with_slurm(environ):
        env = _from_slurm(environ, dist_init_addr)
    elif any(k in environ for k in _MPI_RANK_VARS):
        env = _from_mpi(environ, dist_init_addr, mpi or query_mpi)
    else:
        return _from_flags(nnodes, node_rank, dist_init_addr)
    if nnodes is not None and nnodes != env.nnodes:
        raise WideepError(f"--nnodes {nnodes} disagrees with {env.source}, which launched {env.nnodes} node(s)")
    if node_rank is not None and node_rank != env.node_rank:
        raise WideepError(f"--node-rank {node_rank} disagrees with {env.source}, which says node {env.node_rank}")
    return env


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ.get(key, "")
    if not value.strip().lstrip("-").isdigit():
        raise WideepError(f"environment variable {key}={value!r} should be an integer (set by the launcher)")
    return int(value)


def _from_torchrun(environ: Mapping[str, str], dist_init_addr: str | None) -> LaunchEnv:
    if dist_init_addr is not None:
        raise WideepError(
            "--dist-init-addr is for launches without torchrun; torchrun sets MASTER_ADDR/MASTER_PORT itself: "
            "drop the flag and give the address to torchrun (--master-addr/--master-port or --rdzv-endpoint)"
        )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in environ:
            raise WideepError(f"torchrun-style launch without {key} in the environment; start the run with torchrun")
    rank, world, local_rank = _int(environ, "RANK"), _int(environ, "WORLD_SIZE"), _int(environ, "LOCAL_RANK")
    local_world = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    # GROUP_RANK / GROUP_WORLD_SIZE are torchrun's node index and node count; derive them for hand-made envs.
    node = _int(environ, "GROUP_RANK") if "GROUP_RANK" in environ else rank // local_world
    nodes = _int(environ, "GROUP_WORLD_SIZE") if "GROUP_WORLD_SIZE" in environ else max(1, world // local_world)
    return LaunchEnv(
        "torchrun", rank, world, local_rank, local_world, node, nodes, environ["MASTER_ADDR"],
        _int(environ, "MASTER_PORT"),
    )


def _pmi_agrees_with_slurm(environ: Mapping[str, str]) -> bool:
    """srun --mpi=pmi2/pmix sets a PMI rank equal to SLURM_PROCID; a different one means mpirun/hydra started us."""
    pmi = next((environ[k] for k in ("PMIX_RANK", "PMI_RANK") if k in environ), None)
    return pmi is None or pmi == environ["SLURM_PROCID"]


def _from_slurm(environ: Mapping[str, str], dist_init_addr: str | None) -> LaunchEnv:
    # The STEP_ variables describe this srun step; the plain ones the whole allocation, which can be larger.
    def first(*keys: str) -> str:
        key = next((k for k in keys if k in environ), None)
        if key is None:
            raise WideepError(f"Slurm launch (SLURM_PROCID is set) without {keys[-1]}; start the tasks with srun")
        return key

    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, first("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"))
    local_rank = _int(environ, first("SLURM_LOCALID"))
    nodes = _int(environ, first("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"))
    node = _int(environ, first("SLURM_NODEID"))
    tasks_key = next((k for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if k in environ), None)
    if tasks_key is not None:
        per_node = expand_tasks_per_node(environ[tasks_key], source=tasks_key)
        local_world = per_node[node] if node < len(per_node) else per_node[-1]
    else:
        local_world = max(1, world // nodes)

    if dist_init_addr is not None:
        addr, port = parse_dist_init_addr(dist_init_addr)
    else:
        list_key = first("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        addr = environ.get("MASTER_ADDR") or expand_hostlist(environ[list_key], source=list_key)[0]
        # A port derived from the job id keeps two jobs that share a first node apart without coordination.
        job = int(environ.get("SLURM_JOB_ID", "0") or 0)
        port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 10000 + job % 50000
    return LaunchEnv("slurm", rank, world, local_rank, local_world, node, nodes, addr, port)


def _from_mpi(environ: Mapping[str, str], dist_init_addr: str | None, mpi: MpiQuery) -> LaunchEnv:
    w = mpi(dist_init_addr, environ)
    return LaunchEnv(
        "mpi", w.rank, w.size, w.local_rank, w.local_size, w.node_rank, w.nnodes, w.master_addr, w.master_port
    )


def _from_flags(nnodes: int | None, node_rank: int | None, dist_init_addr: str | None) -> LaunchEnv:
    nodes = 1 if nnodes is None else nnodes
    if nodes < 1:
        raise WideepError(f"--nnodes {nnodes} must be at least 1")
    if nodes == 1 and dist_init_addr is None:
        if node_rank not in (None, 0):
            raise WideepError(f"--node-rank {node_rank} needs --nnodes larger than {node_rank}")
        return LaunchEnv("single", 0, 1, 0, 1, 0, 1, "127.0.0.1", 0)
    if node_rank is None:
        raise WideepError(f"--nnodes {nodes} needs --node-rank (0 to {nodes - 1}) on every node")
    if not 0 <= node_rank < nodes:
        raise WideepError(f"--node-rank {node_rank} must be from 0 to {nodes - 1} (--nnodes {nodes})")
    if dist_init_addr is None:
        raise WideepError(f"--nnodes {nodes} needs --dist-init-addr host:port of node 0, the same on every node")
    addr, port = parse_dist_init_addr(dist_init_addr)
    # Without a process launcher every node runs one process, so the node rank is the rank.
    return LaunchEnv("flags", node_rank, nodes, 0, 1, node_rank, nodes, addr, port)


def query_mpi(dist_init_addr: str | None, environ: Mapping[str, str]) -> MpiWorld:
    """Ask MPI through mpi4py; collective over `COMM_WORLD` (every rank must call it).

    Local rank and size come from a shared-memory split (`COMM_TYPE_SHARED`), node rank and count from a split of
    the node leaders. Rank 0 picks the rendezvous: `--dist-init-addr`, else `MASTER_ADDR`/`MASTER_PORT`, else its own
    host name and a free port; the choice is broadcast so every rank uses the same one.
    """
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise WideepError(
            "started by an MPI launcher but mpi4py is not installed; `pip install mpi4py` (or wideep[mpi]), "
            "or launch with torchrun or srun instead"
        ) from err
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    is_leader = local.Get_rank() == 0
    leaders = comm.Split(0 if is_leader else MPI.UNDEFINED, key=comm.Get_rank())
    node = local.bcast((leaders.Get_rank(), leaders.Get_size()) if is_leader else None, root=0)
    if is_leader:
        leaders.Free()
    rendezvous = None
    if comm.Get_rank() == 0:
        if dist_init_addr is not None:
            rendezvous = parse_dist_init_addr(dist_init_addr)
        else:
            addr = environ.get("MASTER_ADDR") or socket.gethostname()
            rendezvous = (addr, int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else free_port())
    addr, port = comm.bcast(rendezvous, root=0)
    world = MpiWorld(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), node[0], node[1], addr, port)
    local.Free()
    return world


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS's choice); rank 0's store binds it right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
