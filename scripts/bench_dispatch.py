"""Dispatch/combine benchmark at DeepSeek-V3 shapes: the torch backend against DeepEP, NCCL all-to-all as baseline.

    torchrun --nproc-per-node 4 scripts/bench_dispatch.py [--json FILE]

Every rank routes its own random tokens (hidden 7168, top-8 of 256 experts, scores as DeepEP's tests make them)
and times, with CUDA events, the median of `--iters` rounds after `--warmup`:
- NCCL `all_to_all_single` of 4096 tokens x 8 copies x 7168 bf16 per rank (the baseline, as in GPU.md);
- the `torch` dispatcher at 4096 tokens (prefill) and 128 (decode);
- the `deepep` dispatcher, normal kernels at 4096 tokens with bf16 and FP8 dispatch, low-latency kernels at 128
  tokens with bf16 and FP8 dispatch, combine in bf16; and DeepEP's normal kernels called directly ("raw": layout +
  dispatch, combine, on pre-quantized rows), to show what the dispatcher adds (grouping per slot, the weighted fold).
Dispatcher rows time `dispatch` (start and wait, the contiguous or masked layout included) and `combine` (the fold
included); the expert MLP between them is replaced by a copy (a dequantization with FP8) outside both windows.

Bandwidth is counted as DeepEP's tests count it: normal mode, bytes received per rank (each token once per
destination rank, H x 2 bytes in bf16, H + H/128 x 4 in FP8) over time, and the same bf16 bytes sent back by
combine; low-latency mode, bytes sent per rank (each token once per selected expert: H x 2 + 16 in bf16,
H + H/128 x 4 + 16 in FP8, H x 2 back). The torch backend is counted like DeepEP's normal mode. Times are the slowest
rank's median; GB/s is the mean over ranks of each rank's bytes over its median. Rank 0 prints the table and
whether the torch backend is within 2x of DeepEP's normal mode (dispatch + combine, bf16, 4096 tokens).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.errors import WideepError
from parallel.deepep_layout import dequantize_tokens, quantize_per_token
from parallel.launch import detect_launch_env
from parallel.state import destroy_parallel, init_parallel
from parallel.torch_a2a import TorchAllToAllDispatcher


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--normal-tokens", type=int, default=4096, help="tokens per rank for prefill-sized rows")
    p.add_argument("--ll-tokens", type=int, default=128, help="tokens per rank for decode-sized rows")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", help="write the rows (and device, date, commit) to this file")
    return p.parse_args()


def routing(tokens: int, hidden: int, experts: int, topk: int, seed: int, device) -> tuple:
    """Random rows `[T, H]` bf16, distinct top-k experts `[T, K]` int64 (scores |N(0,1)| + 1), weights `[T, K]`."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, device=device).to(torch.bfloat16)
    scores = torch.randn(tokens, experts, generator=g, device=device).abs() + 1
    ids = scores.topk(topk, dim=1).indices
    weights = torch.rand(tokens, topk, generator=g, device=device)
    return x, ids, weights


def time_rounds(dispatch: Callable[[], Any], expert: Callable[[Any], Any], combine: Callable[[Any, Any], Any] | None,
                warmup: int, iters: int) -> tuple[float, float, Any]:
    """Median µs of dispatch and of combine over `iters` rounds (events around each; the expert between them is
    outside both windows); returns the last round's dispatch result too."""
    for _ in range(warmup):
        state = dispatch()
        if combine is not None:
            combine(state, expert(state))
    torch.cuda.synchronize()
    dist.barrier()
    marks = []
    for _ in range(iters):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        state = dispatch()
        ev[1].record()
        if combine is not None:
            y = expert(state)
            ev[2].record()
            combine(state, y)
            ev[3].record()
        marks.append(ev)
    torch.cuda.synchronize()
    d = statistics.median(e[0].elapsed_time(e[1]) for e in marks) * 1e3
    c = statistics.median(e[2].elapsed_time(e[3]) for e in marks) * 1e3 if combine is not None else 0.0
    return d, c, state


