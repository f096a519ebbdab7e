"""The fabric probe: nccl-tests' definitions on known timings (all-reduce, and a sharded job's all-gather and
reduce-scatter), the ring model recovered from a synthetic fabric, NCCL's transport read from its own log lines, and
a real probe in a 2-rank gloo job's record."""

import json

import pytest

import pipeline.job.probe as probe
from pipeline.job.probe import (fell_back_to_sockets, fit_ring, nccl_interface, nccl_transport, probe_sharded,
                                probe_sizes, route_interface, run_probe)
from tests.conftest import launch

LATENCY, BANDWIDTH = 20e-6, 5e9  # s per ring step, bytes/s


def ring_time(nbytes: int, world: int, steps: int = 2) -> float:
    """nccl-tests' ring: an all-reduce takes 2(n-1) steps, an all-gather or a reduce-scatter (n-1)."""
    return steps * (world - 1) * LATENCY + steps * (world - 1) / world * nbytes / BANDWIDTH


@pytest.mark.parametrize("world", [2, 4, 8])
def test_busbw_and_the_fitted_ring_on_a_synthetic_fabric(monkeypatch, world):
    monkeypatch.setattr(probe, "time_collective", lambda op, nbytes, *_: ring_time(nbytes, world))
    fabric = run_probe(gradient_bytes=10_000_000, device=None, backend="gloo", world=world, nccl_logs=[])
    sizes = [p.bytes for p in fabric.points]
    assert sizes[0] == 8 and sizes[-1] >= 10_000_000 and sizes == probe_sizes(10_000_000)
    for p in fabric.points:
        assert p.algbw_gb_s == pytest.approx(p.bytes / ring_time(p.bytes, world) / 1e9)
        assert p.busbw_gb_s == pytest.approx(p.algbw_gb_s * 2 * (world - 1) / world)
    # at large messages the bus bandwidth approaches the link's
    assert fabric.points[-1].busbw_gb_s == pytest.approx(BANDWIDTH / 1e9, rel=0.05)
    assert fabric.latency_us == pytest.approx(LATENCY * 1e6, rel=1e-6)
    assert fabric.bandwidth_gb_s == pytest.approx(BANDWIDTH / 1e9, rel=1e-6)
    assert fabric.transport == "tcp"


@pytest.mark.parametrize("ranks", [2, 4])
def test_all_gather_and_reduce_scatter_busbw_follow_nccl_tests(monkeypatch, ranks):
    """nccl-tests' definitions (doc/PERFORMANCE.md): the size is an all-gather's output and a reduce-scatter's input,
    algbw = size / time, busbw = algbw x (n-1)/n for both. Known timings: an all-gather of 16 MiB over 4 ranks in
    10 ms is algbw 1.678 GB/s, busbw 1.258 GB/s."""
    def timed(op, nbytes, device, n, group=None):  # a reduce-scatter 1.5 times slower (gloo's is an all-reduce)
        return ring_time(nbytes, n, steps=1) * (1.5 if op == "reduce_scatter" else 1.0)

    monkeypatch.setattr(probe, "time_collective", timed)
    found = probe_sharded(16 << 20, None, [("all_gather", "shard", ranks, None),
                                           ("reduce_scatter", "shard", ranks, None),
                                           ("all_reduce", "replicate", 1, None)])  # one replica: nothing to probe
    assert [(c.op, c.ranks) for c in found] == [("all_gather", ranks), ("reduce_scatter", ranks)]
    for c in found:
        slower = 1.5 if c.op == "reduce_scatter" else 1.0
        for p in c.points:
            t = ring_time(p.bytes, ranks, 1) * slower
            assert p.time_s == pytest.approx(t)
            assert p.algbw_gb_s == pytest.approx(p.bytes / t / 1e9)
            assert p.busbw_gb_s == pytest.approx(p.algbw_gb_s * (ranks - 1) / ranks)
        # the (n-1)-step ring recovered: latency per step, and the bus bandwidth
        assert c.latency_us == pytest.approx(LATENCY * 1e6 * slower, rel=1e-6)
        assert c.bandwidth_gb_s == pytest.approx(BANDWIDTH / 1e9 / slower, rel=1e-6)
    monkeypatch.setattr(probe, "time_collective", lambda *a, **k: 0.010)
    (gather,) = probe_sharded(16 << 20, None, [("all_gather", "shard", 4, None)])
    assert (gather.points[-1].bytes, gather.points[-1].busbw_gb_s) == (16 << 20, pytest.approx(1.2583, rel=1e-4))


