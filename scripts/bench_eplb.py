"""Benchmark the EPLB planner on skewed synthetic load: balancedness and run time against DeepSeek's EPLB.

    python scripts/bench_eplb.py [--zipf 0.6 1.0 1.4] [--layers 61] [--experts 256] [--redundant 32]
                                 [--gpus 32] [--nodes 4] [--groups 8] [--seed 0] [--no-cli]

Load: per MoE layer, expert popularity follows Zipf(s) over a random permutation of the experts, and each
expert's count is drawn from Poisson(popularity x routed tokens). For each s, the table gives balancedness (mean
GPU load / max GPU load; mean and min over layers) and planning time for the trivial placement, DeepSeek's
published method (`eplb.baseline`) and `eplb.algorithm.rebalance`, under the hierarchical and the global policy.
Unless --no-cli, it then times `python -m eplb plan` end to end on the s = 1.0 load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eplb.algorithm import balancedness, rebalance, trivial_placement
from eplb.baseline import deepseek_rebalance
from eplb.packing import has_clash

ROUTED_TOKENS = 4_000_000  # per layer: e.g. 500k tokens x top-8


def zipf_load(layers: int, experts: int, s: float, seed: int) -> torch.Tensor:
    """Synthetic expert load `[layers, experts]` float64: Zipf(s) popularity, shuffled per layer, Poisson counts."""
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.arange(1, experts + 1, dtype=torch.float64) ** -s
    popularity /= popularity.sum()
    rows = [torch.poisson(popularity[torch.randperm(experts, generator=gen)] * ROUTED_TOKENS, generator=gen)
            for _ in range(layers)]
    return torch.stack(rows)


def equal_partitions(items: list[int], parts: int):
    """Every split of `items` into `parts` unordered blocks of equal size (105 for 8 groups on 4 nodes)."""
    if parts == 1:
        yield [items]
        return
    size, first, rest = len(items) // parts, items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        block = [first, *others]
        remaining = [i for i in rest if i not in others]
        for tail in equal_partitions(remaining, parts - 1):
            yield [block, *tail]


def hierarchical_cap(load: torch.Tensor, groups: int, nodes: int, gpus: int) -> torch.Tensor | None:
    """Per layer, the best balancedness any hierarchical placement can reach: mean GPU load over the least
    possible (largest node load / GPUs per node), over every packing of groups onto nodes. `[L]`, or None when
    there are too many packings to try."""
    if math.comb(groups, groups // nodes) > 1000:
        return None
    group_load = load.view(load.shape[0], groups, -1).sum(2)  # [L, K]
    best = torch.full((load.shape[0],), float("inf"), dtype=torch.float64)
    for split in equal_partitions(list(range(groups)), nodes):
        node_load = torch.stack([group_load[:, block].sum(1) for block in split], 1)  # [L, N]
        best = torch.minimum(best, node_load.max(1).values / (gpus // nodes))
    return load.sum(1) / gpus / best


def timed(fn, repeats: int = 3):
    """(result, median seconds) over `repeats` calls."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def bench(args: argparse.Namespace, s: float) -> None:
    load = zipf_load(args.layers, args.experts, s, args.seed)
    slots = args.experts + args.redundant
    trivial = balancedness(load, trivial_placement(args.layers, args.experts, slots, args.gpus), args.gpus)
    print(f"\nZipf s = {s}: {args.layers} layers x {args.experts} experts, {args.redundant} redundant -> {slots} "
          f"slots on {args.gpus} GPUs, {args.nodes} nodes, {args.groups} groups")
    print(f"{'method':<26} {'policy':<13} {'bal mean':>8} {'bal min':>8} {'time s':>7}")
    print(f"{'trivial (no EPLB)':<26} {'-':<13} {float(trivial.mean()):>8.4f} {float(trivial.min()):>8.4f} {'-':>7}")
    for policy, groups, nodes in (("hierarchical", args.groups, args.nodes), ("global", 1, 1)):
        base, t_base = timed(lambda g=groups, n=nodes: deepseek_rebalance(load, slots, g, n, args.gpus))
        ours, t_ours = timed(lambda p=policy: rebalance(load, slots, args.groups, args.nodes, args.gpus, p))
        b_base, b_ours = balancedness(load, base, args.gpus), balancedness(load, ours, args.gpus)
        for name, b, t in (("DeepSeek EPLB (baseline)", b_base, t_base), ("wideep rebalance", b_ours, t_ours)):
            print(f"{name:<26} {policy:<13} {float(b.mean()):>8.4f} {float(b.min()):>8.4f} {t:>7.3f}")
        worse = b_ours < b_base - 1e-12  # [L]
        gpu_of = torch.arange(slots).div(slots // args.gpus, rounding_mode="floor").expand(args.layers, slots)
        colocated = has_clash(base.phy2log, gpu_of, args.experts)  # [L] baseline puts 2 replicas on one GPU
        note = ""
        if worse.any():
            gap = float((b_base - b_ours)[worse].max())
            note = f" (largest gap {gap:.6f}; the baseline co-locates replicas in {int((worse & colocated).sum())})"
        print(f"{'':<26} {policy:<13} layers where wideep < baseline: {int(worse.sum())} of {args.layers}{note}")
        cap = hierarchical_cap(load, args.groups, args.nodes, args.gpus) if policy == "hierarchical" else None
        if cap is not None:
            print(f"{'':<26} {policy:<13} cap for any hierarchical placement (best groups-to-nodes packing): "
                  f"mean {float(cap.mean()):.4f}, min {float(cap.min()):.4f}")


def bench_cli(args: argparse.Namespace) -> None:
    load = zipf_load(args.layers, args.experts, 1.0, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "zipf.json"
        stats.write_text(json.dumps({"logical_count": load.to(torch.int64).tolist()}))
        command = [sys.executable, "-m", "eplb", "plan", "--stats", str(stats), "--num-gpus", str(args.gpus),
                   "--num-nodes", str(args.nodes), "--num-groups", str(args.groups), "--redundant",
                   str(args.redundant), "-o", str(Path(tmp) / "placement.json")]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                              check=False)
        wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"eplb plan failed ({done.returncode}): {done.stderr.strip()}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nCLI `python -m eplb plan` on the s = 1.0 load ({summary['policy']}): balancedness "
          f"{summary['before_mean']:.4f} -> {summary['after_mean']:.4f} (min {summary['before_min']:.4f} -> "
          f"{summary['after_min']:.4f}); planned in {summary['seconds']:.3f} s; whole process {wall:.2f} s "
          "(with Python and torch start-up, reading and writing)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zipf", type=float, nargs="+", default=[0.6, 1.0, 1.4], help="Zipf exponents s")
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--redundant", type=int, default=32)
    parser.add_argument("--gpus", type=int, default=32)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cli", action="store_true", help="skip timing `python -m eplb plan`")
    args = parser.parse_args()
    print(f"EPLB planner benchmark: torch {torch.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPU cores, {platform.machine()}")
    for s in args.zipf:
        bench(args, s)
    if not args.no_cli:
        bench_cli(args)


if __name__ == "__main__":
    main()
