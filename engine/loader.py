"""Reads a DeepSeek-V3 checkpoint directory (config.json + safetensors shards) into a dict of tensors.

Only `.safetensors` is read, memory-mapped through `safetensors.safe_open`: a pickle checkpoint (`*.bin`, `*.pt`)
is refused, because unpickling a file can run arbitrary code. The tensors read are those
`engine.weights.checkpoint_tensors` lists for this process (one rank's experts, no MTP layers); each is checked
against that table before any data is read, so a mismatched checkpoint fails in seconds, not after gigabytes.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.weights import SCALE_SUFFIX, TensorSpec, checkpoint_tensors
from kernels.fp8 import dequantize_block_fp8

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FP32_TENSORS = ("e_score_correction_bias",)  # kept in fp32 whatever `dtype` the caller asks for

# safetensors' header codes of the dtypes a DeepSeek-V3 checkpoint holds.
SAFETENSORS_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
}
_MISMATCH = ("the checkpoint does not match its config.json (layer count, experts, q_lora_rank?): use the config.json "
             "shipped with these weights, or regenerate them")


def load_config(model_dir: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory (raises `ConfigError` naming the bad key)."""
    return ModelConfig.from_file(_model_dir(model_dir) / "config.json")


def load_weights(
    model_dir: str | Path,
    cfg: ModelConfig,
    *,
    experts: Iterable[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    keep_fp8: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Name -> tensor on `device` for every tensor this process needs, in checkpoint order.

    experts: the logical routed-expert ids to read (None: all); other experts' tensors are skipped, as are the
    MTP layers `model.layers.{i >= num_hidden_layers}`.
    FP8 weights (`[N, K]` e4m3 + `_scale_inv` `[ceil(N/128), ceil(K/128)]` fp32) are dequantized to `dtype`,
    or returned as stored with their `_scale_inv` when `keep_fp8`. Other tensors are cast to `dtype`, except
    `e_score_correction_bias`, which stays fp32. Raises `CheckpointError` naming the problem and the fix.
    """
    root = _model_dir(model_dir)
    specs = checkpoint_tensors(cfg, check_experts(cfg, experts))
    weight_map = _weight_map(root, specs)
    by_shard: dict[str, list[str]] = defaultdict(list)
    for name in specs:
        by_shard[weight_map[name]].append(name)
    for shard in by_shard:
        if not (root / shard).is_file():
            raise CheckpointError(
                f"{root}: shard '{shard}' named by {INDEX_FILE} is missing; download or copy it into the directory"
            )

    if (root / INDEX_FILE).is_file():
        missing_hint = f"{INDEX_FILE} places it here, so index and shards come from different checkpoints: " \
                       "download them again"
    else:
        missing_hint = _MISMATCH

    loaded: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}  # one half of a quantized weight + scale pair split across shards
    with ExitStack() as stack:
        # Open and check every shard first: a truncated or mismatched file fails before any data is read.
        handles = {shard: _open_shard(root / shard, torch.device(device), stack) for shard in sorted(by_shard)}
        for shard, handle in handles.items():
            _check_shard(root / shard, handle, by_shard[shard], specs, missing_hint)
        total = sum(nbytes(spec) for spec in specs.values())
        with tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, file=sys.stderr,
                  disable=not progress) as bar:
            for shard, handle in handles.items():
                for name in by_shard[shard]:
                    pending[name] = _read(root / shard, handle, name)
                    bar.update(nbytes(specs[name]))
                    weight = name[: -len(SCALE_SUFFIX)] if is_scale(name, specs) else name
                    parts = [weight, weight + SCALE_SUFFIX] if specs[weight].quantized else [weight]
                    if all(part in pending for part in parts):  # else its partner comes later
                        stored, *scale = (pending.pop(part) for part in parts)
                        loaded.update(convert(weight, specs[weight], stored, scale[0] if scale else None, cfg,
                                              dtype=dtype, keep_fp8=keep_fp8))
    order = output_specs(cfg, experts, dtype=dtype, keep_fp8=keep_fp8)
    return {name: loaded[name] for name in order}


def output_specs(
    cfg: ModelConfig,
    experts: Iterable[int] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    keep_fp8: bool = False,
) -> dict[str, TensorSpec]:
    """Name -> shape and dtype of every tensor `load_weights` (and `dummy_weights`) returns, in checkpoint order.

    FP8 weights appear dequantized to `dtype` without their `_scale_inv`, unless `keep_fp8` (then as stored).
    """
    specs = checkpoint_tensors(cfg, check_experts(cfg, experts))
    out: dict[str, TensorSpec] = {}
    for name, spec in specs.items():
        if keep_fp8 and is_scale(name, specs):
            out[name] = spec
        elif is_scale(name, specs):
            continue
        elif spec.quantized:
            out[name] = spec if keep_fp8 else TensorSpec(spec.shape, dtype)
        else:
            out[name] = TensorSpec(spec.shape, torch.float32 if name.endswith(FP32_TENSORS) else dtype)
    return out


def is_scale(name: str, specs: dict[str, TensorSpec]) -> bool:
    """True for the `<weight>_scale_inv` entry of a quantized weight in `specs` (it travels with that weight)."""
    if not name.endswith(SCALE_SUFFIX):
        return False
    weight = specs.get(name[: -len(SCALE_SUFFIX)])
    return weight is not None and weight.quantized


def check_experts(cfg: ModelConfig, experts: Iterable[int] | None) -> list[int] | None:
    """`experts` as a list, after checking each id is a routed expert of `cfg` (None stays None: all experts)."""
    if experts is None:
        return None
    ids = list(experts)
    bad = [e for e in ids if not 0 <= e < cfg.n_routed_experts]
    if bad:
        raise ValueError(f"expert ids {bad} out of range: the model has {cfg.n_routed_experts} routed experts")
    return ids


def nbytes(spec: TensorSpec) -> int:
    """Bytes of a tensor of this spec, as stored."""
    return math.prod(spec.shape) * spec.dtype.itemsize


def convert(
    name: str,
    spec: TensorSpec,
    stored: torch.Tensor,
    scale_inv: torch.Tensor | None,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    keep_fp8: bool,
) -> dict[str, torch.Tensor]:
    """A tensor as the checkpoint stores it -> the entries `load_weights` returns for it.

    stored: `spec.shape` in `spec.dtype`; scale_inv: `[ceil(N/128), ceil(K/128)]` fp32 for a quantized `[N, K]`
    weight, else None. Shared with `engine.dummy` so random weights go through the very same conversion.
    """
    if spec.quantized:
        assert scale_inv is not None and cfg.quant is not None
        if keep_fp8:
            return {name: stored, name + SCALE_SUFFIX: scale_inv}
        return {name: dequantize_block_fp8(stored, scale_inv, cfg.quant.block, dtype)}
    if name.endswith(FP32_TENSORS):
        # The expert-selection bias shifts sigmoid scores by small amounts; bf16 would reorder the top-k.
        return {name: stored.to(torch.float32)}
    return {name: stored.to(dtype)}


def _model_dir(model_dir: str | Path) -> Path:
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: no such checkpoint directory; pass the directory holding config.json and the *.safetensors "
            "shards (or write a random one with scripts/make_checkpoint.py)"
        )
    return root


def _weight_map(root: Path, specs: dict[str, TensorSpec]) -> dict[str, str]:
    """Name -> shard file for every tensor in `specs`, from the index or else the single `model.safetensors`."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            raw: Any = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(
                f"{index}: not valid JSON ({err}); restore the index from the original checkpoint"
            ) from None
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index}: no 'weight_map' object (tensor name -> shard file); restore the index from the original "
                "checkpoint"
            )
        for shard in set(weight_map.values()):
            # The index is input: a name like '../x' must not read files outside the checkpoint.
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise CheckpointError(
                    f"{index}: shard '{shard}' is not a .safetensors file name in this directory; fix the weight_map"
                )
        missing = [name for name in specs if name not in weight_map]
        if missing:
            raise _missing(index, missing, specs, "is not in the weight_map; " + _MISMATCH)
        return weight_map
    if (root / SINGLE_FILE).is_file():
        return {name: SINGLE_FILE for name in specs}  # presence is checked against the file's header
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root}: holds only pickle checkpoints ({', '.join(pickles[:3])}); wideep never unpickles, because "
            "loading a pickle can run arbitrary code. Convert them to safetensors where you trust the files, e.g. "
            "`transformers`' save_pretrained(..., safe_serialization=True) or safetensors.torch.save_file on "
            "torch.load(path, weights_only=True), or download the .safetensors release"
        )
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    found = f" (found {', '.join(shards[:3])} but no index naming their tensors)" if shards else ""
    raise CheckpointError(
        f"{root}: neither {INDEX_FILE} nor {SINGLE_FILE}{found}; copy the checkpoint's index and shards here"
    )