def test_a_fit_that_would_give_a_negative_latency_clamps_it_to_zero():
    # time falls short of proportional at small sizes: the unconstrained fit's latency would be negative
    points = [probe.ProbePoint(bytes=s, time_s=t, algbw_gb_s=1.0, busbw_gb_s=1.0)
              for s, t in ((8, 0.0), (1 << 20, 0.9e-3), (1 << 22, 4.1e-3))]
    latency, bandwidth = fit_ring(points, world=2)
    # with the latency at 0: 1/bw = sum(x t) / sum(x x), x = 2(1)/2 bytes = bytes
    x = [8, 1 << 20, 1 << 22]
    t = [0.0, 0.9e-3, 4.1e-3]
    assert latency == 0.0 and bandwidth == pytest.approx(sum(a * a for a in x) / sum(a * b for a, b in zip(x, t)))


# NCCL 2.2x INFO logs, one rank's each, as NCCL writes them (the job logs subsystems INIT and NET; GRAPH where said)
H100_SXM_NODE = """\
gpu1:2301:2301 [0] NCCL INFO Bootstrap : Using ib0:10.1.0.11<0>
gpu1:2301:2301 [0] NCCL INFO NCCL version 2.21.5+cuda12.4
gpu1:2301:2412 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB ; OOB ib0:10.1.0.11<0>
gpu1:2301:2412 [0] NCCL INFO Using network IB
gpu1:2301:2412 [0] NCCL INFO ncclCommInitRank comm 0x55d0c8a3e2b0 rank 0 nranks 8 cudaDev 0 nvmlDev 0 busId 18000 \
commId 0x8e1c3b5a2f7d4e61 - Init START
gpu1:2301:2412 [0] NCCL INFO NVLS multicast support is available on dev 0
gpu1:2301:2412 [0] NCCL INFO comm 0x55d0c8a3e2b0 rank 0 nRanks 8 nNodes 1 localRanks 8 localRank 0 MNNVL 0
gpu1:2301:2412 [0] NCCL INFO Channel 00/24 :    0   1   2   3   4   5   6   7
gpu1:2301:2412 [0] NCCL INFO Trees [0] 1/-1/-1->0->-1 [1] 1/-1/-1->0->-1
gpu1:2301:2412 [0] NCCL INFO P2P Chunksize set to 524288
gpu1:2301:2412 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM
gpu1:2301:2412 [0] NCCL INFO Channel 01/0 : 0[0] -> 1[1] via P2P/CUMEM
gpu1:2301:2412 [0] NCCL INFO Connected all rings
gpu1:2301:2412 [0] NCCL INFO NVLS comm 0x55d0c8a3e2b0 headRank 0 nHeads 8 buffSize 1048576 memSize 2097152 \
nvlsPerRankSize 201326592 nvlsTotalSize 1610612736
gpu1:2301:2412 [0] NCCL INFO 24 coll channels, 24 collnet channels, 16 nvls channels, 32 p2p channels, 32 p2p \
channels per peer
"""
# two H100 NVL joined by an NVLink bridge, no NVSwitch: only the graph lines (GRAPH) say NVLink
H100_NVL_PAIR_GRAPH = """\
pcie3:811:902 [1] NCCL INFO NVLS multicast support is not available on dev 1
pcie3:811:902 [1] NCCL INFO Pattern 4, crossNic 0, nChannels 4, bw 80.000000/80.000000, type NVL/PIX, sameChannels 1
pcie3:811:902 [1] NCCL INFO  0 : GPU/0-1000 GPU/0-2000
pcie3:811:902 [1] NCCL INFO Pattern 1, crossNic 0, nChannels 4, bw 80.000000/80.000000, type NVL/PIX, sameChannels 1
pcie3:811:902 [1] NCCL INFO Channel 00/0 : 1[1] -> 0[0] via P2P/CUMEM/CE
"""
# four L40S on PCIe under one host bridge, with the graph lines: P2P over PCIe
L40S_PCIE_GRAPH = """\
l40s1:77:90 [2] NCCL INFO NVLS multicast support is not available on dev 2
l40s1:77:90 [2] NCCL INFO Pattern 4, crossNic 0, nChannels 2, bw 24.000000/24.000000, type PHB/PIX, sameChannels 1
l40s1:77:90 [2] NCCL INFO Pattern 3, crossNic 0, nChannels 2, bw 24.000000/24.000000, type PHB/PIX, sameChannels 1
l40s1:77:90 [2] NCCL INFO Channel 00/0 : 2[2] -> 3[3] via P2P/CUMEM
l40s1:77:90 [2] NCCL INFO Channel 01/0 : 2[2] -> 3[3] via P2P/IPC
"""
# the same node with P2P disabled between its GPUs (NCCL_P2P_DISABLE, or a container): shared memory
L40S_SHM = """\
l40s1:77:90 [2] NCCL INFO Channel 00 : 2[2] -> 3[3] via SHM/direct/direct
l40s1:77:90 [2] NCCL INFO Channel 01 : 2[2] -> 3[3] via SHM/direct/direct
"""
# two A100 SXM nodes: P2P read within a node (NVLink between Ampere GPUs), InfiniBand with GPUDirect between
A100_TWO_NODES = """\
a100-07:4410:4521 [3] NCCL INFO NVLS multicast support is not available on dev 3
a100-07:4410:4521 [3] NCCL INFO Channel 00/0 : 3[3] -> 4[4] via P2P/CUMEM/read
a100-07:4410:4521 [3] NCCL INFO Channel 00/0 : 7[7] -> 8[0] [send] via NET/IB/3/GDRDMA
a100-07:4410:4521 [3] NCCL INFO Channel 00/0 : 15[7] -> 0[0] [receive] via NET/IB/0/GDRDMA
a100-07:4410:4521 [3] NCCL INFO Channel 01/0 : 3[3] -> 11[3] [send] via NET/IB/1(2)/GDRDMA
"""
# one GPU per node, no InfiniBand: TCP sockets (the graph's intra path is LOC: no hop within a node)
SOCKETS = """\
node1:1:2 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.1<0>
node1:1:2 [0] NCCL INFO Using network Socket
node1:1:2 [0] NCCL INFO Pattern 4, crossNic 0, nChannels 2, bw 12.000000/1.200000, type LOC/NET, sameChannels 1
node1:1:2 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/Socket/0
node1:1:2 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] via NET/Socket/0
"""
# AWS EFA through its plugin; SHARP through the IB plugin with CollNet; a GB200 NVL72 rack (multi-node NVLink)
EFA = "ip-10-0-1-5:9:9 [0] NCCL INFO Channel 00/0 : 0[0] -> 8[0] [send] via NET/AWS Libfabric/0/GDRDMA/Shared\n"
SHARP = """\
ib4:31:40 [0] NCCL INFO Channel 00/0 : 0[0] -> 8[0] [send] via NET/IBext_v8/0/GDRDMA
ib4:31:40 [0] NCCL INFO CollNet 00/0 : 0 [send] via COLLNET/IBext_v8/0/GDRDMA
ib4:31:40 [0] NCCL INFO CollNet 00/0 : 0 [receive] via COLLNET/IBext_v8/0/GDRDMA
"""
MNNVL = """\
nvl72-1:5:6 [0] NCCL INFO comm 0x7f00 rank 0 nRanks 8 nNodes 2 localRanks 4 localRank 0 MNNVL 1
nvl72-1:5:6 [0] NCCL INFO Channel 00/0 : 3[3] -> 4[0] via P2P/MNNVL
"""


