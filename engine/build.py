"""From user choices (a checkpoint directory or a built-in preset, a device, a dtype) to a ready DeepseekV3."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import WideepError
from engine.layers import FP8_BLOCK, FP8_COMPUTE_DTYPE
from engine.model import DeepseekV3
from engine.presets import PRESETS, preset
from engine.weights import DTYPES
from eplb.placement import ExpertPlacement
from parallel.dispatcher import Dispatcher

log = logging.getLogger("wideep")


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint directory, or a built-in preset (`tiny`, `v3`) that has only dummy weights."""

    cfg: ModelConfig
    path: Path | None
    name: str

    @classmethod
    def resolve(cls, model: str, num_layers: int | None = None) -> "ModelSource":
        if model in PRESETS and not Path(model).exists():
            return cls(preset(model, num_layers=num_layers), None, model)
        path = Path(model)
        if not path.exists():
            raise WideepError(f"--model {model}: no such directory, and not a built-in preset {sorted(PRESETS)}")
        cfg = ModelConfig.from_file(path)
        if num_layers is not None:
            if not 1 <= num_layers <= cfg.num_hidden_layers:
                raise WideepError(f"--num-layers {num_layers} must lie in [1, {cfg.num_hidden_layers}] for {model}")
            cfg = cfg.replace(num_hidden_layers=num_layers,
                              first_k_dense_replace=min(cfg.first_k_dense_replace, num_layers))
        return cls(cfg, path, str(path))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WideepError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise WideepError(f"--dtype {dtype}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def use_fp8_weights(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """Keep an FP8 checkpoint's weights in FP8 (block-scaled GEMMs) on GPUs with a bf16 model; dequantize elsewhere,
    where the CPU references compute in the model dtype."""
    return (cfg.quant is not None and cfg.quant.block == FP8_BLOCK and device.type == "cuda"
            and dtype == FP8_COMPUTE_DTYPE)


def build_model(
    source: ModelSource,
    *,
    load_format: str = "auto",
    device: torch.device,
    dtype: torch.dtype,
    placement: ExpertPlacement | None = None,
    ep_rank: int = 0,
    ep_size: int = 1,
    dispatcher: Dispatcher | None = None,
    seed: int = 0,
    progress: bool = True,
    attention_backend: str = "auto",
    dispatch_algorithm: str = "static",
    fp8_weights: bool | None = None,
    page_size: int = 1,
) -> DeepseekV3:
    """Reads (or makes up, for `load_format="dummy"`) this rank's weights and builds the model on `device`;
    decode attention runs through `attention_backend` (`--attention-backend`). fp8_weights: keep an FP8
    checkpoint's projections and experts in FP8 (None: `use_fp8_weights` decides; True also works on the CPU,
    through the torch references, which is how its logic is tested without a GPU)."""
    cfg = source.cfg
    placement = placement or ExpertPlacement.trivial(len(cfg.moe_layers), cfg.n_routed_experts)
    slots = placement.slots_per_rank(ep_size)
    experts = sorted({e for layer in range(placement.num_layers)
                      for e in placement.phy2log[layer, ep_rank * slots : (ep_rank + 1) * slots].tolist()})
    keep_fp8 = use_fp8_weights(cfg, device, dtype) if fp8_weights is None else fp8_weights
    if keep_fp8 and (cfg.quant is None or cfg.quant.block != FP8_BLOCK or dtype != FP8_COMPUTE_DTYPE):
        raise WideepError("FP8 weights need an fp8 checkpoint with 128x128 blocks and --dtype bfloat16")
    if load_format == "auto":
        load_format = "dummy" if source.path is None else "safetensors"
    if load_format == "dummy":
        from engine.dummy import LazyDummyWeights

        weights = LazyDummyWeights(cfg, experts=experts, device=device, dtype=dtype, seed=seed, keep_fp8=keep_fp8)
    elif load_format == "safetensors":
        if source.path is None:
            raise WideepError(f"--model {source.name} is a built-in preset with no files; use --load-format dummy")
        from engine.loader import load_weights

        weights = load_weights(source.path, cfg, experts=experts, device=device, dtype=dtype, progress=progress,
                               keep_fp8=keep_fp8)
    else:
        raise WideepError(f"--load-format {load_format}: choose auto, safetensors or dummy")
    log.info("building %s: %d layers, %d of %d experts on this rank, %s %s", source.name, cfg.num_hidden_layers,
             len(experts), cfg.n_routed_experts, device, str(dtype).removeprefix("torch."))
    return DeepseekV3(cfg, weights, device=device, placement=placement, ep_rank=ep_rank, ep_size=ep_size,
                      dispatcher=dispatcher, attention_backend=attention_backend,
                      dispatch_algorithm=dispatch_algorithm, page_size=page_size)
