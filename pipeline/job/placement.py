"""Where a rank computes: its device (a GPU of its own, or the CPU) and its share of the host's CPU cores."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.job.env import DistEnv
from pipeline.job.health import RankFacts
from pipeline.result import TF32, DeviceInfo, HostShare

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


def place_threads(env: DistEnv, device: torch.device, ready_s: float) -> tuple[HostShare, list[RankFacts]]:
    """Give each process its share of its machine's cores, so N x M local processes do not oversubscribe it; and
    every rank's facts (the health check's roll call).

    Ranks that share a machine are counted by the kernel's boot id, which every process on one kernel reads alike:
    simulated nodes, several Slurm nodes on one machine, and network namespaces with hostnames of their own (the
    hostname would count one rank per namespace). OMP_NUM_THREADS, when set, is the user's choice (torchrun sets it
    to 1 unless it is set already); else Slurm's --cpus-per-task, when set, is the share the allocation grants.
    `ready_s`: this rank's seconds from its process's start to being ready (a slow node imports slowly).
    """
    machine = boot_id()
    mine = (socket.gethostname(), machine, env.node_name, env.local_rank, ready_s)
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    on_host = sum(1 for other in everyone if other[1] == machine)
    cores = os.cpu_count() or 1
    granted = os.environ.get("OMP_NUM_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK")
    threads = int(granted) if granted else max(1, cores // on_host)
    torch.set_num_threads(threads)
    roster = [RankFacts(rank=r, local_rank=local, node=node, hostname=host, machine=boot, ready_s=ready)
              for r, (host, boot, node, local, ready) in enumerate(everyone)]
    binding = numa_binding(device)
    if binding.binding:
        log.warning("rank %d: %s", env.rank, binding.binding)
    return HostShare(hostname=socket.gethostname(), processes_on_host=on_host, host_cores=cores, threads=threads,
                     oversubscribed=on_host > cores, machine=machine, cpus=binding.cpus,
                     cpu_numa_nodes=binding.cpu_numa_nodes, gpu_numa_node=binding.gpu_numa_node,
                     binding=binding.binding), roster


def boot_id() -> str:
    """The running kernel's boot id, shortened (every process on one machine reads the same), or the hostname
    where it cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:8]
    except OSError:
        return socket.gethostname()


@dataclass(frozen=True)
class Binding:
    cpus: str | None
    cpu_numa_nodes: list[int] | None
    gpu_numa_node: int | None
    binding: str | None  # what is wrong, if anything


def numa_binding(device: torch.device) -> Binding:
    """Where this rank may run (its CPU affinity), the NUMA nodes of those CPUs, and on a GPU the GPU's NUMA node
    (from its PCI device in sysfs). A rank whose CPUs are not all on its GPU's NUMA node reaches the GPU across the
    sockets' link: PyTorch puts the cost of that at 1-10% (torchrun --numa-binding)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return Binding(None, None, None, None)
    node_of = cpu_numa_nodes()
    numa = sorted({node_of[c] for c in allowed if c in node_of}) or None
    gpu = gpu_numa_node(device)
    return Binding(cpu_list(allowed), numa, gpu, binding_problem(allowed, numa, gpu))


def binding_problem(cpus: list[int], numa: list[int] | None, gpu: int | None) -> str | None:
    """What is wrong with a rank's CPUs for its GPU: any of them on another NUMA node than the GPU's."""
    if gpu is None or numa is None or numa == [gpu]:
        return None
    return (f"bound to CPUs {cpu_list(cpus)} on NUMA node(s) {','.join(map(str, numa))}, but its GPU is on NUMA "
            f"node {gpu}: bind each rank to its GPU's NUMA node (srun --cpu-bind, torchrun --numa-binding); "
            "PyTorch puts the cost of not doing so at 1-10%")


def cpu_numa_nodes() -> dict[int, int]:
    """{cpu: its NUMA node} from /sys/devices/system/node (empty where there is none to read)."""
    found = {}
    for node in Path("/sys/devices/system/node").glob("node[0-9]*"):
        try:
            cpus = (node / "cpulist").read_text().strip()
        except OSError:
            continue
        for cpu in parse_cpu_list(cpus):
            found[cpu] = int(node.name[4:])
    return found


def gpu_numa_node(device: torch.device) -> int | None:
    """The NUMA node of a CUDA device's PCI slot (sysfs says -1 where the machine has one node, or does not know)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return None
    domain, device_id = getattr(props, "pci_domain_id", 0), getattr(props, "pci_device_id", 0)
    try:
        node = int(Path(f"/sys/bus/pci/devices/{domain:04x}:{bus:02x}:{device_id:02x}.0/numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def parse_cpu_list(text: str) -> list[int]:
    """Linux's CPU list format: 0-3,8-11 -> 0, 1, 2, 3, 8, 9, 10, 11."""
    cpus = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def cpu_list(cpus: list[int]) -> str:
    """The reverse: [0, 1, 2, 3, 8] -> 0-3,8."""
    runs, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            runs.append(f"{start}-{cpu}" if cpu != start else str(start))
            start = None
    return ",".join(runs)
