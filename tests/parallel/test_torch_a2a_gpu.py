"""The `torch` dispatcher over NCCL, launched by torchrun on every GPU of the machine (2 or more), against
`LocalDispatcher` on the same global problem (the cases of `test_torch_a2a.py`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _parallel_ranks import REPO, WORKER, worker_env

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")
def test_torchrun_nccl_matches_local_dispatcher():
    world = torch.cuda.device_count()
    env = worker_env()
    # GPU.md: never create NVLink multicast objects on the shared machines.
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--standalone",
           str(WORKER), "dispatch-env", "cuda"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    output = f"exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-6000:]}"
    assert proc.returncode == 0, output
    assert all(f"rank {r} ok" in proc.stdout for r in range(world)), output
