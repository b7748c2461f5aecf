"""One rank of a multi-process test; started by `_parallel_ranks.run_ranks` (or by mpirun), never collected.

usage: _parallel_worker.py dispatch <launcher> <rank> <world> <port>   (launcher: flags | torchrun | slurm)
       _parallel_worker.py dispatch-env <cpu|cuda>   (under a real launcher: torchrun, srun, mpirun)
       _parallel_worker.py mpi
       _parallel_worker.py hang <kill|sleep> <rank> <world> <port> <timeout_s>

Every rank builds the same global problem from a seed, runs the `torch` dispatcher on its own share and compares with
`LocalDispatcher` on the whole problem. A failed check raises, so the rank exits non-zero with the reason on stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from engine.errors import WideepError
from parallel.dispatcher import LocalDispatcher, make_dispatcher
from parallel.launch import detect_launch_env
from parallel.state import ParallelState, destroy_parallel, init_parallel
from parallel.watchdog import Watchdog

H, L, K = 16, 3, 3  # hidden size, slots per rank, top-k


def fake_environ(launcher: str, rank: int, world: int, port: int) -> tuple[dict[str, str], dict]:
    """The environment `launcher` would give `rank`, and the flags the command line would carry."""
    if launcher == "flags":  # two simulated nodes on localhost, one process each
        return {}, {"nnodes": world, "node_rank": rank, "dist_init_addr": f"127.0.0.1:{port}"}
    if launcher == "torchrun":
        env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world,
               "GROUP_RANK": 0, "GROUP_WORLD_SIZE": 1, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "TORCHELASTIC_RUN_ID": "test"}
        return {k: str(v) for k, v in env.items()}, {}
    if launcher == "slurm":  # two nodes of world/2 tasks each, both named after this host's loopback
        per_node = world // 2
        env = {"SLURM_PROCID": rank, "SLURM_LOCALID": rank % per_node, "SLURM_NTASKS": world, "SLURM_NNODES": 2,
               "SLURM_NODEID": rank // per_node, "SLURM_TASKS_PER_NODE": f"{per_node}(x2)",
               "SLURM_JOB_NODELIST": "localhost,127.0.0.[1]", "MASTER_PORT": port, "SLURM_JOB_ID": "42"}
        return {k: str(v) for k, v in env.items()}, {}
    raise SystemExit(f"unknown launcher {launcher}")


def expert(x: torch.Tensor, slot: int) -> torch.Tensor:
    """A deterministic per-slot expert: `[n, H] -> [n, H]`, different for every global slot."""
    g = torch.Generator().manual_seed(1000 + slot)
    w = torch.randn(H, H, generator=g, dtype=torch.float32).to(x.dtype)
    return torch.tanh(x @ w)


def run_experts(hidden: torch.Tensor, counts: torch.Tensor, first_slot: int) -> torch.Tensor:
    """Contiguous layout `[N, H]` with `counts[e]` rows per slot -> expert outputs `[N, H]` (on hidden's device)."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        outs.append(expert(hidden[start : start + n].cpu(), first_slot + e).to(hidden.device))
        start += n
    return torch.cat(outs) if outs else hidden[:0]


def make_case(name: str, world: int, dtype: torch.dtype, seed: int):
    """Per-rank (x `[T_r, H]`, topk_ids `[T_r, K]`, topk_weights `[T_r, K]`) for every rank, identical on all."""
    g = torch.Generator().manual_seed(seed)
    slots = world * L
    counts = {
        "random": [5 + 3 * r for r in range(world)],
        "minus_one": [6] * world,
        "all_to_one": [4] * world,
        "zero_tokens": [0] + [5] * (world - 1),
        "one_rank_busy": [7] + [0] * (world - 1),
        "repeats": [4] * world,
    }[name]
    per_rank = []
    for t in counts:
        x = torch.randn(t, H, generator=g).to(dtype)
        ids = torch.stack([torch.randperm(slots, generator=g)[:K] for _ in range(t)]) if t else torch.zeros(0, K)
        ids = ids.long()
        if name == "minus_one":
            ids[torch.rand(t, K, generator=g) < 0.3] = -1
            ids[0] = -1  # a token that goes nowhere comes back as zeros
        if name == "all_to_one":
            ids = (world - 1) * L + torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(t)])
        if name == "repeats" and t:
            ids[:, 1] = ids[:, 0]  # the same slot twice for one token: two rows, both weighted
        w = torch.rand(t, K, generator=g, dtype=torch.float32)
        per_rank.append((x, ids, w))
    return per_rank


