"""`python -m eplb`: plan an expert placement from recorded load, show a file, simulate a placement on other load.

    python -m eplb plan --stats FILE --num-gpus G [--num-nodes N] [--num-groups K | --model DIR] [--redundant R]
                        [--algorithm auto|hierarchical|global] -o placement.json [--plot PNG]
    python -m eplb show FILE [--layer L]
    python -m eplb simulate --stats FILE --placement placement.json

Each command prints a short table; its last stdout line is a JSON summary for scripts. Bad input prints one
`error: ...` line on stderr and exits with code 2, and nothing is written (outputs appear only after success).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from engine.errors import WideepError, run_cli
from eplb.algorithm import (
    ALGORITHMS,
    balancedness,
    check_layout,
    gpu_load,
    rebalance,
    resolve_algorithm,
    trivial_placement,
)
from eplb.placement_file import PlacementFile, is_placement, placement_from_json, read_placement, write_placement
from eplb.stats import ExpertLoad, read_expert_load, read_json, sniff

# Print every layer's GPU layout in `show` when the placement is at most this many slots over all layers.
_SHOW_ALL_SLOTS = 256


def _count(min_value: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None
        if value < min_value:
            raise argparse.ArgumentTypeError(f"must be >= {min_value}, found {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eplb", description="Expert-parallel load balancer (EPLB).")
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="plan a placement from recorded expert load")
    plan.add_argument("--stats", required=True, help="expert load: JSON, wideep dump (.safetensors) or SGLang .pt")
    plan.add_argument("--num-gpus", type=_count(1), required=True, help="GPUs (EP ranks) the experts spread over")
    plan.add_argument("--num-nodes", type=_count(1), default=1, help="nodes the GPUs sit on (default 1)")
    groups = plan.add_mutually_exclusive_group()
    groups.add_argument("--num-groups", type=_count(1), help="expert groups (the model's n_group; default 1)")
    groups.add_argument("--model", help="checkpoint folder whose config.json gives n_group (and checks the shape)")
    plan.add_argument("--redundant", type=_count(0), default=0, help="redundant expert slots (default 0)")
    plan.add_argument("--algorithm", choices=ALGORITHMS, default="auto",
                      help="auto: hierarchical when nodes divide groups, else global")
    plan.add_argument("-o", "--output", required=True, help="placement JSON to write")
    plan.add_argument("--plot", help="also draw GPU load before/after and balancedness per layer to this PNG")
    plan.set_defaults(func=cmd_plan)

    show = commands.add_parser("show", help="summarise a statistics file or a placement")
    show.add_argument("file")
    show.add_argument("--layer", type=_count(0), help="print the GPU layout of this MoE layer (placements)")
    show.set_defaults(func=cmd_show)

    sim = commands.add_parser("simulate", help="balancedness a placement gives on other recorded load")
    sim.add_argument("--stats", required=True, help="expert load to replay")
    sim.add_argument("--placement", required=True, help="placement JSON written by `plan`")
    sim.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def cli() -> None:
    run_cli(main)


# ----- plan -----
def cmd_plan(args: argparse.Namespace) -> int:
    plot = None
    if args.plot:
        from eplb import plot  # matplotlib is checked before any work, so a missing one costs nothing

        plot.require_matplotlib()
    for out in filter(None, (args.output, args.plot)):
        folder = Path(out).parent
        if not folder.is_dir():
            raise WideepError(f"cannot write {out}: folder {folder} does not exist; create it or choose another path")
    stats = read_expert_load(args.stats)
    load = stats.load  # [L, E]
    layers, experts = load.shape
    groups = args.num_groups or 1
    if args.model:
        groups = _groups_from_model(args.model, layers, experts)
    slots = experts + args.redundant
    check_layout(experts, slots, groups, args.num_nodes, args.num_gpus)
    policy = resolve_algorithm(args.algorithm, groups, args.num_nodes)

    start = time.perf_counter()
    placement = rebalance(load, slots, groups, args.num_nodes, args.num_gpus, args.algorithm)
    seconds = time.perf_counter() - start
    trivial = trivial_placement(layers, experts, slots, args.num_gpus)
    before, after = balancedness(load, trivial, args.num_gpus), balancedness(load, placement, args.num_gpus)

    inputs = {"stats": str(args.stats), "num_gpus": args.num_gpus, "num_nodes": args.num_nodes,
              "num_groups": groups, "redundant": args.redundant, "algorithm": args.algorithm, "policy": policy,
              "model": args.model}
    if args.plot:
        plot.plot_plan(args.plot, gpu_load(load, trivial, args.num_gpus), gpu_load(load, placement, args.num_gpus),
                       before, after, f"{Path(args.stats).name}: {policy}, {slots} slots on {args.num_gpus} GPUs")
    write_placement(args.output, placement, inputs, before, after)

    print(f"eplb plan: {_describe_load(args.stats, stats)} -> {slots} slots on {args.num_gpus} GPUs, "
          f"{args.num_nodes} nodes, {groups} groups; policy {policy}")
    _print_table([("before", before), ("after", after)])
    wrote = f"{args.output} and {args.plot}" if args.plot else args.output
    print(f"layers {layers}, planned in {seconds:.3f} s, wrote {wrote}")
    _summary(command="plan", layers=layers, experts=experts, slots=slots, gpus=args.num_gpus, nodes=args.num_nodes,
             groups=groups, redundant=args.redundant, policy=policy, **_stats("before", before),
             **_stats("after", after), seconds=seconds, output=str(args.output), plot=args.plot)
    return 0


def _groups_from_model(model_dir: str, layers: int, experts: int) -> int:
    """n_group from the checkpoint's config.json, after checking the statistics fit that model."""
    from engine.config import ModelConfig

    config = ModelConfig.from_file(model_dir)
    if config.n_routed_experts != experts:
        raise WideepError(f"the statistics have {experts} experts per layer but {model_dir}/config.json has "
                          f"n_routed_experts = {config.n_routed_experts}; pass statistics recorded on this model")
    if len(config.moe_layers) != layers:
        raise WideepError(f"the statistics have {layers} MoE layers but {model_dir}/config.json has "
                          f"{len(config.moe_layers)}; pass statistics recorded on this model")
    return config.n_group