def dispatcher_case(dispatcher, x, ids, weights, mode, args) -> tuple[float, float, Any]:
    def dispatch():
        return dispatcher.dispatch(x, ids, weights, mode)

    def expert(state):
        tokens, _ = state
        return dequantize_tokens(tokens).hidden.clone()

    return time_rounds(dispatch, expert, lambda state, y: dispatcher.combine(y, state[1]), args.warmup, args.iters)


def nccl_baseline(rows: int, hidden: int, dev, args) -> tuple[float, int]:
    """`all_to_all_single` of `[rows, hidden]` bf16 split evenly over the ranks: (median µs, bytes received)."""
    send = torch.randn(rows, hidden, device=dev).to(torch.bfloat16)
    recv = torch.empty_like(send)
    d, _, _ = time_rounds(lambda: dist.all_to_all_single(recv, send), lambda s: None, None, args.warmup, args.iters)
    return d, recv.numel() * 2


def main() -> int:
    args = parse_args()
    env = detect_launch_env(os.environ)
    state = init_parallel(env, ep_size=env.world_size, timeout_s=600, device_kind="cuda")
    rank, world, dev = state.rank, state.world_size, state.device
    h, k, e = args.hidden, args.topk, args.experts
    slots = e // world
    rows: list[dict] = []

    def record(name: str, tokens: int, dtype: str, d_us: float, c_us: float, d_bytes: float, c_bytes: float) -> None:
        """Gather every rank's medians and bytes; keep the slowest time and the mean bandwidth."""
        mine = torch.tensor([d_us, c_us, d_bytes / d_us / 1e3 if d_us else 0.0,
                             c_bytes / c_us / 1e3 if c_us else 0.0], dtype=torch.float64, device=dev)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        every = torch.stack(every).cpu()
        rows.append({"case": name, "tokens_per_rank": tokens, "dispatch_dtype": dtype,
                     "dispatch_us": every[:, 0].max().item(), "combine_us": every[:, 1].max().item(),
                     "dispatch_gbps": every[:, 2].mean().item(), "combine_gbps": every[:, 3].mean().item()})

    t = args.normal_tokens
    d, received = nccl_baseline(t * k, h, dev, args)
    record("nccl all_to_all_single (baseline)", t, "bf16", d, 0.0, received, 0.0)

    normal = routing(args.normal_tokens, h, e, k, seed=rank, device=dev)
    decode = routing(args.ll_tokens, h, e, k, seed=100 + rank, device=dev)
    common = {"num_local_slots": slots, "hidden_size": h, "dtype": torch.bfloat16}
    torch_backend = TorchAllToAllDispatcher(state, **common)
    for label, (x, ids, weights), mode in (("torch", normal, "prefill"), ("torch", decode, "decode")):
        d, c, (_, handle) = dispatcher_case(torch_backend, x, ids, weights, mode, args)
        received = sum(handle.recv_splits) * h * 2
        record(f"{label} dispatcher", x.shape[0], "bf16", d, c, received, received)

    try:
        from parallel.deepep import DeepEPBuffer, DeepEPDispatcher

        buffer = DeepEPBuffer(state.group, hidden_size=h, num_slots=e, max_dispatch_tokens_per_rank=args.ll_tokens,
                              normal=True, low_latency=True)
    except WideepError as err:
        buffer = None
        if rank == 0:
            print(f"deepep rows skipped: {err}", file=sys.stderr)
    if buffer is not None:
        deepep = {fp8: DeepEPDispatcher(state, **common, deepep_mode="auto", fp8_dispatch=fp8,
                                        max_dispatch_tokens_per_rank=args.ll_tokens, buffer=buffer)
                  for fp8 in (False, True)}
        fp8_row_bytes = h + h // 128 * 4
        for fp8, dispatcher in deepep.items():
            x, ids, weights = normal
            d, c, (_, handle) = dispatcher_case(dispatcher, x, ids, weights, "prefill", args)
            r = handle.row.shape[0]  # received rows, one per token per destination rank
            record("deepep dispatcher, normal", t, "fp8" if fp8 else "bf16", d, c,
                   r * (fp8_row_bytes if fp8 else h * 2), r * h * 2)
        for fp8, dispatcher in deepep.items():
            x, ids, weights = decode
            d, c, _ = dispatcher_case(dispatcher, x, ids, weights, "decode", args)
            picks = int((ids >= 0).sum())
            record("deepep dispatcher, low-latency", x.shape[0], "fp8" if fp8 else "bf16", d, c,
                   picks * ((fp8_row_bytes if fp8 else h * 2) + 16), picks * h * 2)
        # DeepEP's normal kernels alone, called as its tests call them.
        raw = buffer.buffer
        x, ids, weights = normal
        for fp8 in (False, True):
            send = quantize_per_token(x) if fp8 else x

            def raw_dispatch(send=send, fp8=fp8):
                per_rank, _, per_slot, in_rank, _ = raw.get_dispatch_layout(ids, e)
                out = raw.dispatch(send, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                   num_tokens_per_expert=per_slot, topk_idx=ids, topk_weights=weights)
                return out[0][0] if fp8 else out[0], out[4]

            def raw_expert(state, fp8=fp8):
                received, _ = state
                return torch.zeros(received.shape, dtype=torch.bfloat16, device=dev) if fp8 else received.clone()

            d, c, (received, _) = time_rounds(raw_dispatch, raw_expert, lambda s, y: raw.combine(y, s[1]),
                                              args.warmup, args.iters)
            r = received.shape[0]
            record("deepep raw normal kernels", t, "fp8" if fp8 else "bf16", d, c,
                   r * (fp8_row_bytes if fp8 else h * 2), r * h * 2)
        torch.cuda.synchronize()
        buffer.destroy()

    if rank == 0:
        report(rows, args, world)
    destroy_parallel(state)
    return 0


