"""Kernel benchmarks on one GPU, everything side by side in one run, against ceilings measured in the same run.

    python scripts/bench_kernels.py [--json FILE] [--tune] [--quick]

- Ceilings: HBM copy bandwidth (bytes read + written), bf16 `torch.mm` 8192^3, fp8 `torch._scaled_mm` 8192^3
  (one scale per tensor, fast accumulation: the fastest FP8 product torch has).
- Grouped GEMM, contiguous layout, DeepSeek-V3 expert shapes (gate_up N=4096 K=7168; down N=7168 K=2048) with 8, 32
  and 64 local experts and 16..4096 rows each: our Triton bf16 and block-scaled FP8 kernels against
  `torch._grouped_mm` (bf16), `torch._scaled_grouped_mm` (FP8 row-wise scales; with and without fast accumulation)
  and a per-expert `torch._scaled_mm` loop (row-wise), in TFLOP/s and as a share of the dense peak of their dtype.
- Masked layout at decode sizes (few rows per expert): share of HBM bandwidth (weights of experts with rows, plus
  activations in and out), per GEMM and for the whole FP8 expert MLP; timed launched one by one ("eager": the
  host's launch work is inside the time when the kernel is shorter than it) and replayed from a CUDA graph, as the
  engine's decode steps run them (`engine/cuda_graph.py`).
- Activation quantization and SiLU-and-mul + quantization: share of HBM bandwidth.
- Dense W8A8 block-scaled GEMM at DeepSeek-V3 projection shapes against `torch._scaled_mm` (row-wise) and bf16 mm.
- MLA decode and router rows from scripts/bench_mla.py (`run(device)`), when that file is there.
--tune times candidate tiles per shape class first and prints the fastest. `scripts/sweep_kernels.py` is the wider
sweep (persistent, 256-wide, warp-specialized GEMM variants and MLA tilings, compile failures isolated), the source
of kernels.grouped_gemm's tables. Times are `triton.testing.do_bench` medians after warm-up, on random data.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.bench import git_commit  # noqa: E402
from kernels.act_quant import act_quant, silu_mul_quant  # noqa: E402
from kernels.fp8_gemm import fp8_gemm  # noqa: E402
from kernels.grouped_gemm import TileConfig, grouped_gemm, grouped_mlp  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_kernels_report import grouped_table, share_table, targets  # noqa: E402

E4M3 = torch.float8_e4m3fn
GEMMS = {"gate_up": (4096, 7168), "down": (7168, 2048)}  # name: (N, K) of one expert's GEMM
EXPERTS = (8, 32, 64)
ROWS = (16, 64, 256, 512, 1024, 4096)
DECODE = [(8, 8), (8, 32), (32, 8), (32, 32), (64, 16)]  # (experts, mean rows per expert)
DECODE_MAX_M = 256
DENSE = {"q_b_proj": (24576, 1536), "o_proj": (7168, 16384), "shared gate_up": (4096, 7168)}  # name: (N, K)
DENSE_ROWS = (128, 4096)


_DEADLINE = [float("inf")]  # perf_counter() after which no new case starts (--budget-s)


def out_of_time() -> bool:
    return time.perf_counter() > _DEADLINE[0]


def time_ms(fn, quick: bool = False, graph: bool = False) -> float:
    """`fn`'s median time per call: launched one by one, or (graph) replayed from a CUDA graph, which leaves out the
    host's launch and argument-packing work."""
    import triton.testing

    if out_of_time():
        raise TimeoutError("skipped: --budget-s spent")
    fn()  # compile / plan outside the timing
    torch.cuda.synchronize()
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 60, return_mode="median")
    return triton.testing.do_bench(fn, warmup=5 if quick else 10, rep=20 if quick else 60, return_mode="median")


def guarded(fn):
    """Run `fn() -> ms`; an unavailable baseline or a failing launch is reported, not fatal."""
    try:
        return fn(), ""
    except Exception as exc:  # noqa: BLE001 - the message goes into the table
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


# --- data -------------------------------------------------------------------------------------------------------


