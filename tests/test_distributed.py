"""Reading the distributed environment: Slurm's variables, torchrun's, none."""

from pathlib import Path

import pytest

from pipeline.job.env import DistEnv
from pipeline.slurm import port_for_job
from pipeline.job.placement import gpu_index
from pipeline.launcher.local import simulated_slurm_env

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[07-08],cpu3",
         "SLURM_NTASKS": "6", "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
         "SLURMD_NODENAME": "gpu08", "SLURM_RESTART_COUNT": "2"}


@pytest.fixture
def environ(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                "SUBMITIT_EXECUTOR", "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_TASK",
                "SLURM_NTASKS_PER_NODE", *SLURM):
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
    assert env.master_port == port_for_job("4242")
    env.check_world(nodes=3, tasks_per_node=2)


def test_the_rendezvous_port_is_never_one_the_kernel_hands_out_to_outgoing_connections():
    """A port in the ephemeral range may be held by any connection of the node: the store would fail to listen."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(1024 < port_for_job(str(job)) < low for job in range(1, 5001))


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


def slurm_task(local: int, tasks_per_node: int, **gpu_vars: str) -> dict:
    """A Slurm task's variables on node 0 of 2, as srun sets them, with the GPU ones given."""
    return {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[1-2]",
            "SLURM_NTASKS": str(2 * tasks_per_node), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
            "SLURM_NODEID": "0", "SLURM_PROCID": str(local), "SLURM_LOCALID": str(local), "SLURMD_NODENAME": "gpu1",
            **gpu_vars}


@pytest.mark.parametrize("task, gpus, expected", [
    # srun --gpus-per-task=1 (or --gpu-bind=single:1): each of 4 tasks sees its own GPU, the step has 4 here
    (slurm_task(2, 4, SLURM_GPUS_ON_NODE="4", SLURM_GPUS_PER_TASK="1", CUDA_VISIBLE_DEVICES="2"), 1, 0),
    # srun --gpus-per-task=2: 4 tasks with 2 GPUs each on an 8-GPU node; a task trains on the first of its own
    (slurm_task(3, 4, SLURM_GPUS_ON_NODE="8", SLURM_GPUS_PER_TASK="a100:2", CUDA_VISIBLE_DEVICES="6,7"), 2, 0),
    (slurm_task(1, 2, SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="2,3"), 2, 0),  # --gpu-bind=map_gpu:0,2
    # an older Slurm without SLURM_GPUS_ON_NODE: --gpus-per-task x the node's tasks is the step's share
    (slurm_task(3, 4, SLURM_GPUS_PER_TASK="1", CUDA_VISIBLE_DEVICES="3"), 1, 0),
    # no binding: every task sees the node's 4 GPUs, SLURM_LOCALID picks one
    (slurm_task(3, 4, SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="0,1,2,3"), 4, 3),
    (slurm_task(1, 2, SLURM_GPUS_ON_NODE="8", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), 8, 1),
    (slurm_task(1, 4, SLURM_GPUS_ON_NODE="4"), 0, None),  # no CUDA device seen: the CPU
])
def test_a_slurm_task_takes_its_own_gpu_or_its_local_ones(environ, task, gpus, expected):
    environ(task)
    assert gpu_index("auto", DistEnv.detect(), gpus, local_mode=False) == expected
    assert gpu_index("cpu", DistEnv.detect(), gpus, local_mode=False) is None


def test_torchrun_ranks_share_their_agents_gpus_even_in_a_bound_slurm_task(environ):
    # one Slurm task per node bound to 2 of the node's 8 GPUs, running torchrun with 2 ranks
    environ({**slurm_task(0, 1, SLURM_GPUS_ON_NODE="8", CUDA_VISIBLE_DEVICES="0,1"), "RANK": "1", "WORLD_SIZE": "4",
             "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert gpu_index("auto", DistEnv.detect(), 2, local_mode=False) == 1


@pytest.mark.parametrize("nodes, tasks, gpus, expected", [
    (2, 2, 4, [0, 1, 2, 3]),       # the global rank picks: all 4 ranks are on this machine
    (2, 2, 2, [None] * 4),         # 4 ranks, 2 GPUs: they would share; the CPU under trainer.device=auto
    (1, 2, 1, [None, None]),
    (1, 1, 1, [0]),
])
def test_local_debug_mode_gives_each_rank_a_gpu_or_all_the_cpu(environ, nodes, tasks, gpus, expected):
    got = []
    for rank in range(nodes * tasks):
        environ({**simulated_slurm_env("local-1", nodes, tasks, rank // tasks, rank % tasks),
                 "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))})
        got.append(gpu_index("auto", DistEnv.detect(), gpus, local_mode=True))
    assert got == expected


@pytest.mark.parametrize("choice, task, gpus, local, names", [
    ("cuda", slurm_task(0, 1), 0, False, ["trainer.device=cuda", "no CUDA device"]),
    ("cuda", simulated_slurm_env("local-1", 1, 2, 0, 1), 1, True,
     ["all 2 ranks", "1 GPU(s) (CUDA_VISIBLE_DEVICES=unset)", "trainer.device=cpu"]),
    # no binding, 4 tasks seeing the same 2 GPUs: refused on a cluster even under auto
    ("auto", slurm_task(3, 4, SLURM_GPUS_ON_NODE="2", CUDA_VISIBLE_DEVICES="0,1"), 2, False,
     ["4 ranks (cluster.tasks_per_node)", "2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1)", "one GPU per rank"]),
    # srun --ntasks-per-gpu=2: each task is bound to one GPU, but two tasks to each
    ("auto", slurm_task(1, 4, SLURM_GPUS_ON_NODE="2", CUDA_VISIBLE_DEVICES="0"), 1, False,
     ["4 ranks (cluster.tasks_per_node)", "gave the step 2 GPU(s)", "share a GPU", "trainer.device=cpu"]),
])
def test_gpu_sharing_is_refused_with_a_reason(environ, choice, task, gpus, local, names):
    environ(task)
    with pytest.raises(RuntimeError) as e:
        gpu_index(choice, DistEnv.detect(), gpus, local_mode=local)
    for name in names:
        assert name in str(e.value)
