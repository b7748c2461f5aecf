"""Start the ranks of a multi-process test as subprocesses of `_parallel_worker.py` and collect what they said."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from parallel.launch import free_port

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_parallel_worker.py")


@dataclass
class RankResult:
    rank: int
    returncode: int | None
    stdout: str
    stderr: str
    ended_at: float  # time.time() when the parent saw it exit


def worker_env() -> dict[str, str]:
    """The parent's environment without any launcher variables, plus the repository on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "PMIX_", "TORCHELASTIC"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_ranks(
    args_for_rank, world: int, timeout_s: float, *, wait_for: Collection[int] | None = None
) -> list[RankResult]:
    """Run `_parallel_worker.py <args_for_rank(rank, port)...>` for every rank; wait up to `timeout_s` in all.

    wait_for: the ranks to wait for (default all); the rest are killed once these exit (ranks meant to hang).
    A rank killed here, at that point or at the deadline, is reported with returncode None.
    """
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *map(str, args_for_rank(rank, port))], cwd=REPO, env=worker_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(world)
    ]
    ended: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    waited = set(range(world) if wait_for is None else wait_for)
    while not waited <= ended.keys() and time.monotonic() < deadline:
        for rank, proc in enumerate(procs):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = time.time()
        time.sleep(0.05)
    results = []
    for rank, proc in enumerate(procs):
        if rank not in ended:
            proc.kill()
        out, err = proc.communicate()
        code = proc.returncode if rank in ended else None
        results.append(RankResult(rank, code, out, err, ended.get(rank, time.time())))
    return results


def describe(results: list[RankResult]) -> str:
    """Every rank's exit code and output, for assertion messages."""
    return "\n".join(
        f"--- rank {r.rank} exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}"
        for r in results
    )
