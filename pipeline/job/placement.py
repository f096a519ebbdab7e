"""Where a rank computes: its device (a GPU of its own, or the CPU) and its share of the host's CPU cores."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.job.env import DistEnv
from pipeline.rundir import TF32, DeviceInfo

log = logging.getLogger(__name__)


def gpu_index(choice: str, slot: int, sharing: int, gpus: int, same_gpus_for_all: bool) -> int | None:
    """The CUDA device this rank trains on, or None for the CPU.

    `slot` is the rank's place among the `sharing` ranks on its machine, `gpus` how many devices it sees. NCCL
    needs a GPU per rank. In local debug mode every rank sees the same devices (`same_gpus_for_all`), so more
    ranks than GPUs means sharing; trainer.device=auto then trains on the CPU. On a cluster a rank that sees a
    single GPU may have been bound to its own (srun --gpus-per-task, --gpu-bind), so that one is taken.
    """
    if choice == "cpu" or (choice == "auto" and gpus == 0):
        return None
    if gpus == 0:
        raise RuntimeError("trainer.device=cuda but this node has no CUDA device; use trainer.device=cpu or auto")
    if sharing <= gpus or (gpus == 1 and not same_gpus_for_all):
        return slot % gpus
    where = (f"local debug mode runs all {sharing} ranks (nodes x cluster.tasks_per_node) on this machine"
             if same_gpus_for_all else f"{sharing} ranks (cluster.tasks_per_node) run on this node")
    if choice == "auto" and same_gpus_for_all:
        log.warning("%s, which has %d GPU(s): NCCL needs one per rank, so this point trains on the CPU with gloo "
                    "(trainer.device=auto)", where, gpus)
        return None
    raise RuntimeError(f"{where}, which has {gpus} GPU(s), and NCCL needs one GPU per rank. Use at most {gpus} "
                       f"ranks per machine, or trainer.device=cpu.")


def pick_device(choice: str, env: DistEnv, local_mode: bool) -> torch.device:
    slot, sharing = (env.rank, env.world_size) if local_mode else (env.local_rank, env.local_world_size)
    index = gpu_index(choice, slot, sharing, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                      same_gpus_for_all=local_mode)
    if index is None:
        return torch.device("cpu")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def device_info(device: torch.device) -> DeviceInfo:
    if device.type != "cuda":
        return DeviceInfo(type=device.type, name=os.uname().machine + " CPU")
    return DeviceInfo(type="cuda", name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                      nccl=".".join(map(str, torch.cuda.nccl.version())),
                      # torch's defaults let cuDNN convolutions, not matmuls, run fp32 math as TF32
                      tf32=TF32(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32))


@dataclass(frozen=True)
class HostShare:
    hostname: str
    processes_on_host: int
    host_cores: int
    threads: int
    oversubscribed: bool


def place_threads(env: DistEnv) -> HostShare:
    """Give each process its share of the host's cores, so N x M local processes do not oversubscribe it.

    Ranks sharing a host are counted from every rank's hostname, which also covers simulated nodes and several
    Slurm nodes on one machine. OMP_NUM_THREADS, when set, is the user's choice (torchrun sets it to 1 unless it
    is set already); else Slurm's --cpus-per-task, when set, is the share the allocation grants.
    """
    hostnames = [None] * env.world_size
    dist.all_gather_object(hostnames, socket.gethostname())
    on_host = hostnames.count(socket.gethostname())
    cores = os.cpu_count() or 1
    granted = os.environ.get("OMP_NUM_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK")
    threads = int(granted) if granted else max(1, cores // on_host)
    torch.set_num_threads(threads)
    return HostShare(hostname=socket.gethostname(), processes_on_host=on_host, host_cores=cores, threads=threads,
                     oversubscribed=on_host > cores)
