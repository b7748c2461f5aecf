"""The bench's skewed prompt set, its warm-up, its throughput around the first EPLB rebalance, and its memory
fields."""

import json

import pytest
import torch

from engine.bench import main, parse_args, warmup_count
from engine.bench_rebalance import rebalance_throughput, rebalance_windows
from engine.build import ModelSource, build_model
from engine.datasets import random_requests
from engine.errors import WideepError
from engine.runner import Runner
from eplb.algorithm import balancedness
from eplb.placement import ExpertPlacement
from eplb.recorder import ExpertLoadRecorder


def prompts(*flags: str, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    return [r.input_ids for r in random_requests(parse_args(list(flags)), vocab, seed)]


def test_skewed_prompts_are_deterministic_and_zipf_distributed():
    flags = ("--dataset-name", "skewed", "--num-prompts", "100", "--random-input-len", "100",
             "--random-range-ratio", "1.0")
    first = prompts(*flags)
    assert first == prompts(*flags)
    assert first != prompts(*flags, seed=1)
    counts = torch.bincount(torch.tensor(first).flatten(), minlength=512).sort(descending=True).values.double()
    # log frequency falls linearly in log rank with slope -exponent (ranks 1..30 hold enough samples to fit)
    ranks = torch.arange(1, 31, dtype=torch.float64).log()
    freq = counts[:30].log()
    slope = ((ranks - ranks.mean()) * (freq - freq.mean())).sum() / ((ranks - ranks.mean()) ** 2).sum()
    assert slope.item() == pytest.approx(-1.2, abs=0.15)
    harmonic = sum(k ** -1.2 for k in range(1, 513))
    assert counts[0].item() / counts.sum().item() == pytest.approx(1 / harmonic, rel=0.1)
    flatter = torch.bincount(torch.tensor(prompts(*flags, "--skew-exponent", "0.5")).flatten(), minlength=512)
    assert flatter.max() < counts[0]
    # uniform ids of the random set: no token comes near the Zipf head's count (~1,800 of 10,000)
    uniform = torch.bincount(torch.tensor(prompts(*flags[2:])).flatten(), minlength=512)
    assert uniform.max() < 50


def test_skewed_prompts_skew_expert_load_with_dummy_weights():
    model = build_model(ModelSource.resolve("tiny"), device=torch.device("cpu"), dtype=torch.float32,
                        progress=False)
    placement = ExpertPlacement.trivial(len(model.cfg.moe_layers), model.cfg.n_routed_experts)
    mean_balancedness = {}
    for dataset in ("random", "skewed"):
        recorder = ExpertLoadRecorder(len(model.cfg.moe_layers), model.cfg.n_routed_experts, window=1)
        for layer in model.moe_layers():
            layer.recorder = recorder
        args = parse_args(["--dataset-name", dataset, "--num-prompts", "8", "--random-input-len", "32",
                           "--random-output-len", "4", "--random-range-ratio", "1.0"])
        Runner(model).generate(random_requests(args, model.cfg.vocab_size, seed=0))
        recorder.end_step()
        load = recorder.window_load().double()  # [L, E] over the whole run
        mean_balancedness[dataset] = balancedness(load, placement, 4).mean().item()
    assert mean_balancedness["skewed"] < mean_balancedness["random"] - 0.05


def test_bad_skew_exponent_is_one_message():
    for bad in ("0", "-1", "nan"):
        with pytest.raises(WideepError, match="--skew-exponent"):
            parse_args(["--skew-exponent", bad])


def test_rebalance_windows_split_decode_steps_at_the_first_rebalance():
    log = {4: (4, 0.1), 5: (4, 0.1), 6: (3, 0.2), 8: (2, 0.1), 9: (1, 0.1)}  # step -> (tokens, seconds)
    # rebalances at 2 (warm-up, before the log), 5 and 8: before = steps <= 5, after = steps 6..8
    assert rebalance_windows(log, [2, 5, 8]) == pytest.approx([8, 0.2, 5, 0.3])
    assert rebalance_windows(log, [2]) is None
    assert rebalance_windows(log, [9]) == pytest.approx([14, 0.6, 0, 0])
    both = rebalance_throughput([[8, 0.2, 5, 0.3], [4, 0.4, 5, 0.2]])  # tokens summed, slowest rank's seconds
    assert both == pytest.approx({"throughput_before_rebalance": 30.0, "throughput_after_rebalance": 10 / 0.3})
    assert rebalance_throughput([[8, 0.2, 0, 0]]) == pytest.approx({"throughput_before_rebalance": 40.0})
    assert rebalance_throughput([None, [1, 1, 1, 1]]) == {}


def test_bench_reports_throughput_around_the_first_rebalance_and_memory(capsys):
    flags = ["--dataset-name", "skewed", "--num-prompts", "8", "--random-input-len", "16", "--random-output-len",
             "10", "--random-range-ratio", "1.0", "--max-running-requests", "8", "--no-step-breakdown"]
    assert main(flags + ["--enable-eplb", "--eplb-rebalance-num-iterations", "3", "--runtime", "static"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["dataset_name"] == "skewed" and result["skew_exponent"] == 1.2
    assert len(result["eplb_rebalances"]) >= 2
    assert result["throughput_before_rebalance"] > 0 and result["throughput_after_rebalance"] > 0
    assert "Decode tok/s before / after rebalance" in out
    assert result["weight_bytes_per_rank"] == [result["weight_bytes"]]
    # static runner: one slot per token of the batch, every layer, kv_cache_dim values of 4 bytes
    cfg = ModelSource.resolve("tiny").cfg
    assert result["kv_cache_bytes_per_rank"] == [8 * 26 * cfg.num_hidden_layers * cfg.kv_cache_dim * 4]

    assert main(flags) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "throughput_before_rebalance" not in result and result["eplb_rebalances"] == []


def test_warmup_fills_one_prefill_step_unless_told():
    """By default the warm-up runs a full prefill step's worth of prompts, so full steps' kernels are compiled
    before timing; an explicit count (0 included) wins, and it never exceeds the benchmark's prompts."""
    assert warmup_count(parse_args(["--random-input-len", "2000", "--num-prompts", "256"])) == 5  # 8192 tokens
    assert warmup_count(parse_args(["--random-input-len", "2000", "--num-prompts", "3"])) == 3
    assert warmup_count(parse_args(["--random-input-len", "100", "--num-prompts", "256",
                                    "--chunked-prefill-size", "1024"])) == 11
    assert warmup_count(parse_args(["--random-input-len", "20000", "--num-prompts", "8"])) == 1
    assert warmup_count(parse_args(["--warmup-requests", "0", "--num-prompts", "8"])) == 0
