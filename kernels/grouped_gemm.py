"""MoE grouped GEMM and the expert MLP over dispatched tokens: Triton launchers (references in kernels/moe.py).

- `grouped_gemm(a, b, counts, layout, ...)`: per-expert `A_e @ B_e^T`, bf16 or block-scaled FP8, in the two layouts
  the dispatchers produce (contiguous: rows grouped by expert; masked: `[E, max_m, K]` plus counts). Neither reads the
  counts on the host, so both can be captured in a CUDA graph. Reference: `kernels.moe.grouped_gemm_ref`.
- `grouped_mlp(...)`: gate_up GEMM -> SiLU-and-mul (fused with the FP8 quantization of its output) -> down GEMM,
  on Triton for CUDA tensors and the torch reference elsewhere. What `engine.moe.MoE.experts` calls.
- `TileConfig` / `pick_tile`: block shapes per shape class (rows per expert), the fastest of
  `scripts/bench_kernels.py --tune` on an H100 (2026-11-21).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from kernels.act_quant import act_quant, silu_mul, silu_mul_quant
from kernels.checks import FP8, HALF, check_counts, check_same_device, check_shape, check_tensor, require
from kernels.fp8 import ACT_GROUP, dequantize_act
from kernels.gluon_gemm import gluon_supported, run_gluon_fp8
from kernels.moe import grouped_mlp_ref
from kernels.triton import ensure_runnable, interpreting, num_sms

Layout = Literal["contiguous", "masked"]
BACKENDS = ("auto", "triton", "torch")
_LAYOUT_CODE = {"dense": 0, "contiguous": 1, "masked": 2}  # kernels.triton.gemm's LAYOUT


@dataclass(frozen=True)
class TileConfig:
    """One program computes a `block_m x block_n` output tile, stepping K by `block_k`; `group_m` row tiles share a
    column sweep (L2 reuse); `num_stages` loads in flight (software pipelining); `num_warps` per program.
    tma: fetch A and B tiles with Hopper's bulk copy engine (when the strides allow; pointers otherwise).
    persistent: 0, one program per output tile; p > 0, p programs per multiprocessor, each walking the tiles of
    every expert in turn (`gemm_persistent_kernel`). flatten (persistent only): pipeline the tile loop and the K
    loop as one, so the next tile's loads start during the current tile. warp_specialize: ask Triton to split the
    loop (the K loop, or the tile loop when persistent) into producer and consumer warps; a compiler that cannot
    fails to compile it (`scripts/sweep_kernels.py` reports that and goes on). prefetch_scales (FP8): load each K
    step's block scales during the step before. gluon (FP8, contiguous, Hopper, K a multiple of 256): run the Gluon
    kernel of `kernels/triton/gemm_gluon.py` instead, which scales one step's product while the next one multiplies;
    with warp_specialize too, its warp-specialized persistent form (`kernels/triton/gemm_gluon_ws.py`: a producer
    warp and two consumer warpgroups of 64 rows, block_m 128). Other GEMMs run the Triton kernel without both flags.
    FP8 needs block_k == 128 and block_n dividing 128 or a multiple of 128 (one weight scale per column then)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4
    tma: bool = False
    persistent: int = 0
    flatten: bool = False
    warp_specialize: bool = False
    prefetch_scales: bool = False
    gluon: bool = False

    def short(self) -> str:
        """A compact name: `128x128x128 w8 s4 tma p1 flat ws`."""
        extra = [f"g{self.group_m}"] if self.group_m != 8 else []
        extra += ["tma"] if self.tma else []
        extra += [f"p{self.persistent}"] if self.persistent else []
        extra += ["flat"] if self.flatten and self.persistent else []
        extra += ["ws"] if self.warp_specialize else []
        extra += ["pf"] if self.prefetch_scales else []
        extra += ["gluon"] if self.gluon else []
        return " ".join([f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}", *extra])


# (largest rows per expert, config), first match wins; the fastest of `scripts/sweep_kernels.py` at the DeepSeek-V3
# expert shapes (8/32 experts, gate_up N=4096 K=7168, down N=7168 K=2048). Few rows per expert are weight-bandwidth
# bound: short row tiles, loads by the bulk copy engine (H100, 2026-11-21, commit b372e93). From 32 rows on,
# persistent programs (a fixed grid walking every expert's tiles) win 1-11%; up to 128 rows two 64-row programs a
# multiprocessor with the scales fetched a step ahead, 1.02-1.03x (H200, commits 8777000 and edb8e0c; the 64-row
# Gluon kernel was 1.02-1.11x in the sweeps but 0.82x at down E=8 64 rows in bench_kernels, commit effd8dd). Above
# 128 rows, the contiguous layout on Hopper runs the warp-specialized persistent Gluon kernel
# (`kernels/triton/gemm_gluon_ws.py`): 1.09-1.10x the non-specialized Gluon kernel over the >256 class and
# 1.06-1.14x the 64-row tile at 256 rows, in H200 sweeps (2026-11-21, commits 90f8362 and 173e0a2); with 128x256
# tiles (a quarter less L2 traffic per FLOP) 1.08-1.09x its 128x128 tiles over 12 shapes of 256-4096 rows, group_m 4
# and 8 tied (H200 sweep, 2026-11-21, session 5). FP8 keeps block_k = 128 (one activation scale per row per K step).
_FP8_TILES: tuple[tuple[int, TileConfig], ...] = (
    (16, TileConfig(16, 128, 128, num_warps=4, num_stages=4, tma=True)),
    (32, TileConfig(32, 128, 128, num_warps=4, num_stages=5, tma=True, persistent=2, flatten=True)),
    (128, TileConfig(64, 128, 128, num_warps=4, num_stages=4, tma=True, persistent=2, prefetch_scales=True)),
    (1 << 62, TileConfig(128, 256, 128, group_m=4, num_warps=8, num_stages=4, tma=True, persistent=1,
                         warp_specialize=True, gluon=True)),
)
# The Gluon kernels serve the contiguous layout only: the masked (decode) and dense layouts keep the Triton tiles
# they were tuned with above 128 rows. On GPUs other than Hopper the gluon tile runs on the Triton kernel
# (`run_gemm`), with the fields the Gluon kernels ignore (tma, persistent, num_warps).
_FP8_TRITON_TILES: tuple[tuple[int, TileConfig], ...] = (
    (256, _FP8_TILES[2][1]),
    (1 << 62, TileConfig(128, 128, 128, group_m=4, num_warps=8, num_stages=4, tma=True, persistent=1)),
)
_HALF_TILES: tuple[tuple[int, TileConfig], ...] = (
    (16, TileConfig(16, 128, 128, num_warps=4, num_stages=4)),
    (32, TileConfig(32, 64, 128, num_warps=4, num_stages=4)),
    (128, TileConfig(64, 256, 64, num_warps=4, num_stages=3)),
    (1 << 62, TileConfig(128, 256, 64, num_warps=8, num_stages=4, tma=True, persistent=1, flatten=True)),
)


def _first(table: tuple[tuple[int, TileConfig], ...], rows: int) -> TileConfig:
    return next(cfg for limit, cfg in table if rows <= limit)


def pick_tile(fp8: bool, rows_per_expert: int, n: int, k: int, layout: str = "contiguous") -> TileConfig:
    """The tile for a GEMM whose experts have about `rows_per_expert` rows each, N output columns and depth K, in
    `layout` ("contiguous", "masked" or "dense")."""
    cfg = _first(_FP8_TILES if fp8 else _HALF_TILES, rows_per_expert)
    if cfg.gluon and layout != "contiguous":
        cfg = _first(_FP8_TRITON_TILES, rows_per_expert)
    if not fp8 and k < cfg.block_k:  # tiny K (toy models): do not pad every K step to a wide block
        cfg = replace(cfg, block_k=max(16, 1 << (k - 1).bit_length()))
    return cfg


def _descriptor(t: torch.Tensor, block: tuple[int, int]):
    """A 2-D bulk-copy descriptor over `t` viewed as `[rows, K]`, or None where the copy engine cannot address it
    (it needs 16-byte aligned base and row stride)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    flat = t.reshape(-1, t.shape[-1]) if t.dim() == 3 and t.is_contiguous() else t
    if flat.dim() != 2 or flat.shape[0] == 0 or flat.data_ptr() % 16 or (flat.stride(0) * flat.element_size()) % 16:
        return None
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), list(block))


def run_gemm(
    layout: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, counts: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None, b_scale: torch.Tensor | None = None, config: TileConfig,
    expected_m: int | None = None,
) -> torch.Tensor:
    """Launch the GEMM mainloop on already-checked arguments (see `grouped_gemm`, `kernels.fp8_gemm.fp8_gemm`).

    layout "dense": a `[M, K]`, b `[N, K]`, out `[M, N]`; "contiguous": a `[M, K]`, b `[E, N, K]`, out `[M, N]`;
    "masked": a `[E, max_m, K]`, b `[E, N, K]`, out `[E, max_m, N]`. expected_m (masked): rows per expert to size
    the grid for; each program then walks its row tiles, so any count up to max_m is still covered.
    """
    from kernels.triton.gemm import gemm_kernel, gemm_persistent_kernel

    ensure_runnable(a.device)
    fp8 = a_scale is not None
    n, k = b.shape[-2], b.shape[-1]
    rows = a.shape[-2]
    grouped = layout != "dense"
    num_experts = b.shape[0] if grouped else 1
    masked = layout == "masked"
    cfg = config
    if fp8:
        require(cfg.block_k == ACT_GROUP and (ACT_GROUP % cfg.block_n == 0 or cfg.block_n % ACT_GROUP == 0),
                f"FP8 tiles need block_k == 128 and block_n dividing 128 or a multiple of it, got {cfg}")
    if cfg.gluon:
        if gluon_supported(layout, a, k, fp8):
            return run_gluon_fp8(a, b, out, counts, a_scale, b_scale, cfg)
        # With gluon, warp_specialize names the Gluon kernel's partitions: the Triton kernel runs unspecialized.
        cfg = replace(cfg, gluon=False, warp_specialize=False)
    num_n = -(-n // cfg.block_n)
    row_tiles = -(-rows // cfg.block_m)
    m_slots = row_tiles
    if masked:
        if expected_m is not None:
            m_slots = max(1, min(row_tiles, -(-expected_m // cfg.block_m)))
        programs = num_experts * m_slots * num_n
    elif grouped:
        programs = (row_tiles + num_experts) * num_n
    else:
        programs = row_tiles * num_n
    if programs == 0 or out.numel() == 0:
        return out
    a_src, b_src = a, b
    if cfg.tma:
        a_desc = _descriptor(a, (cfg.block_m, cfg.block_k))
        b_desc = _descriptor(b, (cfg.block_n, cfg.block_k))
        if a_desc is not None and b_desc is not None:
            a_src, b_src = a_desc, b_desc

    def lead(t: torch.Tensor | None, three_d: bool) -> tuple[int, int]:
        """(stride of the expert dim, stride of the row dim); the expert stride is 0 where there is none."""
        if t is None:
            return 0, 0
        return (t.stride(0), t.stride(1)) if three_d else (0, t.stride(0))

    a_strides = lead(a, masked)
    as_strides = (*lead(a_scale, masked), a_scale.stride(-1)) if fp8 else (0, 0, 0)
    b_strides = lead(b, grouped)
    bs_strides = ((b_scale.stride(0) if grouped else 0), b_scale.stride(-2), b_scale.stride(-1)) if fp8 else (0, 0, 0)
    c_strides = lead(out, masked)
    common = {
        "LAYOUT": _LAYOUT_CODE[layout], "FP8": fp8, "BLOCK_E": max(16, 1 << (num_experts - 1).bit_length()),
        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
        "EVEN_K": k % cfg.block_k == 0, "WIDEN": a.dtype == torch.bfloat16 and interpreting(),
        "TMA": a_src is not a, "WS": cfg.warp_specialize,
        "PREFETCH": cfg.prefetch_scales, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
    }
    strides = (*a_strides, *as_strides, *b_strides, *bs_strides, *c_strides)
    if cfg.persistent:
        # A bound on the tile count from the shapes alone (no host sync): never launch more programs than that.
        tiles = (num_experts * row_tiles if masked else row_tiles + (num_experts if grouped else 0)) * num_n
        grid = max(1, min(tiles, cfg.persistent * num_sms(a.device, interpreted=3)))
        gemm_persistent_kernel[(grid,)](
            a_src, a_scale, b_src, b_scale, out, counts, num_experts, rows, n, k, *strides,
            FLATTEN=cfg.flatten, **common,
        )
    else:
        gemm_kernel[(programs,)](
            a_src, a_scale, b_src, b_scale, out, counts, num_experts, rows, m_slots, n, k, *strides, **common,
        )
    return out


def _rows_per_expert(layout: Layout, a: torch.Tensor, num_experts: int, expected_m: int | None) -> int:
    """The rows per expert to pick a tile for. Masked with an expected count: twice that, so that one row tile still
    covers the experts that draw more than the mean (a second tile would stream the expert's weights again)."""
    if layout == "masked":
        return a.shape[1] if expected_m is None else min(a.shape[1], 2 * expected_m)
    if expected_m is not None:
        return expected_m
    return -(-a.shape[0] // max(num_experts, 1))


def grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, layout: Layout, *,
    a_scale: torch.Tensor | None = None, b_scale: torch.Tensor | None = None,
    expected_m: int | None = None, out: torch.Tensor | None = None, config: TileConfig | None = None,
) -> torch.Tensor:
    """Per-expert `C_e = A_e @ B_e^T` with fp32 accumulation, in Triton. Reference: `kernels.moe.grouped_gemm_ref`.

    a: contiguous `[M, K]`, expert e's `counts[e]` rows after those of experts < e; or masked `[E, max_m, K]`, the
       first `counts[e]` rows of expert e valid. bf16/fp16, or e4m3 with a_scale.
    b: `[E, N, K]`, a's dtype (e4m3 with b_scale).
    counts: `[E]` int32/int64 on a's device; read only on the device (no host sync).
    a_scale: `[..., ceil(K/128)]` float32, per row per 128 columns, any strides (rows-fastest reads best).
    b_scale: `[E, ceil(N/128), ceil(K/128)]` float32, per 128x128 block.
    expected_m: typical rows per expert, to pick tiles (default: M/E contiguous, max_m masked; see `pick_tile`) and,
       masked, to size the grid (each program walks several row tiles when an expert has more rows than that).
    out: optional output; config: optional `TileConfig` overriding `pick_tile`.
    Returns `[M, N]` or `[E, max_m, N]`, bf16 for FP8 else a's dtype; masked rows past `counts[e]` are not written.
    """
    require(layout in ("contiguous", "masked"), f"layout must be 'contiguous' or 'masked', got {layout!r}")
    masked = layout == "masked"
    fp8 = a_scale is not None or b_scale is not None
    require(a_scale is not None and b_scale is not None or not fp8, "FP8 needs both a_scale and b_scale")
    dtypes = (FP8,) if fp8 else HALF
    check_tensor(a, "a", dims=3 if masked else 2, dtypes=dtypes)
    check_tensor(b, "b", dims=3, dtypes=(a.dtype,))
    num_experts, n, k = b.shape
    require(a.shape[-1] == k, f"a has K = {a.shape[-1]} columns but b is `[E, N, K]` with K = {k}")
    if masked:
        require(a.shape[0] == num_experts, f"masked a has {a.shape[0]} experts, b has {num_experts}")
    check_counts(counts, "counts", num_experts)
    if fp8:
        groups_k, groups_n = -(-k // ACT_GROUP), -(-n // ACT_GROUP)
        check_tensor(a_scale, "a_scale", dims=a.dim(), dtypes=(torch.float32,), last_contiguous=False)
        check_shape(a_scale, "a_scale", (*a.shape[:-1], groups_k))
        check_tensor(b_scale, "b_scale", dims=3, dtypes=(torch.float32,), last_contiguous=False)
        check_shape(b_scale, "b_scale", (num_experts, groups_n, groups_k))
    out_dtype = torch.bfloat16 if fp8 else a.dtype
    shape = (*a.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=a.device)
    else:
        check_tensor(out, "out", dims=len(shape), dtypes=(out_dtype,))
        check_shape(out, "out", shape)
    check_same_device({"a": a, "b": b, "counts": counts, "a_scale": a_scale, "b_scale": b_scale, "out": out})
    cfg = config or pick_tile(fp8, _rows_per_expert(layout, a, num_experts, expected_m), n, k, layout)
    return run_gemm(layout, a, b, out, counts=counts, a_scale=a_scale, b_scale=b_scale, config=cfg,
                    expected_m=expected_m)


def _triton_supports(x: torch.Tensor, w13: torch.Tensor, fp8: bool) -> bool:
    return x.is_cuda and (w13.dtype == FP8 if fp8 else w13.dtype in HALF)


def grouped_mlp(
    tokens_hidden: torch.Tensor, tokens_per_expert: torch.Tensor, layout: Layout,
    w13: torch.Tensor, w2: torch.Tensor, *,
    w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
    hidden_scale: torch.Tensor | None = None, expected_m: int | None = None, backend: str = "auto",
) -> torch.Tensor:
    """Expert MLPs `down_e(silu(gate_e(x)) * up_e(x))` over dispatched tokens, answering in the same layout.

    tokens_hidden: contiguous `[N, H]` (rows grouped by expert) or masked `[E, max_m, H]`; bf16/fp16, or e4m3
      with hidden_scale `[..., H/128]` float32 (an FP8 dispatch).
    tokens_per_expert: `[E]` int32/int64 on the tokens' device (masked: valid rows per expert).
    w13: `[E, 2I, H]` (gate rows, then up rows), w2: `[E, H, I]`; bf16/fp16, or e4m3 with w13_scale
      `[E, 2I/128, H/128]` and w2_scale `[E, H/128, I/128]` float32 (the checkpoint's `weight_scale_inv` blocks).
    expected_m: typical rows per expert, to pick tiles (masked decode: the batch's mean rows per expert).
    backend: "triton", "torch" (the reference, `kernels.moe.grouped_mlp_ref`), or "auto": Triton for CUDA tensors
      with bf16/fp16/e4m3 weights, the reference otherwise (so CPU results are the reference's).
    Returns `[N, H]` or `[E, max_m, H]`: bf16 for FP8 weights, else the weights' dtype. Masked rows past
    `tokens_per_expert[e]` are zero from the reference and left unwritten by Triton: read only the valid rows.
    """
    require(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    require(layout in ("contiguous", "masked"), f"layout must be 'contiguous' or 'masked', got {layout!r}")
    fp8 = w13_scale is not None
    require((w2_scale is not None) == fp8, "FP8 experts need both w13_scale and w2_scale")
    if backend == "auto":
        backend = "triton" if _triton_supports(tokens_hidden, w13, fp8) else "torch"
    if backend == "torch":
        return grouped_mlp_ref(tokens_hidden, tokens_per_expert, layout, w13, w2, w13_scale=w13_scale,
                               w2_scale=w2_scale, hidden_scale=hidden_scale, expected_m=expected_m)
    check_tensor(w13, "w13", dims=3, dtypes=(FP8,) if fp8 else HALF)
    check_tensor(w2, "w2", dims=3, dtypes=(w13.dtype,))
    e, two_i, h = w13.shape
    require(two_i % 2 == 0, f"w13 holds gate rows then up rows: its dim 1 must be even, got {tuple(w13.shape)}")
    check_shape(w2, "w2", (e, h, two_i // 2))
    masked_m = tokens_per_expert if layout == "masked" else None
    gemm = {"expected_m": expected_m}
    if hidden_scale is not None and not fp8:
        tokens_hidden = dequantize_act(tokens_hidden, hidden_scale, w13.dtype)
    if fp8:
        if hidden_scale is None:
            x_q, x_s = act_quant(tokens_hidden, masked_m=masked_m)
        else:
            x_q, x_s = tokens_hidden, hidden_scale
        gate_up = grouped_gemm(x_q, w13, tokens_per_expert, layout, a_scale=x_s, b_scale=w13_scale, **gemm)
        act_q, act_s = silu_mul_quant(gate_up, masked_m=masked_m)
        return grouped_gemm(act_q, w2, tokens_per_expert, layout, a_scale=act_s, b_scale=w2_scale, **gemm)
    gate_up = grouped_gemm(tokens_hidden, w13, tokens_per_expert, layout, **gemm)
    return grouped_gemm(silu_mul(gate_up, masked_m=masked_m), w2, tokens_per_expert, layout, **gemm)
