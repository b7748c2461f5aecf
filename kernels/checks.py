"""Argument checks shared by the kernel launchers: each failure names the argument, what it is and what it must be."""

from __future__ import annotations

from typing import Iterable

import torch

FP8 = torch.float8_e4m3fn
HALF = (torch.bfloat16, torch.float16)


def require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def check_tensor(
    t: torch.Tensor, name: str, *, dims: int | Iterable[int], dtypes: Iterable[torch.dtype],
    last_contiguous: bool = True,
) -> None:
    """`t` has one of `dims` dimensions, one of `dtypes`, and (if asked) a unit stride in its last dimension."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    dtypes = tuple(dtypes)
    require(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    require(t.dim() in dims, f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    require(t.dtype in dtypes, f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if last_contiguous and t.numel() > 0:
        require(t.stride(-1) == 1, f"{name} must be contiguous in its last dim, got strides {t.stride()}; "
                                   "call .contiguous() first")


def check_shape(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    require(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(tensors: dict[str, torch.Tensor | None]) -> torch.device:
    """All given tensors on one device; returns it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    require(len(devices) == 1, "all tensors must be on one device, got "
            + ", ".join(f"{k} on {v.device}" for k, v in present.items()))
    return devices.pop()


def check_counts(counts: torch.Tensor, name: str, num_experts: int) -> None:
    """Per-expert row counts: `[E]` int32 or int64."""
    check_tensor(counts, name, dims=1, dtypes=(torch.int32, torch.int64), last_contiguous=False)
    require(counts.shape[0] == num_experts, f"{name} must have one entry per expert ({num_experts}), "
                                            f"got shape {tuple(counts.shape)}")
    require(counts.is_contiguous(), f"{name} must be contiguous")
