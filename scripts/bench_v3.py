"""The DeepSeek-V3-shaped benchmark matrix of the runtime and 8-GPU issues, run side by side, with one table at the end.

Each case is one `engine.bench` run of the `v3` preset with dummy FP8 weights (all 256 experts) and the continuous
runtime, under torchrun when `--nproc` > 1. Full logs and the result JSON lines go to `--logs`; the last thing
printed is a table: per-GPU throughput, decode step, memory per rank, the decode step-time shares and, for the EPLB
case, balancedness and throughput around the first rebalance.

    python scripts/bench_v3.py --logs runs/v3 --nproc 1 --num-layers 10 --cases 1000-1000 2000-100
    python scripts/bench_v3.py --logs runs/v3x4 --nproc 4 --num-layers 20 \
        --cases deepep:1000-1000 deepep:2000-100 torch:2000-100 deepep:eplb-skewed

A case is `[dispatcher:]shape`; the dispatcher (torch, deepep) only applies to several ranks. Shapes: 1000-1000 and
2000-100 (input-output lengths, sglang's random dataset with range ratio 1), and eplb-skewed (Zipf prompt tokens,
32 redundant experts, a rebalance part-way through). A case that fails or runs past `--timeout` is reported as such
and the matrix goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

SHAPES = {
    "1000-1000": ["--random-input-len", "1000", "--random-output-len", "1000"],
    "2000-100": ["--random-input-len", "2000", "--random-output-len", "100"],
    "eplb-skewed": ["--dataset-name", "skewed", "--random-input-len", "1000", "--random-output-len", "200",
                    "--enable-eplb"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", required=True, help="folder for logs and results.jsonl")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (ranks) per case")
    p.add_argument("--num-layers", type=int, required=True, help="decoder layers of the v3 model (first 3 dense)")
    p.add_argument("--model", default="v3", help="preset (tiny: a CPU dry run of the matrix)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cases", nargs="+", default=["1000-1000", "2000-100"])
    p.add_argument("--prompts-per-gpu", type=int, default=256, help="--num-prompts is this times --nproc")
    p.add_argument("--max-running-requests", type=int, default=256, help="per rank")
    p.add_argument("--rebalance-every", type=int, default=100, help="steps between rebalances (eplb cases)")
    p.add_argument("--redundant-experts", type=int, default=32, help="--ep-num-redundant-experts (eplb cases)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per case")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more engine.bench flags for every case")
    return p.parse_args(argv)


def case_command(args: argparse.Namespace, case: str, results: Path) -> list[str]:
    dispatcher, _, shape = case.rpartition(":")
    if shape not in SHAPES:
        raise SystemExit(f"bench_v3: unknown case {case!r}; shapes are {', '.join(SHAPES)}")
    flags = ["--model", args.model, "--num-layers", str(args.num_layers), "--load-format", "dummy",
             "--fp8-weights", "on" if args.device == "cuda" else "off", "--device", args.device,
             "--runtime", "continuous", "--page-size", "16",
             "--num-prompts", str(args.prompts_per_gpu * args.nproc), "--random-range-ratio", "1.0",
             "--max-running-requests", str(args.max_running_requests), "--result-filename", str(results),
             *SHAPES[shape]]
    if shape == "eplb-skewed":
        flags += ["--eplb-rebalance-num-iterations", str(args.rebalance_every),
                  "--ep-num-redundant-experts", str(args.redundant_experts)]
    if args.nproc > 1:
        flags += ["--moe-a2a-backend", dispatcher or "deepep", "--enable-dp-attention", "--ep-size", str(args.nproc)]
        if (dispatcher or "deepep") == "deepep":  # low-latency buffers sized for a full decode batch per rank
            flags += ["--deepep-max-dispatch-tokens-per-rank", str(max(128, args.max_running_requests))]
        launcher = ["torchrun", "--standalone", f"--nproc-per-node={args.nproc}", "-m", "engine.bench"]
    else:
        launcher = [sys.executable, "-m", "engine.bench"]
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    return launcher + flags + extra


def gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def summarize(case: str, r: dict) -> list[str]:
    shares = (r.get("step_breakdown") or {}).get("decode") or {}
    share = " ".join(f"{k[:4]} {100 * shares[k]:.0f}%" for k in ("attention", "experts", "dispatch_combine", "rest")
                     if k in shares)
    cells = [case, f"{r['random_input_len']}/{r['random_output_len']} x{r['num_prompts']}",
             f"{r['per_gpu_total_throughput']:.0f}", f"{r['per_gpu_output_throughput']:.0f}",
             f"{r['mean_decode_step_ms']:.1f}", f"{r['mean_decode_batch']:.0f}",
             f"{gb(max(r['peak_memory_per_rank']))}", share or "-"]
    reb = r.get("eplb_rebalances") or []
    if reb:
        first = reb[0]
        text = (f"bal {first['balancedness_before']:.2f}->{first['balancedness_after']:.2f} "
                f"in {first['seconds']:.2f}s")
        before, after = r.get("throughput_before_rebalance"), r.get("throughput_after_rebalance")
        if before and after:
            text += f"; out tok/s {before:.0f}->{after:.0f}"
        cells.append(text)
    return cells


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"}
    rows = []
    for case in args.cases:
        results = logs / f"{case.replace(':', '_')}.jsonl"
        results.unlink(missing_ok=True)
        cmd = case_command(args, case, results)
        log = logs / f"{case.replace(':', '_')}.log"
        print(f"[bench_v3] {case}: {' '.join(cmd)}", flush=True)
        with open(log, "w") as out:
            # A session of its own, so a timeout ends torchrun's ranks too: a rank left behind would hold its GPU
            # (and DeepEP's NVSHMEM heap) and fail the next case.
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rows.append([case, f"TIMEOUT after {args.timeout} s (see {log})"])
                continue
        if rc != 0 or not results.exists():
            tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            rows.append([case, f"FAILED rc={rc}: {tail[0][:120]}"])
            continue
        rows.append(summarize(case, json.loads(results.read_text().strip().splitlines()[-1])))
    first = next((json.loads(p.read_text().splitlines()[-1]) for p in sorted(logs.glob("*.jsonl"))
                  if p.stat().st_size), None)
    if first:
        print(f"\ndevice {first['device']} x{args.nproc}, commit {first['commit']}, {first['date'][:10]}, "
              f"{first['model']} {first['num_layers']} layers, fp8 {first['fp8_weights']}, "
              f"page size {first.get('page_size')}")
    header = ["case", "in/out x prompts", "tok/s/GPU", "out tok/s/GPU", "decode step ms", "decode batch",
              "peak GB/rank", "decode step shares", "EPLB"]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