def _open_shard(path: Path, device: torch.device, stack: ExitStack) -> Any:
    try:
        return stack.enter_context(safe_open(str(path), framework="pt", device=str(device)))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt: download it again"
        ) from None


def _check_shard(path: Path, handle: Any, names: list[str], specs: dict[str, TensorSpec], missing_hint: str) -> None:
    """Each of `names` is in the shard with the shape and dtype of its spec (read from the header only)."""
    present = set(handle.keys())
    missing = [name for name in names if name not in present]
    if missing:
        raise _missing(path, missing, specs, "is missing; " + missing_hint)
    for name in names:
        meta = handle.get_slice(name)
        shape, code = tuple(meta.get_shape()), meta.get_dtype()
        dtype = SAFETENSORS_DTYPES.get(code, code)
        want = specs[name]
        if shape != want.shape or dtype != want.dtype:
            raise CheckpointError(
                f"{path.name}: tensor '{name}' has shape {shape} {dtype}, expected {want.shape} {want.dtype} "
                "from config.json; the config and the weights are from different models (or fp8 vs bf16): "
                "use the config.json shipped with these shards"
            )


def _missing(where: Path, missing: list[str], specs: dict[str, TensorSpec], why: str) -> CheckpointError:
    scales = [name for name in specs if is_scale(name, specs)]
    if scales and set(scales) <= set(missing):
        return CheckpointError(
            f"{where}: no '{scales[0]}' nor any other '{SCALE_SUFFIX}' although config.json declares an fp8 "
            "'quantization_config': these look like bf16 weights; remove quantization_config or use fp8 weights"
        )
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return CheckpointError(f"{where}: tensor '{missing[0]}'{more} {why}")


def _read(path: Path, handle: Any, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path}: reading '{name}' failed ({err}); the file is corrupt: download it again"
        ) from None
