"""`python -m engine.bench`: offline throughput, in the shape of `sglang.bench_offline_throughput`.

With no arguments it runs the built-in tiny DeepSeek-V3-shaped model with dummy weights on random prompts.
stdout: a result table, then one JSON line (also appended to `--result-filename`); logs and progress on stderr.

After the timed run, a short eager pass measures where step time goes (`--step-breakdown`, engine.step_timer).
With `--enable-eplb` the decode throughput before and after the timed run's first rebalance is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from engine.bench_breakdown import BREAKDOWN_OUTPUT_LEN, breakdown_pass, format_shares, step_breakdown
from engine.bench_rebalance import StepHooks, rebalance_throughput, rebalance_windows
from engine.build import ModelSource, pick_dtype
from engine.cli_args import add_model_args, make_runner, setup_logging
from engine.datasets import random_requests
from engine.distributed import EngineParallel, build_parallel_model
from engine.dp_balance import assign_ranks
from engine.errors import WideepError, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_model="tiny")
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset-name", default="random", choices=["random", "skewed"],
                   help="random: token ids uniform over the vocabulary; skewed: Zipf-distributed token ids (which "
                        "skew expert load, for EPLB runs); both take the --random-* length flags")
    d.add_argument("--num-prompts", type=int, default=32)
    d.add_argument("--random-input-len", type=int, default=128)
    d.add_argument("--random-output-len", type=int, default=32)
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are drawn uniformly from [ratio * len, len] (1.0: all exactly len)")
    d.add_argument("--skew-exponent", type=float, default=1.2,
                   help="skewed dataset: the k-th most frequent token has probability proportional to k^-exponent")
    p.add_argument("--disable-ignore-eos", action="store_true", help="stop a request at its end-of-sequence token")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="requests run once before timing (default: enough prompts of --random-input-len to fill one "
                        "prefill step, so the kernels of full prefill steps are compiled before the clock starts)")
    p.add_argument("--result-filename", help="append the result JSON line to this file")
    p.add_argument("--step-breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="after the timed run, re-run one batch per rank (the first prompts, "
                        f"{BREAKDOWN_OUTPUT_LEN} output tokens) eagerly with CUDA events around attention, expert "
                        "GEMMs, dispatch and combine, and report their shares of prefill and decode step time. A "
                        "separate pass because the events add host work to every layer and CUDA graphs hide the "
                        "spans: the timed throughput stays untouched")
    p.add_argument("--profile", metavar="DIR",
                   help="record the timed run with the torch profiler; each rank writes DIR/trace_rank<R>.json "
                        "(open in chrome://tracing or Perfetto)")
    args = p.parse_args(argv)
    for flag in ("num_prompts", "random_input_len", "random_output_len"):
        if getattr(args, flag) < 1:
            raise WideepError(f"--{flag.replace('_', '-')} must be >= 1, found {getattr(args, flag)}")
    if not 0.0 <= args.random_range_ratio <= 1.0:
        raise WideepError(f"--random-range-ratio must lie in [0, 1], found {args.random_range_ratio}")
    if not (math.isfinite(args.skew_exponent) and args.skew_exponent > 0.0):
        raise WideepError(f"--skew-exponent must be a positive number, found {args.skew_exponent}")
    return args


def git_commit() -> str:
    """The checkout's short commit; `WIDEEP_COMMIT` names it where the tree was copied without its .git."""
    if os.environ.get("WIDEEP_COMMIT"):
        return os.environ["WIDEEP_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def profiled(folder: str | None, rank: int, device: torch.device) -> Iterator[None]:
    """Records the enclosed run with the torch profiler into `folder/trace_rank<rank>.json` (nothing without one)."""
    if folder is None:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
    prof.export_chrome_trace(str(Path(folder) / f"trace_rank{rank}.json"))


def print_table(result: dict) -> None:
    rows = [
        ("Backend", "wideep"),
        ("Model", result["model"]),
        ("Device", result["device"]),
        ("Ranks (EP size) / dispatcher", f"{result['world_size']} / {result['moe_a2a_backend']}"),
        ("Successful requests", result["successful_requests"]),
        ("Benchmark duration (s)", f"{result['total_latency']:.2f}"),
        ("Total input tokens", result["total_input_tokens"]),
        ("Total generated tokens", result["total_output_tokens"]),
        ("Request throughput (req/s)", f"{result['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{result['input_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{result['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{result['total_throughput']:.2f}"),
        ("Per-GPU total throughput (tok/s)", f"{result['per_gpu_total_throughput']:.2f}"),
        ("Prefill / decode time, rank 0 (s)", f"{result['prefill_s']:.2f} / {result['decode_s']:.2f}"),
        ("Mean decode step (ms)", f"{result['mean_decode_step_ms']:.2f}"),
        ("Mean decode batch", f"{result['mean_decode_batch']:.1f}"),
        ("Weights / KV cache per rank, max (GB)", (f"{max(result['weight_bytes_per_rank']) / 1e9:.3f} / "
                                                   f"{max(result['kv_cache_bytes_per_rank']) / 1e9:.3f}")),
    ]
    if result["num_gpus"]:
        rows.append(("Peak memory per rank, max (GB)", f"{max(result['peak_memory_per_rank']) / 1e9:.3f}"))
    for mode, shares in result.get("step_breakdown", {}).items():
        rows.append((f"{mode.capitalize()} attn/experts/a2a/rest, r0", format_shares(shares)))
        if result["world_size"] > 1:
            rows.append((f"{mode.capitalize()} shares, max over ranks",
                         format_shares(result["step_breakdown_max"][mode])))
    if "throughput_before_rebalance" in result:
        after = result.get("throughput_after_rebalance")
        rows.append(("Decode tok/s before / after rebalance", f"{result['throughput_before_rebalance']:.1f} / "
                                                              + ("-" if after is None else f"{after:.1f}")))
    if result["runtime"] == "continuous":
        rows += [
            ("Peak running requests, rank 0", result["peak_running_requests"]),
            ("Retractions, rank 0", result["retractions"]),
            ("KV cache peak use, rank 0",
             f"{100 * result['kv_cache_peak_use']:.1f}% of {result['kv_cache_pages']} pages"),
        ]
    print(f"{' Offline Throughput Benchmark Result ':=^60}")
    for name, value in rows:
        print(f"{name + ':':<40}{value:>20}")
    print("=" * 60)


def append_result(path: str, result: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.result_filename and not Path(args.result_filename).resolve().parent.is_dir():
        raise WideepError(f"--result-filename {args.result_filename}: its directory does not exist")
    if args.profile and not Path(args.profile).is_dir():
        raise WideepError(f"--profile {args.profile}: no such directory; create it first")
    source = ModelSource.resolve(args.model, args.num_layers)
    par = EngineParallel.start(args)
    try:
        setup_logging(par.rank)
        return run_bench(args, source, par)
    finally:
        par.close()


def kv_cache_bytes(runner) -> int:
    """Bytes of the runner's KV cache buffer (0 before it has one): `cache` of the continuous runner, `_cache` of
    the static one, which exposes it no other way."""
    cache = getattr(runner, "cache", None) or getattr(runner, "_cache", None)
    buffer = getattr(cache, "buffer", None)
    return 0 if buffer is None else buffer.numel() * buffer.element_size()


def warmup_count(args: argparse.Namespace) -> int:
    """Requests to run before timing: `--warmup-requests`, or enough prompts of the benchmark's input length to
    fill one prefill step. Triton and Gluon kernels compile on first use, per tile choice and argument
    specialization; a single short prompt left the tiles of full prefill steps (more rows per expert, the dense
    projections' row counts) to compile inside the timed run, seconds of it (commit c45d70c, v3 5 layers, 2000/100
    on an H200: timed prefill 10.9 s against 7.3 s of steps measured after it)."""
    if args.warmup_requests is not None:
        return args.warmup_requests
    step = getattr(args, "chunked_prefill_size", None) or args.max_prefill_tokens
    return max(1, min(args.num_prompts, -(-step // max(1, args.random_input_len))))


def run_bench(args: argparse.Namespace, source: ModelSource, par: EngineParallel) -> int:
    device = par.device
    dtype = pick_dtype(args.dtype, device)
    model, eplb = build_parallel_model(args, source, par, dtype)
    hooks = StepHooks(eplb.on_step_end)
    runner = hooks.runner = make_runner(args, model, args.seed, par.sync, hooks)
    vocab = source.cfg.vocab_size
    n_warm = warmup_count(args)
    if n_warm:
        warm = random_requests(argparse.Namespace(**{**vars(args), "num_prompts": n_warm,
                                                     "random_output_len": 4}), vocab, args.seed + 1)
        runner.generate(warm)
    # Every rank draws the same prompts and takes its share (DP attention, --load-balance-method).
    everyone = random_requests(args, vocab, args.seed)
    owner = assign_ranks([r.max_tokens for r in everyone], par.world_size, args.load_balance_method)
    requests = [r for r, rank in zip(everyone, owner) if rank == par.rank]
    runner.stats = type(runner.stats)()
    eplb.recorder.reset()  # the warm-up's load is not the benchmark's
    total_out = sum(r.params.max_new_tokens for r in requests)
    hooks.start_log()
    sync(device)
    par.sync.barrier()
    with tqdm(total=total_out, desc="bench (rank 0)", unit="tok", file=sys.stderr, dynamic_ncols=True,
              disable=not par.is_main) as bar, profiled(args.profile, par.rank, device):
        start = time.perf_counter()
        runner.generate(requests, on_step=bar.update)
        sync(device)
        par.sync.barrier()
        latency = time.perf_counter() - start
    hooks.logging = False

    mine = {
        "input": sum(len(r.input_ids) for r in requests),
        "output": sum(len(r.output_ids) for r in requests),
        "finished": sum(r.finished for r in requests),
        "stats": runner.stats,
        "weight_bytes": model.weight_bytes(),
        "kv_cache_bytes": kv_cache_bytes(runner),
        "peak_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "rebalance_windows": rebalance_windows(hooks.decode_log, [r.step for r in eplb.reports]),
    }
    eplb.dump()
    if args.step_breakdown:
        hooks.runner = None
        del runner  # its KV cache goes before the breakdown runner sizes its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
        mine["breakdown"] = breakdown_pass(args, model, par, hooks, everyone)
    ranks = par.sync.gather(mine)
    if not par.is_main:
        return 0
    n_in = sum(r["input"] for r in ranks)
    n_out = sum(r["output"] for r in ranks)
    stats0 = ranks[0]["stats"]
    world = par.world_size
    result = {
        "successful_requests": sum(r["finished"] for r in ranks),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "total_latency": latency,
        "request_throughput": args.num_prompts / latency,
        "input_throughput": n_in / latency,
        "output_throughput": n_out / latency,
        "total_throughput": (n_in + n_out) / latency,
        "per_gpu_total_throughput": (n_in + n_out) / latency / world,
        "per_gpu_output_throughput": n_out / latency / world,
        "prefill_s": stats0.prefill_s,
        "decode_s": stats0.decode_s,
        "mean_decode_step_ms": stats0.mean_decode_step_ms,
        "mean_decode_batch": stats0.mean_decode_batch,
        "weight_bytes": ranks[0]["weight_bytes"],
        "weight_bytes_per_rank": [r["weight_bytes"] for r in ranks],
        "kv_cache_bytes_per_rank": [r["kv_cache_bytes"] for r in ranks],
        "peak_memory_per_rank": [r["peak_memory"] for r in ranks],
        "model": source.name,
        "num_layers": source.cfg.num_hidden_layers,
        "quantization": "fp8" if source.cfg.quant else "none",
        "fp8_weights": any(layer.weights.w13_scale is not None for layer in model.moe_layers()),
        "load_format": args.load_format,
        "dtype": str(dtype).removeprefix("torch."),
        "dataset_name": args.dataset_name,
        **({"skew_exponent": args.skew_exponent} if args.dataset_name == "skewed" else {}),
        "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "max_running_requests": args.max_running_requests,
        "runtime": args.runtime,
        **({"page_size": args.page_size, "peak_running_requests": stats0.peak_running,
            "retractions": stats0.retractions, "kv_cache_pages": stats0.num_pages,
            "kv_cache_peak_use": stats0.peak_kv_use, "cuda_graph": stats0.cuda_graph,
            "cuda_graph_sizes": stats0.cuda_graph_sizes, "graph_decode_steps": stats0.graph_decode_steps}
           if args.runtime == "continuous" else {}),
        "world_size": world,
        "load_balance_method": args.load_balance_method,
        "ep_size": par.config.ep_size,
        "moe_a2a_backend": par.config.a2a_backend,
        "deepep_mode": par.config.deepep_mode,
        "ep_num_redundant_experts": args.ep_num_redundant_experts,
        "eplb_rebalances": [
            {"step": r.step, "seconds": r.seconds, "balancedness_before": r.balancedness_before,
             "balancedness_after": r.balancedness_after, "mb_received_rank0": r.bytes_received / 1e6,
             "mean_layer_ms": 1e3 * sum(r.per_layer_seconds) / max(len(r.per_layer_seconds), 1)}
            for r in eplb.reports],
        **rebalance_throughput([r["rebalance_windows"] for r in ranks]),
        **(step_breakdown([r["breakdown"] for r in ranks]) if args.step_breakdown else {}),
        "seed": args.seed,
        "device": device_name(device),
        "num_gpus": world if device.type == "cuda" else 0,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print_table(result)
    if args.result_filename:
        append_result(args.result_filename, result)
    print(json.dumps(result), flush=True)
    return 0


def cli() -> None:
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
