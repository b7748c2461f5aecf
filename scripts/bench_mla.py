"""MLA decode attention (flashinfer vs Triton vs torch) and the router (Triton vs torch) on one GPU, in µs.

DeepSeek-V3 sizes: 128 heads, latent 512 + rope 64, bfloat16 cache and queries, every sequence at the full context,
its tokens scattered over the cache (a shuffled page table, page size 1). Timed with `triton.testing.do_bench`
(median, after warm-up) on random data. `run(device)` returns the rows; run as a script it prints a table.

    python scripts/bench_mla.py [--sweep] [--json FILE]

--sweep also times alternative tilings of the Triton kernel (for tuning `kernels.mla_triton.MLADecodeConfig`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.errors import WideepError  # noqa: E402
from kernels.attention_backend import ATTENTION_BACKENDS, create_attention_backend  # noqa: E402
from kernels.mla_triton import MLADecodeConfig, mla_decode_triton  # noqa: E402
from kernels.router import grouped_topk  # noqa: E402

HEADS, RANK, ROPE = 128, 512, 64
MLA_SHAPES = [(64, 2048), (128, 4096), (16, 8192)]  # (batch, context)
ROUTER_TOKENS = [128, 4096]
ROUTER = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
NUM_EXPERTS = 256
SWEEP = [  # alternatives to the default tiling (scripts/sweep_kernels.py times more, beside flashinfer)
    MLADecodeConfig(lazy_rescale=True), MLADecodeConfig(split_qk=True), MLADecodeConfig(split_qk=True, num_stages=2),
    MLADecodeConfig(split_qk=True, num_stages=2, lazy_rescale=True), MLADecodeConfig(split_qk=True, num_splits=2),
]


def time_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def decode_case(batch: int, ctx: int, device: str, seed: int = 0):
    """(q_latent `[B, H, r]`, q_rope `[B, H, d_r]`, kv_cache `[B*ctx + 1, r + d_r]`, page_table `[B, ctx]` int64,
    seq_lens `[B]` int64, scale), bfloat16, every sequence `ctx` tokens long."""
    g = torch.Generator(device=device).manual_seed(seed)
    slots = batch * ctx + 1
    kv = torch.randn(slots, RANK + ROPE, generator=g, device=device, dtype=torch.bfloat16)
    table = torch.randperm(slots - 1, generator=g, device=device).view(batch, ctx)
    q_latent = torch.randn(batch, HEADS, RANK, generator=g, device=device, dtype=torch.bfloat16)
    q_rope = torch.randn(batch, HEADS, ROPE, generator=g, device=device, dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int64, device=device)
    return q_latent, q_rope, kv, table, lens, 1.0 / math.sqrt(192)


def kv_gbps(batch: int, ctx: int, us: float) -> float:
    """Cache bytes read (each row once) per second: the roofline of a memory-bound decode."""
    return batch * ctx * (RANK + ROPE) * 2 / (us * 1e-6) / 1e9


def run(device: str = "cuda", sweep: bool = False) -> list[dict]:
    """Rows of {name, shape, backend, us} (plus GB/s for MLA decode and the relative error against torch)."""
    rows: list[dict] = []
    for batch, ctx in MLA_SHAPES:
        case = decode_case(batch, ctx, device)
        shape = f"B={batch} ctx={ctx} H={HEADS} r={RANK}+{ROPE} bf16"
        ref = None
        for name in ("torch",) + tuple(b for b in ATTENTION_BACKENDS if b != "torch"):
            try:
                backend = create_attention_backend(name, device=device, dtype=torch.bfloat16, kv_lora_rank=RANK,
                                                   rope_dim=ROPE)
            except WideepError as err:
                rows.append(dict(name="mla_decode", shape=shape, backend=name, us=None, note=str(err)))
                continue
            out = backend.decode(*case)  # flashinfer plans (and compiles, the first time) here, outside the timing
            if ref is None:
                ref = out.float()
            us = time_us(lambda: backend.decode(*case))
            err = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append(dict(name="mla_decode", shape=shape, backend=name, us=us, gbps=kv_gbps(batch, ctx, us),
                             rel_err=err))
        if sweep:
            for cfg in SWEEP:
                label = f"triton[{cfg.short()}]"
                try:
                    out = mla_decode_triton(*case, config=cfg)
                    us = time_us(lambda: mla_decode_triton(*case, config=cfg))
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    rows.append(dict(name="mla_decode_sweep", shape=shape, backend=label, us=us,
                                     gbps=kv_gbps(batch, ctx, us), rel_err=err))
                except Exception as exc:  # a tiling that does not fit (shared memory) is a result, not a crash
                    rows.append(dict(name="mla_decode_sweep", shape=shape, backend=label, us=None,
                                     note=f"{type(exc).__name__}: {str(exc)[:120]}"))
        case = ref = out = None  # free the cache before the next shape allocates its own
        torch.cuda.empty_cache()

    from kernels.fused_router import fused_grouped_topk

    for tokens in ROUTER_TOKENS:
        g = torch.Generator(device=device).manual_seed(tokens)
        logits = torch.randn(tokens, NUM_EXPERTS, generator=g, device=device)
        bias = torch.randn(NUM_EXPERTS, generator=g, device=device) * 0.1
        shape = f"T={tokens} E={NUM_EXPERTS} groups 8/4 top-8"
        for name, fn in (("torch", grouped_topk), ("triton", fused_grouped_topk)):
            rows.append(dict(name="router", shape=shape, backend=name,
                             us=time_us(lambda: fn(logits, bias, **ROUTER))))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'kernel':<17} {'shape':<36} {'backend':<40} {'us':>9} {'GB/s':>7} {'vs fi':>6}  note"]
    fastest = {r["shape"]: r["us"] for r in rows if r["backend"] == "flashinfer" and r["us"]}
    for r in rows:
        us = f"{r['us']:.1f}" if r.get("us") else "-"
        gbps = f"{r['gbps']:.0f}" if r.get("gbps") else ""
        ratio = f"{fastest[r['shape']] / r['us']:.2f}" if r.get("us") and r["shape"] in fastest else ""
        note = r.get("note", f"rel err {r['rel_err']:.1e}" if "rel_err" in r else "")
        lines.append(f"{r['name']:<17} {r['shape']:<36} {r['backend']:<40} {us:>9} {gbps:>7} {ratio:>6}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also time alternative Triton tilings")
    p.add_argument("--json", type=Path, help="write the rows here, one JSON object a line")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_mla needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = run("cuda", sweep=args.sweep)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(format_table(rows))
    fi = {r["shape"]: r["us"] for r in rows if r["backend"] == "flashinfer" and r["us"]}
    tr = {r["shape"]: r["us"] for r in rows if r["backend"] == "triton" and r["name"] == "mla_decode" and r["us"]}
    for shape in fi:
        if shape in tr:
            share = fi[shape] / tr[shape]
            print(f"Triton MLA decode at {shape}: {share:.0%} of flashinfer's speed "
                  f"(target >= 60%: {'met' if share >= 0.6 else 'not met'})")
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
