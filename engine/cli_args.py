"""Flags shared by the entry points (`engine.generate`, `engine.bench`) and their logging setup."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from engine.cb_runner import ContinuousConfig, ContinuousRunner
from engine.cuda_graph import DEFAULT_MAX_BS
from engine.model import DeepseekV3
from engine.runner import Runner, RunnerConfig
from eplb.manager import add_eplb_args
from parallel.config import add_parallel_args
from parallel.step_sync import StepSync


def add_model_args(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=default_model, required=default_model is None,
                   help="checkpoint directory (config.json + safetensors), or a built-in preset: tiny, v3"
                   + (f" (default: {default_model})" if default_model else ""))
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights of the right shapes, no files read (auto: dummy for presets)")
    g.add_argument("--num-layers", type=int, default=None,
                   help="run only the first N decoder layers (benchmarks of full-width models that must fit)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--seed", type=int, default=0, help="seed for dummy weights, datasets and sampling")
    g.add_argument("--fp8-weights", choices=["auto", "on", "off"], default="auto",
                   help="keep an fp8 checkpoint's weights in FP8 and run block-scaled FP8 GEMMs (auto: on GPUs with "
                        "bfloat16; off: dequantize to --dtype at load)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "flashinfer", "triton", "torch"],
                   help="MLA decode attention (auto: flashinfer when importable on GPU, else triton; torch on CPU)")
    g.add_argument("--max-running-requests", type=int, default=64, help="requests decoded together")
    g.add_argument("--max-prefill-tokens", type=int, default=8192, help="prompt tokens per prefill forward")
    add_runtime_args(parser)
    add_parallel_args(parser)
    add_eplb_args(parser)


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--load-balance-method", choices=["round_robin", "shortest_queue"], default="round_robin",
                   help="how requests are spread over data-parallel attention ranks (shortest_queue balances tokens)")
    g.add_argument("--runtime", choices=["static", "continuous"], default="continuous",
                   help="continuous (default): continuous batching over a paged KV cache with chunked prefill, "
                        "retraction and CUDA-graph decode; static: fixed batches run to the end (the simple path "
                        "the continuous runtime is tested against)")
    g.add_argument("--page-size", type=int, default=1, help="tokens per KV cache page (continuous runtime)")
    g.add_argument("--chunked-prefill-size", type=int, default=None,
                   help="prompt tokens per prefill step of the continuous runtime (default: --max-prefill-tokens)")
    g.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV cache size in tokens (continuous runtime; default: from free memory on GPUs, on the "
                        "CPU what the requests need)")
    g.add_argument("--mem-fraction-static", type=float, default=0.85,
                   help="share of GPU memory that weights and the KV cache may take (continuous runtime)")
    g.add_argument("--cuda-graph-max-bs", type=int, default=DEFAULT_MAX_BS,
                   help="largest decode batch replayed as a CUDA graph (continuous runtime on GPUs; sizes 1, 2, 4, "
                        "8, then every 8 to 64 and every 16 above are captured, capped by --max-running-requests "
                        f"and, with DeepEP, --deepep-max-dispatch-tokens-per-rank; default {DEFAULT_MAX_BS})")
    g.add_argument("--disable-cuda-graph", action="store_true",
                   help="decode eagerly, without CUDA graphs (continuous runtime)")


def make_runner(args: argparse.Namespace, model: DeepseekV3, seed: int, sync: StepSync,
                on_step_end: Callable[[int], None] | None) -> Runner | ContinuousRunner:
    """The runner `--runtime` names, configured from the flags; both share one surface (`generate`, `stats`)."""
    if args.runtime == "static":
        return Runner(model, RunnerConfig(args.max_running_requests, args.max_prefill_tokens, seed), sync=sync,
                      on_step_end=on_step_end)
    config = ContinuousConfig(
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size or args.max_prefill_tokens,
        page_size=args.page_size, max_total_tokens=args.max_total_tokens,
        mem_fraction_static=args.mem_fraction_static, seed=seed, cuda_graph_max_bs=args.cuda_graph_max_bs,
        disable_cuda_graph=args.disable_cuda_graph)
    return ContinuousRunner(model, config, sync=sync, on_step_end=on_step_end)


def setup_logging(rank: int = 0, verbose: bool = False) -> None:
    """Logs go to stderr so that stdout carries only results (its last line is JSON); ranks other than 0 log
    warnings only, each line naming its rank."""
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(stream=sys.stderr, level=level, format=f"[wideep r{rank} %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S", force=True)