def reference(per_rank, world: int):
    """LocalDispatcher on the concatenated problem: (dispatched rows `[N, H]`, counts `[W*L]`, out `[sum T, H]`)."""
    x = torch.cat([p[0] for p in per_rank])
    ids = torch.cat([p[1] for p in per_rank])
    w = torch.cat([p[2] for p in per_rank])
    local = LocalDispatcher(num_local_slots=world * L)
    tokens, handle = local.dispatch(x, ids, w)
    y = run_experts(tokens.hidden, tokens.tokens_per_expert, 0)
    return tokens.hidden, tokens.tokens_per_expert, local.combine(y, handle)


def check_case(state: ParallelState, name: str, dtype: torch.dtype, seed: int) -> None:
    world, rank = state.world_size, state.rank
    per_rank = make_case(name, world, dtype, seed)
    ref_rows, ref_counts, ref_out = reference(per_rank, world)
    disp = make_dispatcher("torch", state=state, num_local_slots=L, hidden_size=H, dtype=dtype)
    x, ids, w = (t.to(state.device) for t in per_rank[rank])
    tokens, handle = disp.dispatch(x, ids, w)
    tokens.hidden, tokens.tokens_per_expert = tokens.hidden.cpu(), tokens.tokens_per_expert.cpu()

    # The rows reaching this rank are exactly the reference's rows for its slots, in the same order.
    lo = int(ref_counts[: rank * L].sum())
    hi = int(ref_counts[: (rank + 1) * L].sum())
    assert tokens.layout == "contiguous" and tokens.tokens_per_expert.shape == (L,), name
    assert torch.equal(tokens.tokens_per_expert, ref_counts[rank * L : (rank + 1) * L]), name
    assert torch.equal(tokens.hidden, ref_rows[lo:hi]), f"{name}: dispatched rows differ"

    y = run_experts(tokens.hidden, tokens.tokens_per_expert, rank * L).to(state.device)
    out = disp.combine(y, handle).cpu()
    start = sum(p[0].shape[0] for p in per_rank[:rank])
    want = ref_out[start : start + x.shape[0]]
    assert out.shape == want.shape and out.dtype == dtype, f"{name}: out {tuple(out.shape)} {out.dtype}"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = (out.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)
    assert err < tol or want.numel() == 0, f"{name} {dtype}: relative error {err:.3g} >= {tol}"


def check_bad_ids_raise_everywhere(state: ParallelState) -> None:
    """A slot id past the end on one rank is an error on every rank (no rank is left waiting for rows)."""
    disp = make_dispatcher("torch", state=state, num_local_slots=L, hidden_size=H, dtype=torch.float32)
    ids = torch.zeros(2, K, dtype=torch.long, device=state.device)
    if state.rank == state.world_size - 1:
        ids[1, 2] = state.world_size * L
    try:
        disp.dispatch(torch.zeros(2, H, device=state.device), ids, torch.ones(2, K, device=state.device))
    except WideepError as err:
        assert f"on rank(s) {state.world_size - 1} (1)" in str(err), err
    else:
        raise AssertionError("a slot id past the end was accepted")


def check_overlap(state: ParallelState, seed: int) -> None:
    """Two micro-batches with their halves interleaved as two-batch overlap would, each against the reference."""
    world, rank = state.world_size, state.rank
    cases = [make_case("random", world, torch.float32, seed), make_case("minus_one", world, torch.float32, seed + 1)]
    disp = make_dispatcher("torch", state=state, num_local_slots=L, hidden_size=H, dtype=torch.float32)
    pend = [disp.dispatch_start(*(t.to(state.device) for t in c[rank])) for c in cases]
    done = [disp.dispatch_wait(p) for p in reversed(pend)][::-1]
    ys = [run_experts(t.hidden, t.tokens_per_expert, rank * L) for t, _ in done]
    pend = [disp.combine_start(y, h) for y, (_, h) in zip(ys, done)]
    outs = [disp.combine_wait(p).cpu() for p in pend]
    for case, out in zip(cases, outs):
        _, _, ref_out = reference(case, world)
        start = sum(p[0].shape[0] for p in case[:rank])
        want = ref_out[start : start + out.shape[0]]
        assert (out - want).norm() / want.norm() < 1e-5, "overlapped micro-batches differ from the reference"


