"""The fabric probe: nccl-tests' definitions on known timings, the ring model recovered from a synthetic fabric,
NCCL's transport read from its own log lines, and a real probe in a 2-rank gloo job's record."""

import json

import pytest

import pipeline.job.probe as probe
from pipeline.job.probe import fell_back_to_sockets, fit_ring, nccl_transport, probe_sizes, run_probe
from tests.conftest import launch

LATENCY, BANDWIDTH = 20e-6, 5e9  # s per ring step, bytes/s


def ring_time(nbytes: int, world: int) -> float:
    return 2 * (world - 1) * LATENCY + 2 * (world - 1) / world * nbytes / BANDWIDTH


@pytest.mark.parametrize("world", [2, 4, 8])
def test_busbw_and_the_fitted_ring_on_a_synthetic_fabric(monkeypatch, world):
    monkeypatch.setattr(probe, "time_all_reduce", lambda nbytes, device: ring_time(nbytes, world))
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


def test_a_fit_that_would_give_a_negative_latency_clamps_it_to_zero():
    # time falls short of proportional at small sizes: the unconstrained fit's latency would be negative
    points = [probe.ProbePoint(bytes=s, time_s=t, algbw_gb_s=1.0, busbw_gb_s=1.0)
              for s, t in ((8, 0.0), (1 << 20, 0.9e-3), (1 << 22, 4.1e-3))]
    latency, bandwidth = fit_ring(points, world=2)
    # with the latency at 0: 1/bw = sum(x t) / sum(x x), x = 2(1)/2 bytes = bytes
    x = [8, 1 << 20, 1 << 22]
    t = [0.0, 0.9e-3, 4.1e-3]
    assert latency == 0.0 and bandwidth == pytest.approx(sum(a * a for a in x) / sum(a * b for a, b in zip(x, t)))


NCCL_IB = """node1:123:456 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB ; OOB eth0:10.0.0.1<0>
node1:123:456 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/NVL
node1:123:456 [0] NCCL INFO Channel 00/0 : 3[3] -> 4[0] [send] via NET/IB/0
"""
NCCL_SOCKETS = """node1:1:2 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.1<0>
node1:1:2 [0] NCCL INFO Channel 00/0 : 1[0] -> 0[0] [receive] via NET/Socket/0
"""


def test_the_transport_is_read_from_ncclS_own_log(tmp_path):
    (tmp_path / "a.log").write_text(NCCL_IB)
    (tmp_path / "b.log").write_text(NCCL_SOCKETS)
    (tmp_path / "c.log").write_text("NCCL INFO Channel 00/0 : 0[0] -> 1[1] via SHM/direct/direct\n")
    assert nccl_transport([tmp_path / "a.log"]) == "infiniband+nvlink"
    assert nccl_transport([tmp_path / "b.log"]) == "sockets" and nccl_transport([tmp_path / "c.log"]) == "shm"
    assert nccl_transport([tmp_path / "missing.log"]) is None
    fabric = probe.Fabric(backend="nccl", world_size=8, points=[], seconds=1.0, latency_us=None, bandwidth_gb_s=None,
                          transport="sockets")
    assert fell_back_to_sockets(fabric, nodes=2) and not fell_back_to_sockets(fabric, nodes=1)


@pytest.mark.slow
def test_a_two_rank_job_records_its_probe(tmp_path):
    r = launch("nodes=2", "trainer.max_steps=8", "trainer.log_every=1000", "dataset.train_size=1024",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fabric = json.loads((tmp_path / "run/result.json").read_text())["fabric"]
    assert (fabric["backend"], fabric["world_size"], fabric["transport"]) == ("gloo", 2, "tcp")
    assert fabric["points"][-1]["bytes"] >= 407_080 and 0 < fabric["seconds"] < 10
    assert fabric["bandwidth_gb_s"] is None or fabric["bandwidth_gb_s"] > 0
    one = launch("trainer.max_steps=8", "trainer.log_every=1000", "dataset.train_size=1024",
                 f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    record = json.loads((tmp_path / "one/result.json").read_text())
    assert one.returncode == 0 and record["fabric"] is None and record["breakdown_s"]["comm"] == 0.0
