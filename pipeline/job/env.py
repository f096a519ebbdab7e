"""Where this process sits in the job, read from the environment in one place.

Three sources, in this order: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, ...), Slurm's (SLURM_PROCID,
SLURM_NTASKS, ...; local debug mode sets the same ones for its simulated nodes), or none (one process).
Everything below this module receives plain ints.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from submitit.slurm.slurm import SlurmJobEnvironment

from pipeline.slurm import RESTART_COUNT_VAR, port_for_job

@dataclass(frozen=True)
class DistEnv:
    source: str  # "torchrun" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    node_name: str  # the scheduler's name for this node (SLURMD_NODENAME), else the hostname
    job_id: Optional[str] = None
    nodelist: Optional[str] = None
    restart_count: int = 0
    # torchrun's agent hosts the rendezvous store on master_addr:master_port and every rank is its client;
    # otherwise rank 0 hosts it
    agent_store: bool = False
    visible_gpus: Optional[str] = None  # CUDA_VISIBLE_DEVICES as this process got it (unset: every GPU)
    # A Slurm task's step GPUs on its node: SLURM_GPUS_ON_NODE, else --gpus-per-task x the node's tasks. When
    # srun binds each task to its own GPUs (--gpus-per-task, --gpu-bind, --ntasks-per-gpu), CUDA_VISIBLE_DEVICES
    # (and SLURM_STEP_GPUS) list the task's GPUs alone, while SLURM_GPUS_ON_NODE still counts the step's
    # (Slurm's gres_common_gpu_set_env), so a task that sees fewer GPUs than this has them to itself.
    step_gpus_on_node: Optional[int] = None

    @classmethod
    def detect(cls) -> "DistEnv":
        environ = os.environ
        if "RANK" in environ and "WORLD_SIZE" in environ and "LOCAL_RANK" in environ:
            return cls._from_torchrun(environ)
        if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
            return cls._from_slurm(environ)
        return cls(source="single", rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                   num_nodes=1, master_addr="127.0.0.1", master_port=_int(environ, "MASTER_PORT", 0),
                   node_name=socket.gethostname(), visible_gpus=environ.get("CUDA_VISIBLE_DEVICES"))

    @classmethod
    def _from_torchrun(cls, environ: Mapping[str, str]) -> "DistEnv":
        world = int(environ["WORLD_SIZE"])
        local_world = _int(environ, "LOCAL_WORLD_SIZE", world)
        return cls(source="torchrun", rank=int(environ["RANK"]), world_size=world,
                   local_rank=int(environ["LOCAL_RANK"]), local_world_size=local_world,
                   node_rank=_int(environ, "GROUP_RANK", int(environ["RANK"]) // local_world),
                   num_nodes=max(1, world // local_world), master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=_int(environ, "MASTER_PORT", 29500), node_name=socket.gethostname(),
                   job_id=environ.get("SLURM_JOB_ID"), nodelist=environ.get("SLURM_JOB_NODELIST"),
                   agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
                   visible_gpus=environ.get("CUDA_VISIBLE_DEVICES"))

    @classmethod
    def _from_slurm(cls, environ: Mapping[str, str]) -> "DistEnv":
        slurm = SlurmJobEnvironment()  # parses the compressed nodelist, e.g. n[1-3,5]
        hostnames = slurm.hostnames
        # An explicitly exported MASTER_ADDR wins (local debug mode exports one); otherwise the allocation's
        # first node, never a silent fallback to localhost.
        master = environ.get("MASTER_ADDR") or hostnames[0]
        # a step on some of the allocation's nodes (a search's trial: pipeline/search/worker.py) has its own count
        num_nodes = _int(environ, "SLURM_STEP_NUM_NODES", slurm.num_nodes)
        local_world = slurm.num_tasks // num_nodes
        per_task = _gpu_count(environ.get("SLURM_GPUS_PER_TASK"))
        return cls(source="slurm", rank=slurm.global_rank, world_size=slurm.num_tasks,
                   local_rank=slurm.local_rank, local_world_size=local_world,
                   node_rank=slurm.node, num_nodes=num_nodes, master_addr=master,
                   master_port=_int(environ, "MASTER_PORT", port_for_job(slurm.job_id)),
                   node_name=environ.get("SLURMD_NODENAME", socket.gethostname()),
                   job_id=slurm.job_id, nodelist=environ.get("SLURM_JOB_NODELIST"),
                   restart_count=_int(environ, RESTART_COUNT_VAR, _int(environ, "SLURM_RESTART_COUNT", 0)),
                   visible_gpus=environ.get("CUDA_VISIBLE_DEVICES"),
                   step_gpus_on_node=_gpu_count(environ.get("SLURM_GPUS_ON_NODE"))
                   or (per_task * local_world if per_task else None))

    def check_world(self, nodes: int, tasks_per_node: int) -> None:
        """Fail fast when the launcher gave a different world than the config asks for."""
        expected = nodes * tasks_per_node
        if self.world_size != expected or self.num_nodes != nodes:
            raise RuntimeError(
                f"the config asks for nodes({nodes}) x cluster.tasks_per_node({tasks_per_node}) = {expected} ranks, "
                f"but {self.source} started nodes({self.num_nodes}) with WORLD_SIZE({self.world_size}). "
                f"HINT: run the worker with `srun --nodes={nodes} --ntasks-per-node={tasks_per_node}` "
                f"(or set nodes / cluster.tasks_per_node to match the allocation)."
            )


def _gpu_count(value: Optional[str]) -> Optional[int]:
    """A Slurm GPU count: "4", or "[type:]count" as --gpus-per-task gives it ("a100:2"); None if unset or not a
    count."""
    count = (value or "").rsplit(":", 1)[-1]
    return int(count) if count.isdigit() else None


def _int(environ: Mapping[str, str], key: str, default: int) -> int:
    value = environ.get(key)
    return int(value) if value not in (None, "") else default
