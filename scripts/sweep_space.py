"""What `scripts/sweep_kernels.py` times: the shapes (grouped by the shape class whose config they pick), their
random inputs, the baselines, and the candidate configs of each class (the current default first).

The candidate lists are budgeted for a whole sweep of about 5 minutes on one H100: about 16 candidates where the
FP8 targets are (many rows per expert), fewer elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.act_quant import act_quant
from kernels.grouped_gemm import TileConfig, grouped_gemm, pick_tile
from kernels.mla_triton import MLADecodeConfig, default_config, mla_decode_triton

E4M3 = torch.float8_e4m3fn
GEMMS = {"gate_up": (4096, 7168), "down": (7168, 2048)}  # (N, K) of one expert's GEMM
MAX_M = 256  # masked decode buffers: rows per expert
PEAKS = {"hbm_gbps": None, "fp8_tflops": None, "bf16_tflops": None}  # filled by the sweep when measured


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@dataclass(frozen=True)
class Shape:
    kind: str  # "gemm" or "mla"
    cls: str  # the shape class: every shape of a class runs the same config
    name: str


@dataclass(frozen=True)
class GemmShape(Shape):
    fp8: bool = True
    layout: str = "contiguous"
    gemm: str = "gate_up"
    experts: int = 8
    rows: int = 512  # rows per expert (contiguous) or the mean rows per expert (masked, max_m MAX_M)

    @property
    def nk(self) -> tuple[int, int]:
        return GEMMS[self.gemm]

    def rows_per_expert(self) -> int:
        """What `grouped_gemm` picks the tile for (masked: twice the expected rows, at most max_m)."""
        return min(MAX_M, 2 * self.rows) if self.layout == "masked" else self.rows

    def make(self, device: str) -> dict:
        n, k = self.nk
        e, m = self.experts, self.rows
        g = torch.Generator(device="cpu").manual_seed(e * 1000 + m)
        if self.layout == "masked":
            counts = (m * (0.5 + torch.rand(e, generator=g))).round().clamp(1, MAX_M).long().to(device)
            x = torch.randn(e, MAX_M, k, device=device, dtype=torch.bfloat16)
        else:
            counts = torch.full((e,), m, dtype=torch.int64, device=device)
            x = torch.randn(e * m, k, device=device, dtype=torch.bfloat16)
        d = {"counts": counts, "x": x, "rows": int(counts.sum())}
        if self.fp8:
            # bf16 temporaries: several sweep processes hold their inputs at once
            d["w"] = torch.randn(e, n, k, device=device, dtype=torch.bfloat16).mul_(96).clamp_(-448, 448).to(E4M3)
            d["ws"] = torch.rand(e, -(-n // 128), -(-k // 128), device=device) * 1e-4 + 1e-4
            d["xq"], d["xs"] = act_quant(x, masked_m=counts if self.layout == "masked" else None)
            if self.layout == "contiguous":  # row-wise scales for torch's kernels
                d["ws_row"] = torch.rand(e, n, device=device) * 1e-4 + 1e-4
                d["xs_row"] = torch.rand(e * m, device=device) + 0.5
        else:
            d["w"] = torch.randn(e, n, k, device=device, dtype=torch.bfloat16) * 0.02
        d["offs"] = torch.arange(1, e + 1, device=device, dtype=torch.int32) * m
        return d

    def fn(self, d: dict, cfg: TileConfig):
        expected = self.rows if self.layout == "masked" else None
        if self.fp8:
            return lambda: grouped_gemm(d["xq"], d["w"], d["counts"], self.layout, a_scale=d["xs"], b_scale=d["ws"],
                                        expected_m=expected, config=cfg)
        return lambda: grouped_gemm(d["x"], d["w"], d["counts"], self.layout, expected_m=expected, config=cfg)

    def baselines(self) -> list[str]:
        if self.layout != "contiguous":
            return []
        return ["torch._scaled_grouped_mm fp8 row"] if self.fp8 else ["torch._grouped_mm bf16"]

    def baseline(self, d: dict, label: str):
        if self.fp8:
            return lambda: torch._scaled_grouped_mm(d["xq"], d["w"].transpose(1, 2), d["xs_row"], d["ws_row"],
                                                    offs=d["offs"], out_dtype=torch.bfloat16)
        return lambda: torch._grouped_mm(d["x"], d["w"].transpose(1, 2), offs=d["offs"], out_dtype=torch.bfloat16)

    def check(self, d: dict, fn) -> dict:
        """Relative error against the default config's output (valid rows only)."""
        if "ref" not in d:
            d["ref"] = self.fn(d, default_tile(self))()
        y, ref = fn(), d["ref"]
        if self.layout == "masked":
            ok = torch.arange(MAX_M, device=y.device)[None, :] < d["counts"][:, None]
            y, ref = y[ok], ref[ok]
        return {"rel_err": _rel(y, ref)}

    def rate(self, ms: float) -> str:
        n, k = self.nk
        if self.layout == "masked":
            size = 1 if self.fp8 else 2
            rows = self.experts * self.rows  # about: the mean times the experts
            gbps = (self.experts * n * k * size + rows * k * size + rows * n * 2) / (ms * 1e-3) / 1e9
            peak = PEAKS["hbm_gbps"]
            return f"{gbps:6.0f} GB/s" + (f" {gbps / peak:4.0%} of HBM" if peak else "")
        tf = 2 * self.experts * self.rows * n * k / (ms * 1e-3) / 1e12
        peak = PEAKS["fp8_tflops" if self.fp8 else "bf16_tflops"]
        return f"{tf:6.0f} TFLOP/s" + (f" {tf / peak:4.0%} of peak" if peak else "")


