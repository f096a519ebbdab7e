"""The fabric probe: before training, every multi-rank job measures its own allocation's all-reduce, on its own
backend, over message sizes from a few bytes up to at least the model's gradient, with nccl-tests' definitions:

    algbw = bytes / time                      (time: the slowest rank's median over the timed iterations)
    busbw = algbw x 2(n-1)/n                  (n ranks: what each link carries in a ring all-reduce)

and fits the ring all-reduce model the collector predicts with (pipeline.allreduce), to these independent
measurements:

    time(bytes) = 2(n-1) x latency + 2(n-1)/n x bytes / bandwidth

(latency per ring step, bandwidth the bus bandwidth). A sharded job (parallel=fsdp|hsdp) also measures the
collectives FSDP issues, on the groups it issues them on (`probe_sharded`): all-gather and reduce-scatter over the
shard group, and HSDP's all-reduce over a replicate group, with nccl-tests' sizes (an all-gather's output, a
reduce-scatter's input) and busbw = algbw x (n-1)/n for both. On NCCL it also reads, from NCCL's own INFO log, which
transport NCCL chose between ranks (NVLink, PCIe P2P, shared memory, InfiniBand, or TCP sockets).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import allreduce
from pipeline.result import CollectiveProbe, Fabric, ProbePoint

log = logging.getLogger(__name__)
SMALLEST = 8  # bytes
STEP = 8  # each size is 8 times the one before
ITERATIONS = 5  # timed, after 2 untimed
BUDGET_S = 3.0  # the probe stops growing messages once it has spent this long


def probe_sizes(gradient_bytes: int) -> list[int]:
    """8 B, 64 B, ... by factors of 8, up to the first size at least the gradient (and at least 1 MiB)."""
    sizes, size = [], SMALLEST
    while True:
        sizes.append(size)
        if size >= max(gradient_bytes, 1 << 20):
            return sizes
        size *= STEP


def _buffers(op: str, nbytes: int, ranks: int, device: torch.device):
    """The call that runs one `op` of nccl-tests' size `nbytes` (float32) over `ranks` ranks of a group."""
    if op == "all_reduce":
        buffer = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
        return lambda group: dist.all_reduce(buffer, group=group)
    n = max(ranks, (nbytes // 4) // ranks * ranks)  # whole float32 elements, a multiple of the ranks
    whole, shard = torch.ones(n, device=device), torch.ones(n // ranks, device=device)
    if op == "all_gather":
        return lambda group: dist.all_gather_single(whole, shard, group=group)
    return lambda group: dist.reduce_scatter_single(shard, whole, group=group)


def time_collective(op: str, nbytes: int, device: torch.device, ranks: int, group=None) -> float:
    """The slowest rank's median seconds for one `op` of `nbytes` (nccl-tests' size) over `group` (every rank of
    the job takes part in the barriers; each group runs its own collective)."""
    run = _buffers(op, nbytes, ranks, device)
    times = []
    for i in range(2 + ITERATIONS):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run(group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.item())


def fit_ring(points: list[ProbePoint], world: int, op: str = "all_reduce") -> tuple[float | None, float | None]:
    """(latency per ring step in s, bus bandwidth in bytes/s) of the ring model (pipeline.allreduce) fitted to the
    probe's sizes; the bandwidth is None when no bandwidth term could be fitted."""
    latency, seconds_per_byte = allreduce.fit(world, [p.bytes for p in points], [p.time_s for p in points], op)
    return latency, (1 / seconds_per_byte if seconds_per_byte > 0 else None)


def curve(op: str, gradient_bytes: int, device: torch.device, ranks: int, group=None) -> list[ProbePoint]:
    """`op` timed over the probe's sizes, within BUDGET_S."""
    points, spent = [], time.perf_counter()
    for size in probe_sizes(gradient_bytes):
        seconds = time_collective(op, size, device, ranks, group)
        algbw = size / seconds
        points.append(ProbePoint(bytes=size, time_s=seconds, algbw_gb_s=algbw / 1e9,
                                 busbw_gb_s=algbw * allreduce.bus_factor(op, ranks) / 1e9))
        if time.perf_counter() - spent > BUDGET_S:
            break
    return points


def run_probe(gradient_bytes: int, device: torch.device, backend: str, world: int, nccl_logs: list[Path]) -> Fabric:
    """Time the all-reduce over the sizes, within BUDGET_S, and fit the ring model."""
    spent = time.perf_counter()
    points = curve("all_reduce", gradient_bytes, device, world)
    latency, bandwidth = fit_ring(points, world)
    return Fabric(backend=backend, world_size=world, points=points, seconds=time.perf_counter() - spent,
                  latency_us=latency * 1e6 if latency is not None else None,
                  bandwidth_gb_s=bandwidth / 1e9 if bandwidth is not None else None,
                  transport=nccl_transport(nccl_logs) if backend == "nccl" else "tcp")


def probe_sharded(gradient_bytes: int, device: torch.device, groups: list[tuple[str, str, int, object]]
                  ) -> list[CollectiveProbe]:
    """FSDP's collectives, each (op, group name, its ranks, this rank's process group of it) timed and fitted as
    the all-reduce is; a group of one rank communicates with nobody and is not probed."""
    found = []
    for op, name, ranks, group in groups:
        if ranks < 2:
            continue
        points = curve(op, gradient_bytes, device, ranks, group)
        latency, bandwidth = fit_ring(points, ranks, op)
        found.append(CollectiveProbe(op=op, group=name, ranks=ranks, points=points,
                                     latency_us=latency * 1e6 if latency is not None else None,
                                     bandwidth_gb_s=bandwidth / 1e9 if bandwidth is not None else None))
    return found


# The transport comes from the INFO lines NCCL writes while it connects a communicator (formats of NCCL 2.19 to
# 2.28; the file of NCCL's src/ that writes each). One line per channel and peer names a connection's transport
# (subsystem INIT, which the job logs, with NET):
#   transport/net.cc       Channel 00/0 : 0[0] -> 8[0] [send] via NET/IB/0/GDRDMA; NET/Socket/0; a plugin's name:
#                          NET/IBext_v8/1, NET/AWS Libfabric/0/GDRDMA; NET/IB/0(1)/GDRDMA through a PXN proxy
#   transport/p2p.cc       Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read; P2P/IPC; P2P/direct pointer;
#                          P2P/MNNVL (multi-node NVLink); P2P/indirect/2[2]; /CE when copy engines move the data
#   transport/shm.cc       Channel 00 : 0[0] -> 1[1] via SHM/direct/direct
#   transport/coll_net.cc  CollNet 00/0 : 0 [send] via COLLNET/IBext_v8/0/GDRDMA (in-network reduction: SHARP)
# P2P moves data between GPUs directly, over NVLink or PCIe alike, and its lines do not say which (there is no
# "P2P/NVL"). Two of them do name NVLink: /read (graph/paths.cc turns P2P read on only between Ampere GPUs joined
# by NVLink) and P2P/MNNVL. For the others, the link between a node's GPUs is read from, in this order:
#   graph/search.cc        Pattern 4, crossNic 0, nChannels 16, bw 40.000000/40.000000, type NVL/PIX, sameChannels 1
#                          (subsystem GRAPH, when it is logged): per graph NCCL built (rings, trees, NVLS, CollNet)
#                          the worst path its channels take within a node, then between nodes. NVL (NVLink, through
#                          an NVSwitch too) and NVB (NVLink through another GPU) are NVLink; PIX, PXB, P2C, PXN,
#                          PHB and SYS are PCIe and the CPUs' links; C2C a Grace CPU's; LOC one GPU per node.
#   transport/nvls.cc      NVLS multicast support is available on dev 0 (INIT): NVLink SHARP, which needs an
#                          NVSwitch joining the node's GPUs by NVLink.
_NET = re.compile(r"\bvia NET/([^/\n]+)/\d")
_P2P = re.compile(r"\bvia P2P/([^\n]*)")
_SHM = re.compile(r"\bvia SHM/")
_COLLNET = re.compile(r"\bvia COLLNET/")
_GRAPH = re.compile(r"\bPattern \d+, crossNic \d+, nChannels (\d+), bw [\d.]+/[\d.]+, type ([A-Z0-9]+)/[A-Z0-9]+")
_NVLS = re.compile(r"\bNVLS multicast support is available\b")
NVLINK_PATHS = {"NVL", "NVB"}


def nccl_transport(logs: list[Path]) -> str | None:
    """The transports NCCL chose, from its INFO logs (every rank's): between nodes the network (infiniband,
    sockets, another NET plugin's name; collnet), within a node nvlink, p2p (over PCIe) or shm; joined with '+'
    when several."""
    found, paths, nvls, p2p = set(), set(), False, []
    for path in logs:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found.update(_network(name) for name in _NET.findall(text))
        if _SHM.search(text):
            found.add("shm")
        if _COLLNET.search(text):
            found.add("collnet")
        paths.update(kind for channels, kind in _GRAPH.findall(text) if int(channels) > 0 and kind != "LOC")
        nvls = nvls or bool(_NVLS.search(text))
        p2p += _P2P.findall(text)
    on_nvlink = paths <= NVLINK_PATHS if paths else nvls
    found.update("nvlink" if on_nvlink or way.startswith("MNNVL") or "/read" in way else "p2p" for way in p2p)
    return "+".join(sorted(found)) or None


def _network(plugin: str) -> str:
    """NCCL's network names, as the record spells them: IB (and the IB plugins, IBext...) infiniband, Socket
    sockets, any other plugin by its own name ("AWS Libfabric": aws-libfabric)."""
    if plugin.startswith("IB"):
        return "infiniband"
    return "sockets" if plugin == "Socket" else plugin.strip().lower().replace(" ", "-")


# NCCL's INFO line for the network it uses between nodes, and its interfaces (net_ib.cc, net_socket.cc):
#   NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/RoCE [RO]; OOB ib0:10.0.0.1<0>
#   NET/Socket : Using [0]eth0:10.1.2.3<0> [1]eth1:10.2.2.3<0>
_NET_USING = re.compile(r"\bNET/(?:IB|Socket) : Using (.*)")
_DEVICE = re.compile(r"\[\d+\]([^\s:<]+(?::\d+)?)")


def nccl_interface(logs: list[Path]) -> str | None:
    """The interfaces NCCL chose between nodes (HCA ports for InfiniBand, e.g. mlx5_0:1; network devices for
    sockets, e.g. eth0), from its INFO logs; None where it did not say."""
    found = set()
    for path in logs:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in _NET_USING.findall(text):
            names = _DEVICE.findall(line.split(";")[0])
            found.update(n if "/IB" in line or "/RoCE" in line else n.split(":")[0] for n in names)
    return "+".join(sorted(found)) or None


def route_interface(address: str) -> str | None:
    """The network interface this host reaches `address` through (gloo's, unless GLOO_SOCKET_IFNAME says): the
    local address a socket towards it binds to, matched to an interface by name. None where it cannot be told."""
    import fcntl
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((address, 9))  # UDP: no packet is sent, only the route chosen
            local = s.getsockname()[0]
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:  # no IPv4 address on it
                    continue
                if socket.inet_ntoa(packed[20:24]) == local:
                    return name
    except OSError:
        return None
    return None


def fell_back_to_sockets(fabric: Fabric, nodes: int) -> bool:
    """A multi-node NCCL job whose inter-node traffic goes over TCP sockets: the usual cause of "N nodes are no
    faster than one" (no InfiniBand seen, or NCCL_IB_DISABLE)."""
    return nodes > 1 and fabric.backend == "nccl" and fabric.transport is not None and "sockets" in fabric.transport


def describe(fabric: Fabric) -> list[str]:
    """The probe's log lines: the all-reduce over every rank, then each of a sharded job's collectives."""
    lines = []
    for op, group, ranks, points, latency, bandwidth in (
            ("all-reduce", "", fabric.world_size, fabric.points, fabric.latency_us, fabric.bandwidth_gb_s),
            *((c.op.replace("_", "-"), f" ({c.group} group)", c.ranks, c.points, c.latency_us, c.bandwidth_gb_s)
              for c in fabric.collectives)):
        size = points[-1]
        lines.append(f"fabric probe: {fabric.backend}/{fabric.transport or '?'}, {ranks} ranks{group}: "
                     f"{size.bytes / 2**20:.1f} MiB {op} {size.time_s * 1e3:.2f} ms, busbw {size.busbw_gb_s:.2f} "
                     f"GB/s; fit: latency {latency or 0:.1f} us per ring step, bandwidth "
                     f"{bandwidth if bandwidth is not None else math.inf:.2f} GB/s")
    lines[-1] += f" ({fabric.seconds:.2f} s in all)"
    return lines
