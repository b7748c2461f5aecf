"""Shared test setup: imports from a checkout (the repo root and `scripts/`), and tiny random checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

# Triton decides at its first import whether kernels compile or run under its CPU interpreter; without a GPU the
# kernel tests need the interpreter, whichever test module happens to import triton first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):  # scripts/ is not a package; tests import its modules by file name
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from engine.config import Fp8Quant, ModelConfig  # noqa: E402
from engine.presets import tiny  # noqa: E402


@pytest.fixture
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `tiny_checkpoint(cfg=None, *, fp8=None, spelling="official", seed=0, num_shards=2, mtp=False)`.

    Writes a random checkpoint (scripts/make_checkpoint.py) into a fresh temporary directory and returns its path.
    cfg defaults to `presets.tiny()`; fp8=True/False adds or removes 128x128 block quantization (None: as cfg says).
    Its tensors equal `engine.dummy.dummy_weights(cfg, seed=seed)` on the CPU.
    """
    from make_checkpoint import write_checkpoint

    def make(cfg: ModelConfig | None = None, *, fp8: bool | None = None, spelling: str = "official", seed: int = 0,
             num_shards: int = 2, mtp: bool = False) -> Path:
        cfg = cfg or tiny()
        if fp8 is not None:
            cfg = cfg.replace(quant=Fp8Quant() if fp8 else None)
        out = tmp_path_factory.mktemp("ckpt") / "model"
        return write_checkpoint(cfg, out, seed=seed, num_shards=num_shards, spelling=spelling, mtp=mtp,
                                progress=False)

    return make
