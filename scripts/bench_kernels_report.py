"""The tables and the target lines of `scripts/bench_kernels.py`, from its result rows (one dict per timed case)."""

from __future__ import annotations


def grouped_table(rows: list[dict], gemm_order: list[str]) -> str:
    """The contiguous grouped GEMM table, GEMMs in `gemm_order`, then by experts and rows per expert."""
    impls = ["triton bf16", "torch._grouped_mm bf16", "triton fp8 block", "torch._scaled_grouped_mm fp8 row",
             "torch._scaled_grouped_mm fp8 row fast", "torch._scaled_mm loop fp8 row fast"]
    short = ["tri bf16", "_grouped_mm", "tri fp8", "_sgmm fp8", "_sgmm fast", "_smm loop"]
    lines = ["TFLOP/s (share of the dense peak of its dtype); last column: triton fp8 / _scaled_grouped_mm fp8",
             f"{'gemm':<8} {'E':>3} {'rows':>5} " + " ".join(f"{s:>14}" for s in short) + f" {'fp8 ratio':>10}"]
    keys = sorted({(r["gemm"], r["experts"], r["rows"]) for r in rows},
                  key=lambda t: (gemm_order.index(t[0]), t[1], t[2]))
    for key in keys:
        cells, by = [], {r["impl"]: r for r in rows if (r["gemm"], r["experts"], r["rows"]) == key}
        for impl in impls:
            r = by.get(impl)
            cells.append(f"{r['tflops']:6.0f} ({r['peak_share']:4.0%})" if r and r["tflops"] else f"{'n/a':>14}")
        ours, theirs = by.get("triton fp8 block"), by.get("torch._scaled_grouped_mm fp8 row")
        ratio = f"{ours['tflops'] / theirs['tflops']:.2f}x" if ours and theirs and ours["tflops"] and theirs[
            "tflops"] else "n/a"
        lines.append(f"{key[0]:<8} {key[1]:>3} {key[2]:>5} " + " ".join(f"{c:>14}" for c in cells) + f" {ratio:>10}")
    return "\n".join(lines)


def share_table(rows: list[dict], title: str) -> str:
    lines = [title]
    for r in rows:
        label = " ".join(str(r[k]) for k in ("gemm", "experts", "rows", "impl") if k in r)
        if r.get("ms"):
            extra = (f"{r['gbps']:6.0f} GB/s {r['hbm_share']:5.0%} of HBM" if "gbps" in r
                     else f"{r['tflops']:6.0f} TFLOP/s {r['peak_share']:5.0%} of peak")
            lines.append(f"  {label:<58} {r['ms'] * 1e3:9.1f} us  {extra}")
        else:
            lines.append(f"  {label:<58} n/a {r.get('note', '')}")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    out = []
    big = [r for r in rows if r["section"] == "grouped contiguous" and r["rows"] >= 512]
    ours = {(r["gemm"], r["experts"], r["rows"]): r for r in big if r["impl"] == "triton fp8 block" and r["tflops"]}
    base = {(r["gemm"], r["experts"], r["rows"]): r for r in big
            if r["impl"] == "torch._scaled_grouped_mm fp8 row" and r["tflops"]}
    if ours:
        ratios = [ours[k]["tflops"] / base[k]["tflops"] for k in ours if k in base]
        shares = [r["peak_share"] for r in ours.values()]
        if ratios:
            median = sorted(ratios)[len(ratios) // 2]
            out.append(f"FP8 grouped GEMM >= 1.0x torch._scaled_grouped_mm at >= 512 rows/expert: min "
                       f"{min(ratios):.2f}x, median {median:.2f}x -> {'met' if min(ratios) >= 1 else 'NOT met'}")
        out.append(f"FP8 grouped GEMM >= 65% of FP8 peak at >= 512 rows/expert: min {min(shares):.0%}, max "
                   f"{max(shares):.0%} -> {'met' if min(shares) >= 0.65 else 'NOT met'}")
    for timing in ("graph", "eager"):
        masked = [r for r in rows if r["section"] == "masked decode" and r.get("hbm_share") and r["gemm"] != "mlp"
                  and r.get("timing") == timing]
        if masked:
            shares = [r["hbm_share"] for r in masked]
            out.append(f"masked decode GEMMs >= 70% of HBM bandwidth ({timing}): min {min(shares):.0%}, max "
                       f"{max(shares):.0%} -> {'met' if min(shares) >= 0.7 else 'NOT met'}")
    mla = {(r["shape"], r["backend"]): r["us"] for r in rows
           if r["section"] == "mla" and r.get("name") == "mla_decode" and r.get("us")}
    speeds = [mla[shape, "flashinfer"] / us for (shape, backend), us in mla.items()
              if backend == "triton" and (shape, "flashinfer") in mla]
    if speeds:
        out.append(f"Triton MLA decode >= 60% of flashinfer's speed: min {min(speeds):.0%}, max {max(speeds):.0%} "
                   f"-> {'met' if min(speeds) >= 0.6 else 'NOT met'}")
    return out