def report(rows: list[dict], args: argparse.Namespace, world: int) -> None:
    device = torch.cuda.get_device_name()
    commit = os.environ.get("WIDEEP_COMMIT") or _git_commit()
    date = datetime.date.today().isoformat()
    print(f"device: {world} x {device}  date: {date}  commit: {commit}  torch {torch.__version__}")
    print(f"hidden {args.hidden}, top-{args.topk} of {args.experts} experts, EP{world}; median of {args.iters} "
          f"rounds after {args.warmup}")
    print("| case | tokens/rank | dispatch | dispatch us | dispatch GB/s | combine us | combine GB/s | total us |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        combine = f"{r['combine_us']:.0f} | {r['combine_gbps']:.0f}" if r["combine_us"] else "- | -"
        print(f"| {r['case']} | {r['tokens_per_rank']} | {r['dispatch_dtype']} | {r['dispatch_us']:.0f} | "
              f"{r['dispatch_gbps']:.0f} | {combine} | {r['dispatch_us'] + r['combine_us']:.0f} |")
    verdict = None

    def total(case, tokens, dtype):
        for r in rows:
            if r["case"] == case and r["tokens_per_rank"] == tokens and r["dispatch_dtype"] == dtype:
                return r["dispatch_us"] + r["combine_us"]
        return None

    ours = total("torch dispatcher", args.normal_tokens, "bf16")
    theirs = total("deepep dispatcher, normal", args.normal_tokens, "bf16")
    if ours and theirs:
        ratio = ours / theirs
        verdict = {"torch_over_deepep_normal": ratio, "target_met": ratio <= 2.0}
        print(f"target: torch backend within 2x of DeepEP normal mode (dispatch + combine, bf16, "
              f"{args.normal_tokens} tokens): {ours:.0f} us vs {theirs:.0f} us = {ratio:.2f}x -> "
              f"{'MET' if ratio <= 2.0 else 'NOT MET'}")
        raw = total("deepep raw normal kernels", args.normal_tokens, "bf16")
        if raw:
            print(f"against DeepEP's kernels alone ({raw:.0f} us): {ours / raw:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "world": world, "date": date, "commit": commit,
                                               "rows": rows, "target": verdict}, indent=1))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
