"""Launcher of the Gluon block-scaled FP8 grouped GEMM (`kernels/triton/gemm_gluon.py`), Hopper only.

Chosen through `TileConfig(gluon=True)` in `kernels.grouped_gemm.run_gemm`, for the contiguous layout; with
`warp_specialize=True` as well, the warp-specialized persistent kernel of `kernels/triton/gemm_gluon_ws.py`. Everything
else (bf16, the masked and dense layouts, K not a multiple of 256, CPUs and the interpreter) stays on the Triton
kernel of `kernels/triton/gemm.py`, which has the same contract.
"""

from __future__ import annotations

import torch

from kernels.checks import require
from kernels.triton import is_hopper, num_sms

UNROLL = 2  # K steps an iteration of the kernel's K loop (4 runs out of registers at 128x128 tiles)
# Registers a thread of a worker consumer warpgroup: the second one at 128x128 tiles (the producer warp keeps 24),
# both at 128x256 tiles (the producer is then the default warpgroup and keeps the rest).
WS_CONSUMER_REGS = 232


def gluon_supported(layout: str, a: torch.Tensor, k: int, fp8: bool) -> bool:
    """Whether the Gluon kernel can run this GEMM here (otherwise the Triton kernel does)."""
    return fp8 and layout == "contiguous" and a.is_cuda and k % (128 * UNROLL) == 0 and is_hopper(a.device)


def run_gluon_fp8(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, counts: torch.Tensor, a_scale: torch.Tensor,
                  b_scale: torch.Tensor, cfg) -> torch.Tensor:
    """Contiguous grouped `out[rows of e] = (a[rows of e] @ b[e]^T)` with block scales, on checked arguments.

    a `[M, K]` e4m3 (row stride a multiple of 16 bytes), b `[E, N, K]` e4m3 contiguous, a_scale `[M, K/128]`
    float32, b_scale `[E, N/128, K/128]` float32, out `[M, N]` bf16, counts `[E]` on the device.
    cfg: a `TileConfig` with block_n dividing 128 and block_k == 128; block_m == 16 * num_warps, or with
    warp_specialize block_m == 128, block_n 256 or dividing 128, and `persistent` programs a multiprocessor (0: one
    a tile). The specialized kernel's warps are fixed by its partitions (two consumer warpgroups and a producer):
    it ignores num_warps, which then serves the Triton kernel where this one does not apply.
    """
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    m, k = a.shape
    e, n, _ = b.shape
    ws = cfg.warp_specialize
    if ws:
        require(cfg.block_m == 128 and cfg.block_k == 128 and (128 % cfg.block_n == 0 or cfg.block_n == 256),
                f"the warp-specialized Gluon FP8 kernel needs 128-row tiles (two 64-row consumer warpgroups), "
                f"block_k 128 and block_n 256 or dividing 128, got {cfg}")
    else:
        require(cfg.block_k == 128 and 128 % cfg.block_n == 0 and cfg.block_m == 16 * cfg.num_warps,
                f"the Gluon FP8 kernel needs block_k 128, block_n dividing 128 and block_m = 16 * num_warps, "
                f"got {cfg}")
    require(k % (128 * UNROLL) == 0, f"the Gluon FP8 kernel needs K a multiple of {128 * UNROLL}, got {k}")
    if m == 0 or n == 0:
        return out
    a_block = [cfg.block_m // 2 if ws else cfg.block_m, 128]  # the specialized kernel loads A in 64-row halves
    a_layout = gl.NVMMASharedLayout.get_default_for(a_block, gl.float8e4nv)
    pieces = 2 if cfg.block_n == 256 else 1  # a 256-wide tile reads B in two 128-row pieces, one scale each
    b_block = [cfg.block_n // pieces, 128]
    b_layout = gl.NVMMASharedLayout.get_default_for(b_block, gl.float8e4nv)
    flat_b = b.reshape(e * n, k)
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), a_block, a_layout)
    b_desc = TensorDescriptor(flat_b, list(flat_b.shape), list(flat_b.stride()), b_block, b_layout)
    tiles = (-(-m // cfg.block_m) + e) * -(-n // cfg.block_n)
    args = (a_desc, b_desc, a_scale, b_scale, out, counts, e, m, n, k,
            a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1), b_scale.stride(2),
            out.stride(0))
    # The 128x256 kernel's expert table is 64 wide at least: at 32, ptxas spilled its accumulators around every
    # product (Triton 3.6 and 3.9, sm_90a); at 64 neither does (tests/kernels/test_gluon_compile.py). Triton 3.6,
    # the GPU hosts', is clean at 128 and 256 too; 3.9 spills there.
    block_e = max(64 if pieces == 2 else 16, 1 << (e - 1).bit_length())
    if ws:
        from kernels.triton.gemm_gluon_ws import fp8_grouped_gemm_ws_kernel

        # persistent 0: one program per tile, dispatched in tile order by the hardware as multiprocessors free up.
        grid = (tiles if cfg.persistent == 0 else max(1, min(tiles, cfg.persistent * num_sms(a.device, 1))),)
        fp8_grouped_gemm_ws_kernel[grid](*args, BLOCK_E=block_e, GROUP_M=cfg.group_m, STAGES=cfg.num_stages,
                                         UNROLL=UNROLL, NB=pieces, CONSUMER_REGS=WS_CONSUMER_REGS,
                                         num_warps=4)
        return out
    from kernels.triton.gemm_gluon import fp8_grouped_gemm_kernel

    fp8_grouped_gemm_kernel[(tiles,)](*args, BLOCK_E=block_e, GROUP_M=cfg.group_m, STAGES=cfg.num_stages,
                                      UNROLL=UNROLL, num_warps=cfg.num_warps)
    return out