def dispatch_main(launcher: str, rank: int, world: int, port: int) -> None:
    environ, flags = fake_environ(launcher, rank, world, port)
    env = detect_launch_env(environ, **flags)
    state = init_parallel(env, ep_size=world, timeout_s=60, device_kind="cpu")
    assert state.source == launcher and state.rank == rank and state.backend == "gloo", state
    if launcher == "slurm":
        assert (state.node_rank, state.local_rank, state.nnodes) == (rank // 2, rank % 2, 2), state
    run_all_cases(state)


def dispatch_env_main(device: str) -> None:
    env = detect_launch_env(os.environ)
    state = init_parallel(env, ep_size=env.world_size, timeout_s=120, device_kind=device)
    assert state.device.type == device and state.backend == ("nccl" if device == "cuda" else "gloo"), state
    run_all_cases(state)


def run_all_cases(state: ParallelState) -> None:
    rank, world = state.rank, state.world_size
    with Watchdog(state, 60) as watchdog:
        for seed, name in enumerate(["random", "minus_one", "all_to_one", "zero_tokens", "one_rank_busy", "repeats"]):
            with watchdog.guard(seed, name):
                check_case(state, name, torch.float32, seed)
        with watchdog.guard("bad ids", "a slot past the end on the last rank"):
            check_bad_ids_raise_everywhere(state)
        with watchdog.guard("overlap", "two micro-batches"):
            check_overlap(state, 100)
        if world == 2:
            with watchdog.guard("bf16", "random bf16"):
                check_case(state, "random", torch.bfloat16, 7)
        dist.barrier()
    destroy_parallel(state)
    print(f"rank {rank} ok", flush=True)


def mpi_main() -> None:
    env = detect_launch_env(os.environ)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    assert env.source == "mpi" and (env.rank, env.world_size) == (comm.Get_rank(), comm.Get_size()), env
    assert env.nnodes == 1 and env.local_world_size == env.world_size, env
    state = init_parallel(env, ep_size=env.world_size, timeout_s=60, device_kind="cpu")
    check_case(state, "random", torch.float32, 3)
    destroy_parallel(state)
    print(f"rank {env.rank} of {env.world_size} mpi ok at {env.master_addr}:{env.master_port}", flush=True)


def hang_main(mode: str, rank: int, world: int, port: int, timeout_s: float) -> None:
    environ, flags = fake_environ("torchrun", rank, world, port)
    # kill: gloo reports the dead peer at once (the guard's error path). sleep: the process group's own timeout is
    # set far beyond the watchdog's, as NCCL's effectively is, so the monitor thread must end the wait.
    pg_timeout = timeout_s if mode == "kill" else 30 * timeout_s
    state = init_parallel(detect_launch_env(environ, **flags), ep_size=world, timeout_s=pg_timeout, device_kind="cpu")
    watchdog = Watchdog(state, timeout_s).start()
    t = torch.ones(4)
    for step in range(1000):
        if step == 3 and rank == world - 1:
            print(f"hanging {time.time()}", flush=True)
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)  # alive (its heartbeat goes on) but never reaches the collective
        with watchdog.guard(step, "all_reduce"):
            dist.all_reduce(t)
        time.sleep(0.05)
    raise SystemExit("the run should have been ended by the watchdog")


if __name__ == "__main__":
    torch.set_num_threads(1)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "dispatch":
        dispatch_main(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "dispatch-env":
        dispatch_env_main(args[0])
    elif cmd == "mpi":
        mpi_main()
    elif cmd == "hang":
        hang_main(args[0], int(args[1]), int(args[2]), int(args[3]), float(args[4]))
    else:
        raise SystemExit(f"unknown command {cmd}")