@dataclass(frozen=True)
class MlaShape(Shape):
    batch: int = 64
    ctx: int = 2048

    def make(self, device: str) -> dict:
        from bench_mla import decode_case

        return {"case": decode_case(self.batch, self.ctx, device)}

    def fn(self, d: dict, cfg: MLADecodeConfig):
        return lambda: mla_decode_triton(*d["case"], config=cfg)

    def baselines(self) -> list[str]:
        return ["flashinfer"]

    def baseline(self, d: dict, label: str):
        """flashinfer (made here, not in the compile probe: its kernels compile with nvcc on the first call)."""
        from kernels.attention_backend import create_attention_backend

        backend = create_attention_backend("flashinfer", device=d["case"][0].device, dtype=torch.bfloat16,
                                           kv_lora_rank=512, rope_dim=64)
        return lambda: backend.decode(*d["case"])

    def check(self, d: dict, fn) -> dict:
        if "ref" not in d:
            d["ref"] = mla_decode_triton(*d["case"], config=default_config(torch.bfloat16))
        return {"rel_err": _rel(fn(), d["ref"])}

    def rate(self, ms: float) -> str:
        gbps = self.batch * self.ctx * 576 * 2 / (ms * 1e-3) / 1e9
        return f"{gbps:6.0f} GB/s of cache"


def _gemm_shapes() -> list[GemmShape]:
    out = []

    def add(cls, fp8, layout, pairs):
        for gemm, e, m in pairs:
            lay = "masked" if layout == "masked" else "contig"
            name = f"{'fp8' if fp8 else 'bf16'} {gemm} {lay} E{e} {'mean' if layout == 'masked' else 'm'}{m}"
            out.append(GemmShape("gemm", cls, name, fp8=fp8, layout=layout, gemm=gemm, experts=e, rows=m))

    add("fp8 rows<=16", True, "contiguous", [("gate_up", 8, 16), ("down", 8, 16)])
    add("fp8 rows<=16", True, "masked", [("gate_up", 8, 8), ("down", 8, 8)])
    add("fp8 rows<=32", True, "contiguous", [("gate_up", 8, 32), ("down", 8, 32)])
    add("fp8 rows<=32", True, "masked", [("gate_up", 32, 16), ("down", 32, 16)])
    add("fp8 rows<=128", True, "contiguous", [("gate_up", 8, 64), ("gate_up", 8, 128), ("down", 8, 128)])
    add("fp8 rows<=128", True, "masked", [("down", 8, 32)])
    add("fp8 rows>128", True, "contiguous", [("gate_up", 8, 256), ("down", 8, 256), ("gate_up", 8, 512),
                                             ("gate_up", 8, 1024), ("gate_up", 8, 4096), ("gate_up", 32, 512),
                                             ("down", 8, 512), ("down", 8, 1024), ("down", 8, 4096),
                                             ("down", 32, 512), ("gate_up", 64, 1024), ("down", 64, 4096)])
    add("bf16 rows<=16", False, "masked", [("gate_up", 8, 8), ("down", 8, 8)])
    add("bf16 rows>128", False, "contiguous", [("gate_up", 8, 4096), ("gate_up", 32, 512), ("down", 8, 512)])
    return out


GEMM_SHAPES: list[Shape] = list(_gemm_shapes())
MLA_SHAPES: list[Shape] = [MlaShape("mla", "mla decode", f"mla B{b} ctx{c}", batch=b, ctx=c)
                           for b, c in ((64, 2048), (128, 4096), (16, 8192))]


def default_tile(shape: GemmShape) -> TileConfig:
    n, k = shape.nk
    return pick_tile(shape.fp8, shape.rows_per_expert(), n, k, shape.layout)


def _t(bm, bn, bk, w, s, *flags, **kw) -> TileConfig:
    """TileConfig from (block_m, block_n, block_k, num_warps, num_stages, "tma", "flat", "ws", p=programs/SM)."""
    return TileConfig(bm, bn, bk, num_warps=w, num_stages=s, tma="tma" in flags, flatten="flat" in flags,
                      warp_specialize="ws" in flags, prefetch_scales="pf" in flags, gluon="gluon" in flags,
                      persistent=kw.pop("p", 0), **kw)


