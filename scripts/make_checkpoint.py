"""Writes a random DeepSeek-V3 checkpoint in the official release's format, for tests and benchmarks.

    python scripts/make_checkpoint.py --preset tiny --out /tmp/tiny --dtype fp8 --spelling transformers
    python scripts/make_checkpoint.py --preset v3 --num-layers 1 --out /data/v3-1l --num-shards 8

The directory holds config.json (official or transformers spelling), `model-0000k-of-0000N.safetensors` shards and
`model.safetensors.index.json`: e4m3 projections with 128x128 fp32 `weight_scale_inv` when fp8, bf16 elsewhere,
`e_score_correction_bias` fp32, plus the MTP layer(s) `model.layers.{num_hidden_layers}.*` when the config has them.
Tensors are made one at a time and streamed into their shard, so a full-width v3 needs about one tensor of RAM
(v3's 1.8 GB embedding); note v3 has an MTP layer, an MoE layer, so `--num-layers 1` still writes 18 GiB.
The checkpoint appears only when complete: it is written into a hidden sibling directory and renamed at the end.
The last stdout line is JSON: {"path": ..., "num_tensors": ..., "total_bytes": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import uuid
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python scripts/make_checkpoint.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ModelConfig  # noqa: E402
from engine.dummy import random_tensors  # noqa: E402
from engine.errors import CheckpointError, run_cli  # noqa: E402
from engine.loader import INDEX_FILE, SAFETENSORS_DTYPES, is_scale, nbytes  # noqa: E402
from engine.presets import preset  # noqa: E402
from engine.weights import DTYPES, SCALE_SUFFIX, TensorSpec, checkpoint_tensors  # noqa: E402

SPELLINGS = ("official", "transformers")
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def mtp_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """The `cfg.num_nextn_predict_layers` multi-token-prediction layers stored after the decoder layers.

    As in the official release, each is a full decoder layer plus `embed_tokens`, `enorm`, `hnorm`, `eh_proj`
    `[H, 2H]` and `shared_head.{norm,head}`; the engine does not run them, the loader skips them.
    """
    dt, h, first = DTYPES[cfg.dtype], cfg.hidden_size, cfg.num_hidden_layers
    with_mtp = cfg.replace(num_hidden_layers=first + cfg.num_nextn_predict_layers)
    out: dict[str, TensorSpec] = {}
    for layer in range(first, with_mtp.num_hidden_layers):
        p = f"model.layers.{layer}."
        out[p + "embed_tokens.weight"] = TensorSpec((cfg.vocab_size, h), dt)
        out[p + "enorm.weight"] = TensorSpec((h,), dt)
        out[p + "hnorm.weight"] = TensorSpec((h,), dt)
        out[p + "eh_proj.weight"] = TensorSpec((h, 2 * h), dt)
        out.update((k, v) for k, v in checkpoint_tensors(with_mtp, layers=[layer]).items() if k.startswith(p))
        out[p + "shared_head.norm.weight"] = TensorSpec((h,), dt)
        out[p + "shared_head.head.weight"] = TensorSpec((cfg.vocab_size, h), dt)
    return out


def plan_shards(specs: dict[str, TensorSpec], num_shards: int) -> list[list[str]]:
    """Splits `specs` (in order) into `num_shards` non-empty runs of about equal bytes.

    A quantized weight and its `_scale_inv` always share a shard, as in the official release.
    """
    units: list[list[str]] = []
    for name in specs:
        if is_scale(name, specs):
            units[-1].append(name)
        else:
            units.append([name])
    if not 1 <= num_shards <= len(units):
        raise CheckpointError(f"--num-shards {num_shards}: choose 1 to {len(units)} (the number of weights)")
    total = sum(nbytes(spec) for spec in specs.values())
    shards: list[list[str]] = [[]]
    done = 0
    for i, unit in enumerate(units):
        size = sum(nbytes(specs[name]) for name in unit)
        later_shards = num_shards - len(shards)
        # A unit goes to the next shard once its middle lies past this shard's share, or when every later shard
        # needs one of the units left.
        if shards[-1] and later_shards and (done + size / 2 > total * len(shards) / num_shards
                                            or len(units) - i <= later_shards):
            shards.append([])
        shards[-1].extend(unit)
        done += size
    return shards


def write_checkpoint(
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_shards: int = 2,
    spelling: str = "official",
    mtp: bool = False,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Writes a random checkpoint of `cfg` into `out_dir` and returns its path.

    out_dir: a new or empty directory; with `force`, also one holding a checkpoint (a config.json), then replaced.

    mtp: also write one MTP layer when `cfg` has none (config.json then says `num_nextn_predict_layers: 1`).
    The tensors equal `engine.dummy.dummy_weights(cfg, seed=seed)` made on the CPU, before conversion.
    """
    if spelling not in SPELLINGS:
        raise CheckpointError(f"spelling '{spelling}': choose one of {', '.join(SPELLINGS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CheckpointError(f"{out}: directory is not empty; choose a new or empty one, or pass --force to "
                                  "replace it")
        if not (out / "config.json").is_file():
            # --force deletes the directory: a mistyped --out must not take a home directory with it.
            raise CheckpointError(f"{out}: --force replaces only a checkpoint directory and this one has no "
                                  "config.json; remove it yourself or choose another --out")
    if mtp and cfg.num_nextn_predict_layers == 0:
        cfg = cfg.replace(num_nextn_predict_layers=1)
    specs = {**checkpoint_tensors(cfg), **mtp_tensors(cfg)}
    shards = plan_shards(specs, num_shards)
    total = sum(nbytes(spec) for spec in specs.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total:
        raise CheckpointError(f"{out.parent}: {total / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free; "
                              "choose another --out, or fewer layers (--num-layers)")

    # A hidden sibling on the same file system, so the final rename is atomic (mkdir honours the umask).
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        config = cfg.to_official_dict() if spelling == "official" else cfg.to_transformers_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = _stream(specs, seed, cfg.quant.block if cfg.quant else (128, 128))
        weight_map: dict[str, str] = {}
        with tqdm(total=total, desc="writing checkpoint", unit="B", unit_scale=True, file=sys.stderr,
                  disable=not progress) as bar:
            for k, names in enumerate(shards, 1):
                shard = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                _write_shard(tmp / shard, {name: specs[name] for name in names}, tensors, bar)
                weight_map.update(dict.fromkeys(names, shard))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shard(
    path: Path, specs: dict[str, TensorSpec], tensors: Iterator[tuple[str, torch.Tensor]], bar: tqdm
) -> None:
    """Streams the next `len(specs)` (name, tensor) pairs of `tensors` into one safetensors file.

    safetensors' own `save_file` wants the whole shard in memory (gigabytes at v3 size), so the header is written
    from the specs first (8-byte little-endian length, JSON, space padding to 8 bytes) and each tensor's bytes after.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, spec in specs.items():
        header[name] = {"dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + nbytes(spec)]}
        offset += nbytes(spec)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, spec in specs.items():
            got, tensor = next(tensors)
            # The header above promised this name, shape and dtype at this offset.
            assert got == name and tuple(tensor.shape) == spec.shape and tensor.dtype == spec.dtype, got
            f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
            bar.update(nbytes(spec))
            del tensor  # before `next` makes the following one


def _stream(specs: dict[str, TensorSpec], seed: int, block: tuple[int, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every entry of `specs` in order, made on the CPU one at a time."""
    for name, _, tensor, scale in random_tensors(specs, seed=seed, device="cpu", block=block):
        yield name, tensor
        if scale is not None:
            yield name + SCALE_SUFFIX, scale
        del tensor, scale  # before the next one is made: RAM holds one tensor (v3's embedding alone is 1.8 GB)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Renames the finished `tmp` to `out`, replacing whatever `out` held only once `tmp` is complete."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True, choices=["tiny", "v3"], help="model shapes")
    parser.add_argument("--out", required=True, type=Path, help="new or empty directory to write")
    parser.add_argument("--num-layers", type=int, help="decoder layers (default: the preset's)")
    parser.add_argument("--dtype", choices=["bf16", "fp8"], help="weight format (default: tiny bf16, v3 fp8)")
    parser.add_argument("--no-q-lora", action="store_true", help="plain q_proj instead of q_a_proj/q_b_proj")
    parser.add_argument("--no-yarn", action="store_true", help="no rope_scaling")
    parser.add_argument("--spelling", choices=SPELLINGS, default="official", help="config.json key spelling")
    parser.add_argument("--num-shards", type=int, default=2, help="safetensors files to split the tensors over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mtp", action="store_true", help="write an MTP layer even if the preset has none")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)

    cfg = preset(args.preset, num_layers=args.num_layers, fp8=None if args.dtype is None else args.dtype == "fp8")
    if args.no_q_lora:
        cfg = cfg.replace(q_lora_rank=None)
    if args.no_yarn:
        cfg = cfg.replace(rope=None)
    out = write_checkpoint(cfg, args.out, seed=args.seed, num_shards=args.num_shards, spelling=args.spelling,
                           mtp=args.mtp, progress=not args.no_progress, force=args.force)
    index = json.loads((out / INDEX_FILE).read_text())
    print(json.dumps({"path": str(out.resolve()), "num_tensors": len(index["weight_map"]),
                      "total_bytes": index["metadata"]["total_size"]}))
    return 0


if __name__ == "__main__":
    run_cli(main)
