"""Launch detection as a pure function of fake environments: torchrun, Slurm, MPI (a fake query), explicit flags."""

from __future__ import annotations

import pytest

from engine.errors import WideepError
from parallel.launch import LaunchEnv, MpiWorld, detect_launch_env, parse_dist_init_addr


def env_of(**values) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}


def fake_mpi(rank=1, size=4, local_rank=1, local_size=2, node_rank=0, nnodes=2, addr="node-a", port=23456):
    calls = []

    def query(dist_init_addr, environ):
        calls.append(dist_init_addr)
        host, port_ = parse_dist_init_addr(dist_init_addr) if dist_init_addr else (addr, port)
        return MpiWorld(rank, size, local_rank, local_size, node_rank, nnodes, host, port_)

    query.calls = calls
    return query


def test_nothing_means_one_process():
    env = detect_launch_env({})
    assert env == LaunchEnv("single", 0, 1, 0, 1, 0, 1, "127.0.0.1", 0)


def test_torchrun():
    environ = env_of(RANK=5, WORLD_SIZE=8, LOCAL_RANK=1, LOCAL_WORLD_SIZE=4, GROUP_RANK=1, GROUP_WORLD_SIZE=2,
                     MASTER_ADDR="10.1.2.3", MASTER_PORT=29500, TORCHELASTIC_RUN_ID="job")
    env = detect_launch_env(environ, nnodes=2, node_rank=1)
    assert env == LaunchEnv("torchrun", 5, 8, 1, 4, 1, 2, "10.1.2.3", 29500)
    assert env.init_method == "tcp://10.1.2.3:29500"


def test_torchrun_style_env_without_group_vars_derives_the_node():
    environ = env_of(RANK=6, WORLD_SIZE=8, LOCAL_RANK=2, LOCAL_WORLD_SIZE=4, MASTER_ADDR="h", MASTER_PORT=1234)
    env = detect_launch_env(environ)
    assert (env.node_rank, env.nnodes) == (1, 2)


def test_torchrun_rejects_dist_init_addr_and_disagreeing_flags():
    environ = env_of(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2, MASTER_ADDR="h", MASTER_PORT=1234)
    with pytest.raises(WideepError, match="--dist-init-addr is for launches without torchrun"):
        detect_launch_env(environ, dist_init_addr="h:1")
    with pytest.raises(WideepError, match="--nnodes 2 disagrees with torchrun, which launched 1 node"):
        detect_launch_env(environ, nnodes=2)
    with pytest.raises(WideepError, match="without MASTER_PORT"):
        detect_launch_env({k: v for k, v in environ.items() if k != "MASTER_PORT"})


SLURM = env_of(SLURM_PROCID=5, SLURM_LOCALID=1, SLURM_NTASKS=8, SLURM_NNODES=2, SLURM_NODEID=1, SLURM_JOB_ID=123456,
               SLURM_JOB_NODELIST="gpu[007-008]", SLURM_TASKS_PER_NODE="4(x2)")


def test_slurm_first_host_and_job_port():
    env = detect_launch_env(SLURM)
    assert env == LaunchEnv("slurm", 5, 8, 1, 4, 1, 2, "gpu007", 10000 + 123456 % 50000)


def test_slurm_step_variables_win_over_the_allocation():
    environ = dict(SLURM, SLURM_STEP_NUM_TASKS="6", SLURM_STEP_NUM_NODES="2", SLURM_STEP_NODELIST="gpu[010,003]",
                   SLURM_STEP_TASKS_PER_NODE="4,2", SLURM_NODEID="1", SLURM_PROCID="4", SLURM_LOCALID="0")
    env = detect_launch_env(environ)
    assert (env.world_size, env.local_world_size, env.master_addr) == (6, 2, "gpu010")


def test_slurm_rendezvous_overrides():
    env = detect_launch_env(dict(SLURM, MASTER_ADDR="ib-7", MASTER_PORT="4000"))
    assert (env.master_addr, env.master_port) == ("ib-7", 4000)
    env = detect_launch_env(SLURM, dist_init_addr="[fe80::1]:5000")
    assert (env.master_addr, env.master_port) == ("fe80::1", 5000)
    assert env.init_method == "tcp://[fe80::1]:5000"


def test_slurm_without_tasks_per_node_divides_evenly():
    environ = {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
    assert detect_launch_env(environ).local_world_size == 4


def test_slurm_missing_variable_is_named():
    environ = {k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}
    with pytest.raises(WideepError, match="without SLURM_LOCALID; start the tasks with srun"):
        detect_launch_env(environ)


def test_slurm_flags_must_agree():
    with pytest.raises(WideepError, match="--node-rank 0 disagrees with slurm, which says node 1"):
        detect_launch_env(SLURM, node_rank=0)


def test_open_mpi_wins_over_inherited_slurm_variables():
    query = fake_mpi()
    env = detect_launch_env(dict(SLURM, OMPI_COMM_WORLD_RANK="1"), mpi=query)
    assert env == LaunchEnv("mpi", 1, 4, 1, 2, 0, 2, "node-a", 23456)
    assert query.calls == [None]


def test_srun_with_pmix_is_slurm_but_hydra_inside_an_allocation_is_mpi():
    query = fake_mpi()
    assert detect_launch_env(dict(SLURM, PMIX_RANK="5"), mpi=query).source == "slurm"
    assert detect_launch_env(dict(SLURM, PMI_RANK="2"), mpi=query).source == "mpi"
    assert detect_launch_env(env_of(PMI_RANK=1, PMI_SIZE=4), mpi=query).source == "mpi"


def test_mpi_passes_dist_init_addr_to_the_query():
    query = fake_mpi()
    env = detect_launch_env(env_of(OMPI_COMM_WORLD_RANK=1), dist_init_addr="10.0.0.9:7000", mpi=query)
    assert (env.master_addr, env.master_port) == ("10.0.0.9", 7000) and query.calls == ["10.0.0.9:7000"]


def test_explicit_flags_one_process_per_node():
    env = detect_launch_env({}, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:29500")
    assert env == LaunchEnv("flags", 1, 2, 0, 1, 1, 2, "10.0.0.1", 29500)


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"nnodes": 2, "dist_init_addr": "h:1"}, "--nnodes 2 needs --node-rank"),
        ({"nnodes": 2, "node_rank": 0}, "--nnodes 2 needs --dist-init-addr"),
        ({"nnodes": 2, "node_rank": 2, "dist_init_addr": "h:1"}, "--node-rank 2 must be from 0 to 1 \\(--nnodes 2\\)"),
        ({"nnodes": 0}, "--nnodes 0 must be at least 1"),
        ({"node_rank": 1}, "--node-rank 1 needs --nnodes larger than 1"),
        ({"nnodes": 2, "node_rank": 0, "dist_init_addr": "nohostport"}, "--dist-init-addr 'nohostport' is not"),
        ({"nnodes": 2, "node_rank": 0, "dist_init_addr": "h:99999"}, "is not host:port"),
    ],
)
def test_bad_flags_name_the_flag(flags, message):
    with pytest.raises(WideepError, match=message):
        detect_launch_env({}, **flags)


def test_bad_launcher_values_are_named():
    with pytest.raises(WideepError, match="SLURM_PROCID='x' should be an integer"):
        detect_launch_env(dict(SLURM, SLURM_PROCID="x"))
    with pytest.raises(WideepError, match="rank 9 of world size 8 from slurm"):
        detect_launch_env(dict(SLURM, SLURM_PROCID="9"))