# Why these: persistent programs (p1/p2) end the half-empty last wave and, flattened, keep the loads of the next tile
# in flight while the current one finishes (short K loops at decode, the epilogue at large M); block_n 256 doubles
# the MMA work per loaded A tile (FP8 then applies one weight scale per column); 2 programs per multiprocessor (3
# stages of 32 KB) let one program's scaling run while the other's MMAs do; warp specialization where Triton 3.6
# supports it on Hopper; 16 warps halve the registers per thread of the 256-wide tiles. The FP8 lists of the second
# sweep ("pf") fetch the block scales one K step ahead: Triton leaves them as plain loads whose latency stalled every
# K step (seen in the TTGIR of the Triton 3.6 build); 64-row tiles with 2-3 programs a multiprocessor let one
# program's scaling overlap another's MMAs. "gluon": the Gluon kernel (kernels/triton/gemm_gluon.py), which scales
# one K step's product while the next one multiplies; "gluon" with "ws": its warp-specialized persistent form
# (kernels/triton/gemm_gluon_ws.py: a TMA producer warp, two consumer warpgroups that hand ring slots back each on
# its own instead of a CTA barrier per K step, so one's scaling runs under the other's MMAs); at 128x256 it reads
# 48 KB a K step for twice the MMA work of 128x128's 32 KB (L2 traffic per FLOP down by a quarter).
_CANDIDATES = {
    "fp8 rows<=16": [
        _t(16, 128, 128, 4, 4, "tma", "pf"), _t(16, 64, 128, 4, 5, "tma", "flat", "pf", p=2),
        _t(16, 128, 128, 4, 5, "tma", "flat", "pf", p=2), _t(16, 64, 128, 4, 6, "tma", "pf"),
        _t(16, 128, 128, 4, 6, "tma", "pf"), _t(16, 64, 128, 4, 5, "tma"),
    ],
    "fp8 rows<=32": [
        _t(32, 128, 128, 4, 5, "tma", "flat", "pf", p=2), _t(32, 64, 128, 4, 5, "tma", "pf"),
        _t(32, 128, 128, 4, 4, "tma", "pf"),
    ],
    "fp8 rows<=128": [
        _t(64, 128, 128, 4, 4, "gluon"), _t(128, 128, 128, 4, 4, "gluon", "ws", p=1),
    ],
    "fp8 rows>128": [
        _t(64, 128, 128, 4, 4, "tma", "pf", p=2), _t(128, 128, 128, 8, 5, "gluon"),
        _t(128, 128, 128, 4, 4, "gluon", "ws", p=1), _t(128, 256, 128, 4, 4, "gluon", "ws", p=1),
        _t(128, 256, 128, 4, 3, "gluon", "ws", p=1, group_m=4), _t(128, 256, 128, 4, 4, "gluon", "ws", group_m=4),
    ],
    "bf16 rows<=16": [
        _t(16, 128, 128, 4, 4, "tma", "flat", p=2), _t(16, 128, 128, 4, 5, "tma", "flat", p=4),
        _t(16, 64, 128, 4, 6, "tma", "flat", p=4),
    ],
    "bf16 rows>128": [
        _t(128, 256, 64, 8, 4, "tma", "flat", p=1), _t(128, 256, 64, 8, 3, "tma", "flat", p=1),
        _t(128, 128, 64, 8, 4, "tma", "flat", p=2), _t(128, 256, 64, 8, 4, "tma", "ws"),
    ],
}
# MLA: the first sweep (lazy rescale 0.78-0.89x, 16 warps 0.5x, block_n 32 0.77x, 2 splits 0.8x the default) chose
# split_qk with 4 stages. Its build has every wgmma serialised by ptxas (warning C7515: the PV product runs across the
# loop's back edge while the branchy score code of the next block runs); qk_in_branch places the score products in
# both arms of the mask branch, which removes that, at the cost of waiting for PV inside its own iteration. 32-token
# blocks then fit three row buffers (gathers two blocks ahead). gluon: the warp-specialized Gluon kernel
# (kernels/triton/mla_decode_gluon.py).
_MLA = [
    MLADecodeConfig(num_stages=4, split_qk=True),
    MLADecodeConfig(num_stages=4, split_qk=True, qk_in_branch=True),
    MLADecodeConfig(num_stages=3, split_qk=True, qk_in_branch=True),
    MLADecodeConfig(block_n=32, num_stages=5, split_qk=True, qk_in_branch=True),
    MLADecodeConfig(block_n=32, num_stages=6, split_qk=True, qk_in_branch=True),
    MLADecodeConfig(num_stages=4, split_qk=True, qk_in_branch=True, num_splits=2),
    MLADecodeConfig(block_n=32, num_stages=5, split_qk=True, qk_in_branch=True, num_splits=2),
]


def candidates(shape: Shape) -> list[tuple[str, object | None]]:
    """(label, config) pairs of one shape: the default, the baselines (config None), then the candidates."""
    if isinstance(shape, MlaShape):
        base = default_config(torch.bfloat16)
        out = [("default", base)] + [(b, None) for b in shape.baselines()]
        return out + [(c.short(), c) for c in _MLA if c != base]
    base = default_tile(shape)
    out = [("default", base)] + [(b, None) for b in shape.baselines()]
    seen = {base}
    for cfg in _CANDIDATES[shape.cls]:
        if cfg not in seen:
            seen.add(cfg)
            out.append((cfg.short(), cfg))
    return out

