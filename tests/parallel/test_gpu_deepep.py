"""The `deepep` dispatcher on real DeepEP kernels: one GPU per rank under torchrun, 2 and 4 ranks.

The checks of `_deepep_checks.py` (every mode, bf16 and FP8, against the torch backend and the direct weighted sum;
idle ranks, slots of -1, everything to one rank, the token limit). Needs `deep_ep` importable (built from DeepEP's
repository, tag v1.2.1: see the README's "DeepEP" section).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from _parallel_ranks import REPO, worker_env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("deep_ep") is None,
                       reason="needs deep_ep (DeepEP v1.2.1 built from source; see the README's DeepEP section)"),
]
CHECKS = REPO / "tests" / "parallel" / "_deepep_checks.py"


@pytest.mark.parametrize("world", [2, 4])
def test_deepep_matches_torch_backend(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs, found {torch.cuda.device_count()}")
    env = worker_env()
    # GPU.md: never create NVLink multicast objects on the shared machines.
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--standalone", str(CHECKS),
           "real"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    out = f"exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-8000:]}"
    assert proc.returncode == 0, out
    assert all(f"rank {r} ok" in proc.stdout for r in range(world)), out