@pytest.mark.parametrize("logs, transport", [
    ([H100_SXM_NODE], "nvlink"),          # NVSwitch (NVLS available): its P2P is NVLink
    ([H100_NVL_PAIR_GRAPH], "nvlink"),
    ([L40S_PCIE_GRAPH], "p2p"),
    ([L40S_SHM], "shm"),
    ([A100_TWO_NODES], "infiniband+nvlink"),
    ([SOCKETS], "sockets"),
    ([EFA], "aws-libfabric"),
    ([SHARP], "collnet+infiniband"),
    ([MNNVL], "nvlink"),
    ([SOCKETS, L40S_PCIE_GRAPH], "p2p+sockets"),  # every rank's log counts
    (["gpu1:1:1 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM\n"], "p2p"),  # no word on the link
    (["NCCL INFO Init COMPLETE\n"], None),
])
def test_the_transport_is_read_from_ncclS_own_log(tmp_path, logs, transport):
    paths = [tmp_path / f"nccl-{i}.log" for i in range(len(logs))]
    for path, text in zip(paths, logs):
        path.write_text(text)
    assert nccl_transport(paths) == transport
    assert nccl_transport([*paths, tmp_path / "missing.log"]) == transport


def test_the_interfaces_nccl_chose_are_read_from_its_log(tmp_path):
    log = tmp_path / "nccl-h-1.log"
    log.write_text("h:1:1 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/RoCE [RO]; OOB ib0:10.0.0.1<0>\n"
                   "h:1:1 [0] NCCL INFO Bootstrap : Using eth0:10.0.0.7<0>\n")
    other = tmp_path / "nccl-h-2.log"
    other.write_text("h:2:2 [0] NCCL INFO NET/Socket : Using [0]eth0:10.1.2.3<0> [1]eth1:10.2.2.3<0>\n")
    assert nccl_interface([log]) == "mlx5_0:1+mlx5_1:1" and nccl_interface([other]) == "eth0+eth1"
    assert nccl_interface([tmp_path / "absent.log"]) is None
    assert route_interface("127.0.0.1") == "lo"