# ----- show -----
def cmd_show(args: argparse.Namespace) -> int:
    if sniff(args.file) == "json":
        raw = read_json(args.file)
        if is_placement(raw):
            return _show_placement(args.file, placement_from_json(raw, str(args.file)), args.layer)
    stats = read_expert_load(args.file)
    load = stats.load  # [L, E]
    per_layer_mean = load.mean(1).clamp_min(1e-12)  # [L]
    hot = load.max(1)  # values, indices: [L]
    ratio = hot.values / per_layer_mean  # [L] hottest expert over the mean expert
    worst = int(ratio.argmax())
    print(f"{args.file}: expert load, {_describe_load(args.file, stats)}, {int(load.sum())} tokens routed")
    print(f"hottest expert per layer: {float(ratio.mean()):.2f}x the mean expert on average; worst layer {worst} "
          f"(expert {int(hot.indices[worst])}, {float(ratio[worst]):.2f}x)")
    if stats.metadata:
        print("metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.metadata.items())))
    _summary(command="show", kind=stats.kind, layers=load.shape[0], experts=load.shape[1], steps=stats.steps,
             tokens=int(load.sum()), hot_ratio_mean=float(ratio.mean()), hot_ratio_max=float(ratio[worst]))
    return 0


def _show_placement(path: str, pf: PlacementFile, layer: int | None) -> int:
    p = pf.placement
    gpus = pf.num_gpus
    inputs = pf.inputs
    where = f" on {gpus} GPUs" if gpus else ""
    policy = f" ({inputs.get('policy')}, {inputs.get('num_nodes')} nodes, {inputs.get('num_groups')} groups)" \
        if "policy" in inputs else ""
    replicated = int((p.logcnt > 1).sum())
    print(f"{path}: placement of {p.num_layers} layers x {p.num_experts} experts -> {p.num_slots} slots{where}{policy}")
    print(f"replicas: {replicated} (layer, expert) pairs replicated over all layers, at most {int(p.logcnt.max())} "
          "replicas of one expert")
    if len(pf.balancedness_after) == p.num_layers and len(pf.balancedness_before) == p.num_layers:
        _print_table([("before", pf.balancedness_before), ("after", pf.balancedness_after)])
    if layer is not None and layer >= p.num_layers:
        raise WideepError(f"--layer {layer} is out of range; the placement has {p.num_layers} MoE layers")
    layers = [layer] if layer is not None else range(p.num_layers) if p.num_layers * p.num_slots <= _SHOW_ALL_SLOTS \
        else []
    per_gpu = p.slots_per_rank(gpus) if gpus else p.num_slots
    for index in layers:
        print(f"layer {index}:")
        for rank in range(p.num_slots // per_gpu):
            print(f"  GPU {rank}: " + " ".join(str(e) for e in p.local_experts(index, rank, p.num_slots // per_gpu)))
    summary: dict[str, Any] = {"command": "show", "kind": "placement", "layers": p.num_layers,
                               "experts": p.num_experts, "slots": p.num_slots, "gpus": gpus,
                               "policy": inputs.get("policy")}
    if len(pf.balancedness_after):
        summary.update(**_stats("before", pf.balancedness_before), **_stats("after", pf.balancedness_after))
    _summary(**summary)
    return 0


# ----- simulate -----
def cmd_simulate(args: argparse.Namespace) -> int:
    pf = read_placement(args.placement)
    stats = read_expert_load(args.stats)
    load, p = stats.load, pf.placement  # load: [L, E]
    if tuple(load.shape) != (p.num_layers, p.num_experts):
        raise WideepError(
            f"{args.stats} has {load.shape[0]} layers x {load.shape[1]} experts but {args.placement} places "
            f"{p.num_layers} x {p.num_experts}; replay load recorded on the same model"
        )
    gpus = pf.num_gpus
    if gpus is None:
        raise WideepError(f"{args.placement}: inputs.num_gpus is missing; write the placement with `eplb plan`")
    trivial = trivial_placement(p.num_layers, p.num_experts, p.num_slots, gpus)
    rows = [("trivial", balancedness(load, trivial, gpus)), ("placement", balancedness(load, p, gpus))]
    inputs = pf.inputs
    if all(isinstance(inputs.get(k), int) for k in ("num_groups", "num_nodes")):
        # Planning on this very load shows how much of the gap is the placement being stale.
        best = rebalance(load, p.num_slots, inputs["num_groups"], inputs["num_nodes"], gpus,
                         inputs.get("policy") or "auto")
        rows.append(("replanned", balancedness(load, best, gpus)))
    print(f"eplb simulate: {args.placement} ({p.num_slots} slots on {gpus} GPUs) on "
          f"{_describe_load(args.stats, stats)}")
    _print_table(rows)
    _summary(command="simulate", layers=p.num_layers, experts=p.num_experts, slots=p.num_slots, gpus=gpus,
             **{k: v for name, b in rows for k, v in _stats(name, b).items()})
    return 0


# ----- output helpers -----
def _describe_load(path: str, stats: ExpertLoad) -> str:
    layers, experts = stats.load.shape
    steps = f"{stats.steps} step" + ("s" if stats.steps != 1 else "")
    return f"{Path(path).name} ({layers} layers x {experts} experts, {stats.kind}, {steps})"


def _print_table(rows: list[tuple[str, torch.Tensor]]) -> None:
    """Balancedness per row: mean and min over layers."""
    print(f"{'balancedness':<12} {'mean':>7} {'min':>7}")
    for name, values in rows:
        print(f"{name:<12} {float(values.mean()):>7.4f} {float(values.min()):>7.4f}")


def _stats(name: str, values: torch.Tensor) -> dict[str, float]:
    return {f"{name}_mean": float(values.mean()), f"{name}_min": float(values.min())}


def _summary(**fields: Any) -> None:
    rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in fields.items()}
    print(json.dumps(rounded))
