"""`@triton.jit` bodies only; their launchers (shape, dtype and contiguity checks) live one level up, e.g.

- `activation` (launched by kernels/act_quant.py): SiLU-and-mul and per-token 1x128 FP8 quantization, fused or apart.
- `gemm` (kernels/grouped_gemm.py, kernels/fp8_gemm.py): one GEMM mainloop, bf16 or block-scaled FP8, over dense,
  contiguous-grouped or masked-grouped rows.
- `router` (kernels/fused_router.py): DeepSeek-V3 grouped top-k routing, one program per token.
- `mla_decode` (kernels/mla_triton.py): split-KV MLA decode over the paged latent cache, and its reduction.
- `segment_sum` (kernels/segment_sum.py): fixed-order weighted sums of row groups (the EP combine's fold and gather).

Triton decides when a body is decorated whether it is compiled or interpreted (`TRITON_INTERPRET=1`), and it
decorates its own standard library (`tl.sum`, `tl.cumsum`, ...) when `triton` is first imported. A process without
a GPU that runs these kernels must therefore set `TRITON_INTERPRET=1` before anything imports `triton`. The
launchers import these modules only when they launch, so code that only uses the torch references never imports
`triton`; `ensure_runnable` says plainly what is wrong when a CPU tensor reaches a compiled kernel.
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run under its CPU interpreter (`TRITON_INTERPRET=1` before `triton` was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def ensure_runnable(device: torch.device) -> None:
    """Raise if Triton cannot run on `device`: CUDA always can; CPU tensors only under the interpreter."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.cumsum, InterpretedFunction):
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after triton was first imported, so Triton's own library is compiled and "
                "cannot run on the CPU; set it in the environment (or before any import of triton)"
            )
        return
    raise RuntimeError(
        f"Triton kernels need CUDA tensors, got {device}; on a CPU use backend='torch' (the reference), or set "
        "TRITON_INTERPRET=1 before triton is first imported to run them under Triton's interpreter"
    )


@functools.cache
def is_hopper(device: torch.device) -> bool:
    """Whether `device` is a Hopper GPU (compute capability 9.x), where the Gluon kernels run. Cached: launchers ask
    on every call."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


@functools.cache
def num_sms(device: torch.device, interpreted: int) -> int:
    """Multiprocessors of a CUDA device, which size persistent and split grids; `interpreted` for the CPU
    interpreter, where a small number still makes programs walk several tiles or splits. Cached: launchers ask on
    every call."""
    if device.type != "cuda":
        return interpreted
    return torch.cuda.get_device_properties(device).multi_processor_count