def test_a_multi_node_job_on_sockets_is_flagged():
    fabric = probe.Fabric(backend="nccl", world_size=8, points=[], seconds=1.0, latency_us=None, bandwidth_gb_s=None,
                          transport="sockets")
    assert fell_back_to_sockets(fabric, nodes=2) and not fell_back_to_sockets(fabric, nodes=1)


@pytest.mark.e2e
def test_a_two_rank_job_records_its_probe(tmp_path, profiled_run):
    fabric = json.loads((profiled_run / "result.json").read_text())["fabric"]
    assert (fabric["backend"], fabric["world_size"], fabric["transport"]) == ("gloo", 2, "tcp")
    assert fabric["points"][-1]["bytes"] >= 407_080 and 0 < fabric["seconds"] < 10
    assert fabric["bandwidth_gb_s"] is None or fabric["bandwidth_gb_s"] > 0
    assert fabric["interface"] == "lo"  # gloo's, towards the local rendezvous address
    # what explains a slow rank: its machine (boot id), the CPUs it may run on and their NUMA nodes
    ranks = json.loads((profiled_run / "result.json").read_text())["ranks"]
    assert len({r["machine"] for r in ranks}) == 1 and all(r["cpus"] and r["cpu_numa_nodes"] for r in ranks)
    assert all(r["gpu_numa_node"] is None and r["binding"] is None for r in ranks)  # no GPU: nothing to bind to
    one = launch("trainer.max_steps=8", "trainer.log_every=1000", "dataset.train_size=1024",
                 f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    record = json.loads((tmp_path / "one/result.json").read_text())
    assert one.returncode == 0 and record["fabric"] is None and record["breakdown_s"]["comm"] == 0.0
