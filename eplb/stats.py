"""Expert-load statistics files: what `python -m eplb` and `--init-expert-location` read, and the recorder writes.

Three formats give the same thing, `load: [L, E]` float64 (tokens routed to each logical expert of each MoE
layer), any leading steps axis summed:
- JSON: `{"logical_count": [[count per expert] per layer]}`, or `[steps][layers][experts]`.
- our recorder dump: safetensors with tensor `logical_count` `[steps or 1, L, E]` and header metadata
  `{"format": "wideep-expert-load", "version": "1", "mode": "stat" | "per_pass", ...}` (`save_dump` / `load_dump`).
- an SGLang expert-distribution dump: a `.pt` dict holding `logical_count` (`[L, E]` or `[steps, L, E]`), read
  only with `torch.load(weights_only=True)`: a statistics file must never run code.
The format is told by the file's first bytes, not its name. Every problem is a `WideepError` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import WideepError

DUMP_FORMAT = "wideep-expert-load"
DUMP_VERSION = "1"
RECORDER_MODES = ("stat", "per_pass")


@dataclass(frozen=True)
class ExpertLoad:
    """Load read from a statistics file. load: `[L, E]` float64, summed over `steps` recorded steps."""

    load: torch.Tensor
    steps: int
    kind: str  # "json", "wideep-dump" or "sglang-dump"
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpertLoadDump:
    """Our recorder dump. logical_count: `[steps or 1, L, E]` counts; metadata: the header's string map."""

    logical_count: torch.Tensor
    metadata: dict[str, str]


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds.

    So a failed run leaves no output and never a half-written one. Raises `WideepError` when the folder is
    missing or not writable.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise WideepError(f"cannot write {path}: folder {folder} does not exist; create it or choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise WideepError(f"cannot write {path}: {err.strerror}; choose a writable folder") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_counts(counts: torch.Tensor, source: str) -> torch.Tensor:
    """Validates recorded counts `[L, E]` or `[steps, L, E]`; returns them as float64 `[steps, L, E]`."""
    if counts.dtype == torch.bool or counts.is_complex() or not (counts.is_floating_point() or _is_int(counts)):
        raise WideepError(f"{source}: logical_count must hold numbers, found dtype {counts.dtype}")
    if counts.dim() not in (2, 3) or 0 in counts.shape:
        raise WideepError(
            f"{source}: logical_count must be [layers, experts] or [steps, layers, experts] and non-empty, "
            f"found shape {tuple(counts.shape)}"
        )
    counts = counts.detach().to("cpu", torch.float64)
    if not torch.isfinite(counts).all():
        raise WideepError(f"{source}: logical_count holds NaN or infinite values; record the statistics again")
    if (counts < 0).any():
        raise WideepError(f"{source}: logical_count holds negative counts; token counts are >= 0")
    return counts if counts.dim() == 3 else counts.unsqueeze(0)


def _is_int(t: torch.Tensor) -> bool:
    return t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def save_dump(path: str | Path, logical_count: torch.Tensor, mode: str,
              metadata: dict[str, str | int | float | bool] | None = None) -> None:
    """Writes our recorder dump atomically.

    logical_count: `[steps or 1, L, E]` integer counts (`stat` mode: one summed row; `per_pass`: one per pass).
    metadata: extra header entries; values that are not strings are stored as JSON text.
    """
    if mode not in RECORDER_MODES:
        raise WideepError(f"recorder mode must be one of {', '.join(RECORDER_MODES)}, found {mode!r}")
    if logical_count.dim() != 3:
        raise WideepError(f"logical_count must be [steps, layers, experts], found shape {tuple(logical_count.shape)}")
    check_counts(logical_count, str(path))
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    header.update(format=DUMP_FORMAT, version=DUMP_VERSION, mode=mode)
    with atomic_output(path) as tmp:
        save_file({"logical_count": logical_count.detach().cpu().contiguous()}, str(tmp), metadata=header)


def load_dump(path: str | Path) -> ExpertLoadDump:
    """Reads our recorder dump; checks its format, version, mode and counts."""
    source = str(path)
    try:
        with safe_open(source, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if "logical_count" not in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                raise WideepError(f"{source}: no tensor 'logical_count'; this is not a wideep expert-load dump")
            counts = f.get_tensor("logical_count")
    except WideepError:
        raise
    except Exception as err:  # noqa: BLE001 (the safetensors reader raises several types for a corrupt file)
        raise WideepError(f"{source}: not a readable safetensors file ({err}); record the statistics again") from None
    if metadata.get("format") != DUMP_FORMAT:
        raise WideepError(
            f"{source}: header metadata 'format' is {metadata.get('format')!r}, not {DUMP_FORMAT!r}; "
            "pass a dump written by the wideep expert-load recorder"
        )
    if metadata.get("version") != DUMP_VERSION:
        raise WideepError(
            f"{source}: dump version {metadata.get('version')!r} is not supported (this wideep reads version "
            f"{DUMP_VERSION}); record it again with this version"
        )
    if metadata.get("mode") not in RECORDER_MODES:
        raise WideepError(f"{source}: header metadata 'mode' is {metadata.get('mode')!r}; expected stat or per_pass")
    if counts.dim() != 3:
        raise WideepError(f"{source}: logical_count must be [steps, layers, experts], found {tuple(counts.shape)}")
    check_counts(counts, source)
    return ExpertLoadDump(counts, metadata)


def sniff(path: str | Path) -> str:
    """The kind of a statistics or placement file from its first bytes: "json", "safetensors" or "torch"."""
    path = Path(path)
    if not path.is_file():
        raise WideepError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as err:
        raise WideepError(f"{path}: cannot read ({err.strerror})") from None
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return "torch"  # torch.save writes a zip archive (or a bare pickle in the legacy format)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    raise WideepError(
        f"{path}: neither JSON, safetensors nor a torch .pt file; pass expert-load statistics "
        '(JSON {"logical_count": ...}, a wideep dump or an SGLang dump)'
    )


def read_json(path: str | Path) -> object:
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WideepError(f"{path}: not valid JSON ({err})") from None


def counts_from_json(raw: object, source: str) -> torch.Tensor:
    """`logical_count` of a parsed JSON statistics object as `[steps, L, E]` float64."""
    if not isinstance(raw, dict) or "logical_count" not in raw:
        found = "a placement" if isinstance(raw, dict) and "phy2log" in raw else "no 'logical_count' key"
        raise WideepError(f'{source}: expected expert-load statistics {{"logical_count": [[...], ...]}}, found {found}')
    try:
        array = np.asarray(raw["logical_count"])
    except (ValueError, OverflowError):
        array = None  # ragged nesting
    if array is None or array.dtype.kind not in "iuf":
        raise WideepError(
            f"{source}: logical_count must be a rectangular list of numbers per expert per layer "
            "(one list per layer, all of equal length)"
        )
    return check_counts(torch.from_numpy(array.astype(np.float64)), source)


def read_expert_load(path: str | Path) -> ExpertLoad:
    """Reads expert load from any of the three formats; sums the steps. Returns `ExpertLoad` (load `[L, E]`)."""
    source, kind = str(path), sniff(path)
    if kind == "json":
        counts, metadata, kind = counts_from_json(read_json(path), source), {}, "json"
    elif kind == "safetensors":
        dump = load_dump(path)
        counts, metadata, kind = check_counts(dump.logical_count, source), dump.metadata, "wideep-dump"
    else:
        counts, metadata, kind = _read_sglang(path), {}, "sglang-dump"
    return ExpertLoad(counts.sum(0), counts.shape[0], kind, metadata)


def _read_sglang(path: str | Path) -> torch.Tensor:
    """`logical_count` of an SGLang expert-distribution dump as `[steps, L, E]` float64."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises UnpicklingError, RuntimeError, EOFError ... here)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WideepError(
            f"{path}: cannot be read as a plain-tensor .pt file with torch.load(weights_only=True) ({first}); "
            "pass an SGLang expert-distribution dump"
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("logical_count"), torch.Tensor):
        raise WideepError(f"{path}: expected a dict with a 'logical_count' tensor (an SGLang expert-distribution dump)")
    return check_counts(raw["logical_count"], str(path))
