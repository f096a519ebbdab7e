"""Where a rank computes: its device (a GPU of its own, or the CPU) and its share of the host's CPU cores."""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

from pipeline.job.env import DistEnv
from pipeline.rundir import TF32, DeviceInfo, HostShare

log = logging.getLogger(__name__)


def gpu_index(choice: str, env: DistEnv, gpus: int, local_mode: bool) -> int | None:
    """The CUDA device this rank trains on (an index among the `gpus` it sees), or None for the CPU.

    NCCL needs a GPU per rank. Two layouts:
    - Slurm bound each task to GPUs of its own (srun --gpus-per-task, --gpu-bind, --ntasks-per-gpu): the task sees
      fewer GPUs than the step has on its node (DistEnv.step_gpus_on_node), and takes the first it sees. With more
      tasks on the node than the step's GPUs some would share one, which is refused.
    - Every rank on the machine sees the same GPUs (Slurm without binding, torchrun, local debug mode): rank k of
      the machine takes GPU k; LOCAL_RANK orders a node's ranks, the global rank all of local debug mode's ranks
      (its simulated nodes share this machine). With more ranks than GPUs, local debug mode trains on the CPU
      under trainer.device=auto; elsewhere that is refused.
    torchrun's ranks share their agent's GPUs even when Slurm bound that one task, so only a Slurm task (one rank)
    is ever taken to own what it sees.
    """
    if choice == "cpu" or (choice == "auto" and gpus == 0):
        return None
    if gpus == 0:
        raise RuntimeError("trainer.device=cuda but this node has no CUDA device; use trainer.device=cpu or auto")
    seen = f"{gpus} GPU(s) (CUDA_VISIBLE_DEVICES={env.visible_gpus or 'unset'})"
    node_gpus = env.step_gpus_on_node
    if not local_mode and env.source == "slurm" and node_gpus and gpus < node_gpus:
        if env.local_world_size > node_gpus:
            raise RuntimeError(
                f"{env.local_world_size} ranks (cluster.tasks_per_node) run on this node and Slurm gave the step "
                f"{node_gpus} GPU(s) there, so srun's binding makes some share a GPU, and NCCL needs one GPU per "
                f"rank. Use at most {node_gpus} tasks per node, or trainer.device=cpu.")
        if gpus > 1:
            log.warning("rank %d sees %s of its own and trains on the first (DDP uses one GPU per rank; the others "
                        "stay idle)", env.rank, seen)
        return 0
    slot, sharing = (env.rank, env.world_size) if local_mode else (env.local_rank, env.local_world_size)
    if sharing <= gpus:
        return slot
    where = (f"local debug mode runs all {sharing} ranks (nodes x cluster.tasks_per_node) on this machine"
             if local_mode else f"{sharing} ranks (cluster.tasks_per_node) run on this node")
    if choice == "auto" and local_mode:
        log.warning("%s, which has %s: NCCL needs one per rank, so this point trains on the CPU with gloo "
                    "(trainer.device=auto)", where, seen)
        return None
    raise RuntimeError(f"{where}, and each sees the same {seen}; NCCL needs one GPU per rank. Use at most {gpus} "
                       f"ranks per machine, or trainer.device=cpu.")


def pick_device(choice: str, env: DistEnv, local_mode: bool) -> torch.device:
    index = gpu_index(choice, env, torch.cuda.device_count() if torch.cuda.is_available() else 0, local_mode)
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
