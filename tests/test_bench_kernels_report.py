"""scripts/bench_kernels_report.py: the target verdicts (masked decode per timing, FP8 ratios, MLA speed)."""

from bench_kernels_report import grouped_table, targets


def _masked(timing, share, gemm="down"):
    return dict(section="masked decode", gemm=gemm, experts=8, rows=8, impl=f"triton fp8 {timing}", timing=timing,
                ms=0.03, gbps=share * 4000, hbm_share=share)


def test_masked_target_is_judged_per_timing_and_ignores_the_whole_mlp():
    rows = [_masked("graph", 0.83), _masked("graph", 0.91, "gate_up"), _masked("eager", 0.55),
            _masked("graph", 0.40, "mlp")]
    lines = targets(rows)
    assert "(graph): min 83%, max 91% -> met" in lines[0]
    assert "(eager): min 55%, max 55% -> NOT met" in lines[1]


def test_fp8_ratio_uses_rows_of_512_and_more_only():
    def row(impl, rows, tflops):
        return dict(section="grouped contiguous", gemm="down", experts=8, rows=rows, impl=impl, ms=1.0, tflops=tflops,
                    peak_share=tflops / 1400)

    rows = [row("triton fp8 block", 512, 820), row("torch._scaled_grouped_mm fp8 row", 512, 800),
            row("triton fp8 block", 64, 100), row("torch._scaled_grouped_mm fp8 row", 64, 400)]
    lines = targets(rows)
    assert "min 1.02x" in lines[0] and lines[0].endswith("-> met")
    assert "min 59%" in lines[1] and lines[1].endswith("NOT met")
    table = grouped_table(rows, ["gate_up", "down"])
    assert "1.02x" in table and "0.25x" in table


def test_mla_target_compares_each_shape_with_flashinfer():
    def row(shape, backend, us):
        return dict(section="mla", name="mla_decode", shape=shape, backend=backend, us=us)

    rows = [row("B=64", "flashinfer", 80.0), row("B=64", "triton", 100.0), row("B=64", "torch", 1600.0),
            row("B=16", "flashinfer", 84.0), row("B=16", "triton", 150.0),
            dict(section="mla", name="router", shape="T=128", backend="triton", us=7.0)]
    lines = targets(rows)
    assert lines == ["Triton MLA decode >= 60% of flashinfer's speed: min 56%, max 80% -> NOT met"]