def fp8_weights(e: int, n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 `[E, N, K]` spread over e4m3's range, with positive 128x128 block scales."""
    w = (torch.randn(e, n, k, device=device) * 96).clamp(-448, 448).to(E4M3)
    s = torch.rand(e, -(-n // 128), -(-k // 128), device=device) * 1e-4 + 1e-4
    return w, s


def contiguous_case(e: int, m: int, n: int, k: int, device):
    x = torch.randn(e * m, k, device=device, dtype=torch.bfloat16)
    counts = torch.full((e,), m, dtype=torch.int64, device=device)
    return x, counts


# --- ceilings ---------------------------------------------------------------------------------------------------


def ceilings(device) -> dict:
    src = torch.randn(1 << 28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    hbm = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    bf16 = 2 * n**3 / (time_ms(lambda: a @ b) * 1e-3) / 1e12
    a8, b8 = a.to(E4M3), b.to(E4M3)
    one = torch.ones((), device=device)
    fp8 = 2 * n**3 / (time_ms(lambda: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16,
                                                       use_fast_accum=True)) * 1e-3) / 1e12
    return dict(hbm_gbps=hbm, bf16_tflops=bf16, fp8_tflops=fp8)


# --- tuning -----------------------------------------------------------------------------------------------------

def _tiles(*specs) -> list[TileConfig]:
    """(block_m, block_n, block_k, num_warps, num_stages[, "tma"]) -> TileConfig."""
    return [TileConfig(*c[:3], num_warps=c[3], num_stages=c[4], tma="tma" in c[5:]) for c in specs]


_TUNE_FP8 = _tiles(
    (16, 64, 128, 4, 4), (16, 64, 128, 4, 6), (16, 64, 128, 4, 5, "tma"), (16, 128, 128, 4, 4), (32, 64, 128, 4, 5),
    (32, 64, 128, 4, 5, "tma"), (16, 32, 128, 2, 6), (64, 64, 128, 4, 4), (64, 128, 128, 4, 3, "tma"),
    (64, 128, 128, 4, 4), (64, 128, 128, 4, 4, "tma"), (64, 128, 128, 4, 5, "tma"), (128, 64, 128, 4, 4, "tma"),
    (128, 128, 128, 8, 3, "tma"), (128, 128, 128, 8, 4), (128, 128, 128, 8, 4, "tma"), (128, 128, 128, 8, 5, "tma"),
)
_TUNE_BF16 = _tiles(
    (16, 64, 128, 4, 4), (16, 64, 128, 4, 6), (16, 64, 128, 4, 5, "tma"), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4),
    (64, 128, 64, 4, 4), (64, 256, 64, 4, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4), (128, 256, 64, 8, 3, "tma"), (128, 256, 64, 8, 4, "tma"),
)
_TUNE_ROWS = (16, 64, 256, 1024, 4096)


def tune(device, quick: bool) -> list[dict]:
    rows = []
    e = 8
    for gemm, (n, k) in GEMMS.items():
        w16 = torch.randn(e, n, k, device=device, dtype=torch.bfloat16) * 0.02
        w8, ws = fp8_weights(e, n, k, device)
        for m in _TUNE_ROWS:
            x, counts = contiguous_case(e, m, n, k, device)
            xq, xs = act_quant(x)
            for fp8, cands in ((True, _TUNE_FP8), (False, _TUNE_BF16)):
                best = None
                for cfg in cands:
                    if cfg.block_m > 2 * max(m, 16) or (m >= 1024 and cfg.block_m < 64):
                        continue  # far too tall for the class, or too short to matter at large rows
                    if fp8:
                        args, kwargs = (xq, w8), {"a_scale": xs, "b_scale": ws}
                    else:
                        args, kwargs = (x, w16), {}
                    ms, err = guarded(lambda: time_ms(
                        lambda: grouped_gemm(*args, counts, "contiguous", config=cfg, **kwargs), quick=True))
                    tflops = 2 * e * m * n * k / (ms * 1e-3) / 1e12 if ms else None
                    rows.append(dict(section="tune", gemm=gemm, dtype="fp8" if fp8 else "bf16", experts=e, rows=m,
                                     config=cfg.__dict__, ms=ms, tflops=tflops, note=err))
                    if ms and (best is None or ms < best[0]):
                        best = (ms, cfg)
                if best:
                    print(f"tune {gemm:<8} {'fp8' if fp8 else 'bf16':<5} rows {m:>5}: best {best[1]} "
                          f"{2 * e * m * n * k / (best[0] * 1e-3) / 1e12:.0f} TFLOP/s", flush=True)
        torch.cuda.empty_cache()
    return rows


# --- grouped, contiguous ----------------------------------------------------------------------------------------


def bench_contiguous(device, peaks: dict, experts, rows_list, quick: bool) -> list[dict]:
    out = []
    for gemm, (n, k) in GEMMS.items():
        for e in experts:
            w16 = torch.randn(e, n, k, device=device, dtype=torch.bfloat16) * 0.02
            w8, ws = fp8_weights(e, n, k, device)
            ws_row = torch.rand(e, n, device=device) * 1e-4 + 1e-4  # row-wise weight scales for torch's kernels
            for m in rows_list:
                x, counts = contiguous_case(e, m, n, k, device)
                xq, xs = act_quant(x)
                xs_row = torch.rand(e * m, device=device) + 0.5
                offs = torch.arange(1, e + 1, device=device, dtype=torch.int32) * m
                flops = 2 * e * m * n * k

                def loop():
                    for i in range(e):
                        torch._scaled_mm(xq[i * m:(i + 1) * m], w8[i].t(), xs_row[i * m:(i + 1) * m, None],
                                         ws_row[i][None, :], out_dtype=torch.bfloat16, use_fast_accum=True)

                impls = {
                    "triton bf16": ("bf16", lambda: grouped_gemm(x, w16, counts, "contiguous")),
                    "torch._grouped_mm bf16": ("bf16", lambda: torch._grouped_mm(
                        x, w16.transpose(1, 2), offs=offs, out_dtype=torch.bfloat16)),
                    "triton fp8 block": ("fp8", lambda: grouped_gemm(xq, w8, counts, "contiguous", a_scale=xs,
                                                                     b_scale=ws)),
                    "torch._scaled_grouped_mm fp8 row": ("fp8", lambda: torch._scaled_grouped_mm(
                        xq, w8.transpose(1, 2), xs_row, ws_row, offs=offs, out_dtype=torch.bfloat16)),
                    "torch._scaled_grouped_mm fp8 row fast": ("fp8", lambda: torch._scaled_grouped_mm(
                        xq, w8.transpose(1, 2), xs_row, ws_row, offs=offs, out_dtype=torch.bfloat16,
                        use_fast_accum=True)),
                    "torch._scaled_mm loop fp8 row fast": ("fp8", loop),
                }
                for name, (dt, fn) in impls.items():
                    ms, err = guarded(lambda: time_ms(fn, quick))
                    tf = flops / (ms * 1e-3) / 1e12 if ms else None
                    peak = peaks["fp8_tflops" if dt == "fp8" else "bf16_tflops"]
                    out.append(dict(section="grouped contiguous", gemm=gemm, experts=e, rows=m, impl=name,
                                    dtype=dt, ms=ms, tflops=tf, peak_share=tf / peak if tf else None, note=err))
                    print(f"  {gemm:<8} E={e:<3} rows={m:<5} {name:<38} "
                          + (f"{ms * 1e3:9.1f} us {tf:7.0f} TFLOP/s {tf / peak:6.1%}" if ms else f"n/a {err}"),
                          flush=True)
            torch.cuda.empty_cache()
    return out


# --- masked decode ----------------------------------------------------------------------------------------------


def masked_rows(fn, nbytes: int, peaks: dict, quick: bool, **case) -> list[dict]:
    """One result row per timing of a masked-decode case ("eager", then "graph"): time, bandwidth, share of HBM."""
    rows = []
    for timing in ("eager", "graph"):
        ms, err = guarded(lambda: time_ms(fn, quick, graph=timing == "graph"))
        gbps = nbytes / (ms * 1e-3) / 1e9 if ms else None
        impl = f"triton {case['dtype']}{' mlp' if case['gemm'] == 'mlp' else ''} {timing}"
        rows.append(dict(section="masked decode", max_m=DECODE_MAX_M, impl=impl, timing=timing, ms=ms, gbps=gbps,
                         hbm_share=gbps / peaks["hbm_gbps"] if gbps else None, note=err, **case))
    return rows


def bench_masked(device, peaks: dict, quick: bool) -> list[dict]:
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for e, mean in DECODE:
        counts_cpu = (mean * (0.5 + torch.rand(e, generator=g))).round().clamp(1, DECODE_MAX_M).long()
        counts = counts_cpu.to(device)
        rows = int(counts_cpu.sum())
        for gemm, (n, k) in GEMMS.items():
            x = torch.randn(e, DECODE_MAX_M, k, device=device, dtype=torch.bfloat16)
            xq, xs = act_quant(x, masked_m=counts)
            w16 = torch.randn(e, n, k, device=device, dtype=torch.bfloat16) * 0.02
            w8, ws = fp8_weights(e, n, k, device)
            for dt, fn in (
                ("bf16", lambda: grouped_gemm(x, w16, counts, "masked", expected_m=mean)),
                ("fp8", lambda: grouped_gemm(xq, w8, counts, "masked", a_scale=xs, b_scale=ws, expected_m=mean)),
            ):
                size = 2 if dt == "bf16" else 1
                nbytes = e * n * k * size + rows * k * size + rows * n * 2
                for row in masked_rows(fn, nbytes, peaks, quick, gemm=gemm, experts=e, rows=mean, dtype=dt):
                    out.append(row)
                    print(f"  masked {gemm:<8} E={e:<3} mean rows={mean:<3} {dt:<5} {row['timing']:<5} "
                          + (f"{row['ms'] * 1e3:8.1f} us {row['gbps']:6.0f} GB/s {row['hbm_share']:6.1%}"
                             if row["ms"] else row["note"]), flush=True)
        # The whole FP8 expert MLP at this decode size (act quant, gate_up, SiLU-and-mul + quant, down).
        two_i, h = GEMMS["gate_up"]
        w13, s13 = fp8_weights(e, two_i, h, device)
        w2, s2 = fp8_weights(e, h, two_i // 2, device)
        x = torch.randn(e, DECODE_MAX_M, h, device=device, dtype=torch.bfloat16)
        nbytes = w13.numel() + w2.numel() + rows * h * 4
        def mlp():
            return grouped_mlp(x, counts, "masked", w13, w2, w13_scale=s13, w2_scale=s2, expected_m=mean)

        out += masked_rows(mlp, nbytes, peaks, quick, gemm="mlp", experts=e, rows=mean, dtype="fp8")
        torch.cuda.empty_cache()
    return out


# --- elementwise and dense --------------------------------------------------------------------------------------


def bench_act(device, peaks: dict, quick: bool) -> list[dict]:
    out = []
    m = 16384
    x = torch.randn(m, 7168, device=device, dtype=torch.bfloat16)
    h = torch.randn(m, 4096, device=device, dtype=torch.bfloat16)
    for name, fn, nbytes in (
        ("act_quant [16384, 7168]", lambda: act_quant(x), m * 7168 * 3 + m * 56 * 4),
        ("silu_mul_quant [16384, 4096]", lambda: silu_mul_quant(h), m * 4096 * 2 + m * 2048 + m * 16 * 4),
    ):
        ms, err = guarded(lambda: time_ms(fn, quick))
        gbps = nbytes / (ms * 1e-3) / 1e9 if ms else None
        out.append(dict(section="activation", impl=name, ms=ms, gbps=gbps,
                        hbm_share=gbps / peaks["hbm_gbps"] if gbps else None, note=err))
    return out


def bench_dense(device, peaks: dict, quick: bool) -> list[dict]:
    out = []
    for name, (n, k) in DENSE.items():
        w8 = (torch.randn(n, k, device=device) * 96).clamp(-448, 448).to(E4M3)
        ws = torch.rand(-(-n // 128), -(-k // 128), device=device) * 1e-4 + 1e-4
        w16 = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        ws_row = torch.rand(1, n, device=device) + 0.5
        for m in DENSE_ROWS:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            xq, xs = act_quant(x)
            xs_row = torch.rand(m, 1, device=device) + 0.5
            for impl, dt, fn in (
                ("triton fp8 block", "fp8", lambda: fp8_gemm(xq, xs, w8, ws)),
                ("torch._scaled_mm fp8 row fast", "fp8", lambda: torch._scaled_mm(
                    xq, w8.t(), xs_row, ws_row, out_dtype=torch.bfloat16, use_fast_accum=True)),
                ("torch mm bf16", "bf16", lambda: x @ w16.t()),
            ):
                ms, err = guarded(lambda: time_ms(fn, quick))
                tf = 2 * m * n * k / (ms * 1e-3) / 1e12 if ms else None
                peak = peaks["fp8_tflops" if dt == "fp8" else "bf16_tflops"]
                out.append(dict(section="dense", gemm=name, rows=m, impl=impl, dtype=dt, ms=ms, tflops=tf,
                                peak_share=tf / peak if tf else None, note=err))
    torch.cuda.empty_cache()
    return out


def bench_mla(device) -> tuple[list[dict], str]:
    path = ROOT / "scripts" / "bench_mla.py"
    if not path.exists():
        return [], ""
    spec = importlib.util.spec_from_file_location("bench_mla", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.run(device)
    table = mod.format_table(rows) if hasattr(mod, "format_table") else "\n".join(json.dumps(r) for r in rows)
    return [dict(section="mla", **r) for r in rows], table


# --- report -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write every row (and the ceilings) here as JSON lines")
    p.add_argument("--tune", action="store_true", help="first time candidate tiles per shape class")
    p.add_argument("--sections", default="grouped,masked,act,dense,mla",
                   help="comma-separated subset of grouped,masked,act,dense,mla to run (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and shorter timings (a smoke run)")
    p.add_argument("--budget-s", type=float, help="start no new timing after this many seconds (report the rest n/a)")
    args = p.parse_args(argv)
    if args.budget_s:
        _DEADLINE[0] = time.perf_counter() + args.budget_s
    if not torch.cuda.is_available():
        print("error: bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.manual_seed(0)
    commit = git_commit()  # WIDEEP_COMMIT first: a tree copied to a GPU machine may carry a stale .git
    header = (f"# {torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, "
              f"triton {__import__('triton').__version__}, commit {commit}")
    print(header, flush=True)
    peaks = ceilings(device)
    print(f"# ceilings: HBM copy {peaks['hbm_gbps']:.0f} GB/s, bf16 mm {peaks['bf16_tflops']:.0f} TFLOP/s, "
          f"fp8 _scaled_mm {peaks['fp8_tflops']:.0f} TFLOP/s", flush=True)
    rows: list[dict] = [dict(section="ceilings", **peaks)]
    sections = []
    if args.tune:
        rows += tune(device, args.quick)
    wanted = set(args.sections.split(",")) if args.sections else set()
    for name, fn in (
        ("grouped", lambda: bench_contiguous(device, peaks, EXPERTS[1:2] if args.quick else EXPERTS,
                                             (16, 512) if args.quick else ROWS, args.quick)),
        ("masked", lambda: bench_masked(device, peaks, args.quick)),
        ("act", lambda: bench_act(device, peaks, args.quick)),
        ("dense", lambda: bench_dense(device, peaks, args.quick)),
    ):
        if name not in wanted:
            continue
        try:
            part = fn()
        except Exception:  # noqa: BLE001 - one broken section must not hide the others
            traceback.print_exc()
            part = []
        rows += part
        sections.append((name, part))
    mla_rows, mla_table = [], ""
    if "mla" in wanted:
        try:
            mla_rows, mla_table = bench_mla("cuda")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    rows += mla_rows
    print()
    print(header)
    print(f"ceilings: HBM copy {peaks['hbm_gbps']:.0f} GB/s, bf16 mm 8192^3 {peaks['bf16_tflops']:.0f} TFLOP/s, "
          f"fp8 _scaled_mm 8192^3 {peaks['fp8_tflops']:.0f} TFLOP/s")
    part = dict(sections)
    if part.get("grouped"):
        print(grouped_table(part["grouped"], list(GEMMS)))
    if part.get("masked"):
        print(share_table(part["masked"], f"masked layout, decode (max_m {DECODE_MAX_M}, rows per expert = mean):"))
    if part.get("act"):
        print(share_table(part["act"], "activation kernels:"))
    if part.get("dense"):
        print(share_table(part["dense"], "dense W8A8 (share of its dtype's peak):"))
    if mla_table:
        print("MLA decode / router (scripts/bench_mla.py):")
        print(mla_table)
    for line in targets(rows):
        print(line)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
