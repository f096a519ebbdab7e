"""Reading the distributed environment: Slurm's variables, torchrun's, none."""

import pytest

from pipeline.job.env import DistEnv, port_for_job
from pipeline.job.placement import gpu_index
from pipeline.launcher.local import simulated_slurm_env

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[07-08],cpu3",
         "SLURM_NTASKS": "6", "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
         "SLURMD_NODENAME": "gpu08", "SLURM_RESTART_COUNT": "2"}


@pytest.fixture
def environ(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                "SUBMITIT_EXECUTOR", *SLURM):
        monkeypatch.delenv(key, raising=False)

    def _set(values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)
    return _set


def test_slurm_variables(environ):
    environ(SLURM)
    env = DistEnv.detect()
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 3, 6, 1, 2)
    assert (env.node_rank, env.num_nodes, env.node_name, env.restart_count) == (1, 3, "gpu08", 2)
    # the first node of the allocation, and a port derived from the job id (the same on every rank)
    assert env.master_addr == "gpu07"
    assert env.master_port == port_for_job("4242") and 20000 <= env.master_port <= 60000
    env.check_world(nodes=3, tasks_per_node=2)


def test_exported_master_address_wins(environ):
    environ({**SLURM, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    env = DistEnv.detect()
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 1234)


def test_torchrun_variables_win_over_slurm(environ):
    environ({**SLURM, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
             "MASTER_ADDR": "host1", "MASTER_PORT": "29400"})
    env = DistEnv.detect()
    assert (env.source, env.rank, env.world_size, env.node_rank, env.num_nodes) == ("torchrun", 5, 8, 1, 2)


def test_no_launcher_means_one_process(environ):
    env = DistEnv.detect()
    assert (env.source, env.rank, env.world_size) == ("single", 0, 1)


def test_world_mismatch_fails_with_every_factor(environ):
    environ({**SLURM, "SLURM_NTASKS": "3", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"})
    with pytest.raises(RuntimeError) as e:
        DistEnv.detect().check_world(nodes=3, tasks_per_node=2)
    message = str(e.value)
    assert "nodes(3) x cluster.tasks_per_node(2) = 6" in message and "WORLD_SIZE(3)" in message
    assert "--ntasks-per-node=2" in message


def test_simulated_nodes_look_like_a_slurm_step(environ):
    ranks = []
    for node in range(2):
        for local in range(3):
            environ(simulated_slurm_env("local-1", nodes=2, tasks_per_node=3, node=node, local=local))
            ranks.append(DistEnv.detect())
    assert [e.rank for e in ranks] == list(range(6))
    assert {e.world_size for e in ranks} == {6} and {e.num_nodes for e in ranks} == {2}
    assert [e.node_name for e in ranks] == ["local1"] * 3 + ["local2"] * 3
    assert [e.local_rank for e in ranks] == [0, 1, 2] * 2


@pytest.mark.parametrize("choice, slot, sharing, gpus, local, expected", [
    ("auto", 3, 4, 0, False, None),      # no GPU: the CPU
    ("cpu", 0, 1, 8, False, None),       # asked for the CPU
    ("auto", 3, 4, 8, False, 3),         # a cluster node: LOCAL_RANK picks the GPU
    ("auto", 3, 4, 4, True, 3),          # local debug mode: the global rank does (every rank is on this machine)
    ("auto", 1, 4, 1, False, 0),         # a rank bound to its own GPU by srun sees just that one
    ("auto", 1, 2, 1, True, None),       # local debug mode, 2 ranks, 1 GPU: they would share it; the CPU
])
def test_gpu_per_rank(choice, slot, sharing, gpus, local, expected):
    assert gpu_index(choice, slot, sharing, gpus, same_gpus_for_all=local) == expected


@pytest.mark.parametrize("choice, sharing, gpus, local, names", [
    ("cuda", 1, 0, False, ["trainer.device=cuda", "no CUDA device"]),
    ("cuda", 2, 1, True, ["all 2 ranks", "1 GPU(s)", "trainer.device=cpu"]),
    ("auto", 4, 2, False, ["4 ranks (cluster.tasks_per_node)", "2 GPU(s)", "one GPU per rank"]),
])
def test_gpu_sharing_is_refused_with_a_reason(choice, sharing, gpus, local, names):
    with pytest.raises(RuntimeError) as e:
        gpu_index(choice, 0, sharing, gpus, same_gpus_for_all=local)
    for name in names:
        assert name in str(e.value)
