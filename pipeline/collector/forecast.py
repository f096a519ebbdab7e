"""What more nodes would buy: the step time and efficiency of a scaling group predicted at its measured node
counts (the validation) and at 8, 16 and 64 nodes, by two models of the step's communication.

    comm(P) = sum over the step's collectives of calls x k(P_g-1) x latency + k(P_g-1)/P_g x bytes / bandwidth
    step(P) = (data + compute)_base x (P_base / P in strong scaling, 1 in weak) + comm(P)
    efficiency(N) = throughput(N) x N_base / (throughput(N_base) x N),   throughput = global batch / step

(the ring model, pipeline.allreduce: k = 2 for an all-reduce, 1 for an all-gather or a reduce-scatter; P_g the
ranks of the collective's group at P ranks). DDP's step has one all-reduce of the gradient over every rank, as
2(P-1) latency + 2(P-1)/P gradient_bytes / bandwidth. A sharded run's are as its record plans them: FSDP all-gathers
every group's parameters in forward and again in backward where resharded, and reduce-scatters its gradients, over
every rank; HSDP does both within a node (its shard group does not grow with the nodes) and all-reduces each rank's
reduced shard across the nodes.

- "probes": latency and bandwidth from the fabric probes the jobs ran before training (independent of the
  training times they are judged against), each collective with its own (a sharded job probes its all-gather and
  reduce-scatter on its shard group). comm(P) is the whole communication, none of it hidden behind compute,
  so the predicted step is an upper bound and the efficiency a lower bound for a model whose all-reduce DDP
  overlaps with backward. A prediction at N nodes uses the probes of the largest measured node count <= N.
- "fit": one latency and bandwidth fitted (pipeline.allreduce, non-negative least squares) to the measured comm
  phase (the communication not hidden behind compute) of the group's multi-rank runs: it reproduces what it was
  fitted to, so it validates nothing by itself.

Every prediction carries a 95% interval: for the probe model, over the predictions of each probe (t-interval),
widened by the baseline throughput's interval (quadrature) and cut at 0 (no efficiency is negative); for the
fit, the 2.5-97.5 percentiles of the fits of 200 resamplings of the runs (one run per node count each time).
With too few probes, repeats or node counts the forecast says what is missing instead of giving a number. Pure
Python and numpy: no torch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline import allreduce
from pipeline.allreduce import Volume
from pipeline.collector.records import Run

PREDICT_AT = (8, 16, 64)
RESAMPLES = 200


@dataclass
class Prediction:
    nodes: int
    measured: float | None  # the measured efficiency (mean of repeats), where measured
    predicted: float | None  # None where no interval can be given (see Forecast.missing)
    low: float | None = None
    high: float | None = None

    @property
    def error(self) -> float | None:
        """predicted / measured - 1, the validation at a measured node count."""
        if self.predicted is None or not self.measured:
            return None
        return self.predicted / self.measured - 1


@dataclass
class Forecast:
    group: str
    source: str  # "probes" or "fit"
    missing: str = ""  # what is missing for numbers (empty when every prediction has its interval)
    latency_us: float | None = None
    bandwidth_gb_s: float | None = None
    gradient_bytes: int | None = None
    predictions: list[Prediction] = field(default_factory=list)
    next_measurement: str = ""  # the node count whose measurement would narrow the forecast most, and why
    fabric: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # op -> (latency us, bandwidth GB/s)
    step_bytes: dict[str, int] = field(default_factory=dict)  # op -> bytes per step at the baseline


@dataclass
class Baseline:
    """What the predictions start from: the group's smallest node count."""

    nodes: int
    world_size: int
    work_s: list[float]  # data + compute per step, per repeat
    tasks_per_node: int
    strong: bool
    global_batch: int  # fixed in strong scaling
    per_rank_batch: int  # fixed in weak scaling
    gradient_bytes: int
    # the step's collectives at the baseline, (group, volume), and the parallel mode (how the groups grow)
    collectives: tuple[tuple[str, Volume], ...] = ()
    kind: str = "ddp"

    def volumes_at(self, nodes: int) -> list[Volume]:
        """The step's collectives at `nodes` nodes: a group of every rank (DDP's; FSDP's shard group) grows with the
        nodes, HSDP's shard group (a node's ranks) stays, its replicate group (a replica per node) grows."""
        out = []
        for group, v in self.collectives:
            if group == "world" or (group == "shard" and self.kind == "fsdp"):
                ranks = nodes * self.tasks_per_node
            elif group == "replicate":
                ranks = max(1, v.ranks * nodes // self.nodes)
            else:
                ranks = v.ranks
            out.append(v._replace(ranks=ranks))
        return out

    @property
    def ops(self) -> set[str]:
        return {v.op for _, v in self.collectives}


def efficiency(base: Baseline, work: float, nodes: int, comm: Callable[[int], float]) -> float:
    """Predicted efficiency at `nodes` against the baseline, for a step communicating comm(nodes) seconds."""
    def throughput(n: int) -> float:
        p = n * base.tasks_per_node
        step = work * (base.world_size / p if base.strong else 1.0) + (comm(n) if p > 1 else 0.0)
        return (base.global_batch if base.strong else base.per_rank_batch * p) / step
    return throughput(nodes) / throughput(base.nodes) * base.nodes / nodes


def comm_model(base: Baseline, fabric: dict[str, tuple[float, float]]) -> Callable[[int], float]:
    """comm(nodes): the baseline's collectives at that node count on the ring model, each op on its (latency s,
    seconds per byte)."""
    return lambda n: allreduce.volume_time(base.volumes_at(n), fabric)


def _described(forecast: Forecast, base: Baseline, fabric: dict[str, tuple[float, float]]) -> None:
    """The forecast's fabric per op (latency us, bandwidth GB/s), the all-reduce's (else the first op's) as its
    headline, and the bytes the baseline's step moves per op."""
    forecast.fabric = {op: (lat * 1e6, 1 / spb / 1e9 if spb > 0 else None) for op, (lat, spb) in fabric.items()
                       if op in base.ops}
    headline = forecast.fabric.get("all_reduce") or next(iter(forecast.fabric.values()), (None, None))
    forecast.latency_us, forecast.bandwidth_gb_s = headline
    forecast.step_bytes = {}
    for _, v in base.collectives:
        forecast.step_bytes[v.op] = forecast.step_bytes.get(v.op, 0) + v.bytes


def targets(measured: dict[int, float]) -> list[int]:
    return sorted(set(measured) | set(PREDICT_AT))


def next_measurement(measured: dict[int, float], reason_missing: str) -> str:
    largest = max(measured)
    if reason_missing:
        return f"repeat the measured node counts (e.g. -m trainer.seed=0,1): {reason_missing}"
    if largest >= max(PREDICT_AT):
        return ""
    return (f"{2 * largest} nodes: the forecast beyond {largest} nodes extrapolates from {largest}; a point at "
            f"{2 * largest} halves the distance to {2 * largest * 2} and tests the fabric at a larger scale")


def from_probes(label: str, base: Baseline, members: list[Run], measured: dict[int, float],
                base_ci_rel: float | None) -> Forecast:
    probes = {}  # node count -> [{op: (latency s, seconds per byte)}], runs that probed every op the step issues
    for r in members:
        ops = dict(r.probe.ops) if r.probe is not None else {}
        if r.probe is not None and not ops and r.probe.bandwidth_bytes_s:  # read before probes named their op
            ops = {"all_reduce": (r.probe.latency_s or 0.0, 1 / r.probe.bandwidth_bytes_s)}
        if r.world_size > 1 and base.ops <= set(ops):
            probes.setdefault(r.nodes, []).append(ops)
    forecast = Forecast(label, "probes", gradient_bytes=base.gradient_bytes)
    if not probes:
        forecast.missing = (f"no fabric probes of {', '.join(sorted(base.ops))} in these records (multi-rank runs "
                            "with probe.enabled=true record them)")
        return forecast
    largest = max(probes)
    _described(forecast, base, {op: tuple(np.mean([p[op] for p in probes[largest]], axis=0)) for op in base.ops})
    work = float(np.mean(base.work_s))
    lacking = []
    if min(len(v) for v in probes.values()) < 2:
        lacking.append("two runs with probes at each multi-node count")
    if base_ci_rel is None:
        lacking.append(f"two runs at the baseline ({base.nodes} node(s))")
    forecast.missing = "needs " + " and ".join(lacking) + " for an interval" if lacking else ""
    for n in targets(measured):
        source = probes[max([k for k in probes if k <= n], default=min(probes))]
        each = [efficiency(base, work, n, comm_model(base, ops)) for ops in source]
        prediction = Prediction(n, measured.get(n), None)
        if not lacking and n != base.nodes:
            mean = float(np.mean(each))
            half = t975(len(each) - 1) * float(np.std(each, ddof=1)) / math.sqrt(len(each))
            half = math.hypot(half, mean * base_ci_rel)
            prediction.predicted, prediction.low, prediction.high = mean, max(mean - half, 0.0), mean + half
        elif n == base.nodes:
            prediction.predicted = prediction.low = prediction.high = 1.0
        forecast.predictions.append(prediction)
    forecast.next_measurement = next_measurement(measured, forecast.missing)
    return forecast


def from_fit(label: str, base: Baseline, members: list[Run], measured: dict[int, float]) -> Forecast:
    forecast = Forecast(label, "fit", gradient_bytes=base.gradient_bytes)
    multi = [r for r in members if r.world_size > 1]
    by_nodes: dict[int, list[Run]] = {}
    for r in multi:
        by_nodes.setdefault(r.nodes, []).append(r)
    if len(by_nodes) < 2:
        forecast.missing = (f"too few points to fit: multi-rank runs at {len(by_nodes)} node count(s) "
                            f"{sorted(by_nodes)}; latency and bandwidth need two")
        forecast.next_measurement = next_measurement(measured, forecast.missing)
        return forecast

    def fit(runs: list[Run]) -> tuple[float, float]:
        x = np.array([allreduce.volume_terms(base.volumes_at(r.nodes)) for r in runs])
        return allreduce.fit_columns(x, [r.breakdown[2] for r in runs])

    def each_op(a: float, b: float) -> dict[str, tuple[float, float]]:
        return {op: (a, b) for op in base.ops}

    alpha, beta = fit(multi)
    _described(forecast, base, each_op(alpha, beta))
    work = float(np.mean(base.work_s))
    repeated = min(len(v) for v in by_nodes.values()) >= 2 and len(base.work_s) >= 2
    if not repeated:
        forecast.missing = "needs two runs at each node count for an interval (the fit is resampled over repeats)"
    rng = random.Random(0)
    samples = []
    for _ in range(RESAMPLES if repeated else 0):
        a, b = fit([rng.choice(v) for v in by_nodes.values()])
        samples.append((a, b, rng.choice(base.work_s)))
    for n in targets(measured):
        prediction = Prediction(n, measured.get(n), None)
        if repeated:
            each = sorted(efficiency(base, w, n, comm_model(base, each_op(a, b))) for a, b, w in samples)
            prediction.predicted = efficiency(base, work, n, comm_model(base, each_op(alpha, beta)))
            prediction.low, prediction.high = float(np.percentile(each, 2.5)), float(np.percentile(each, 97.5))
        forecast.predictions.append(prediction)
    forecast.next_measurement = next_measurement(measured, forecast.missing)
    return forecast


def t975(df: int) -> float:
    """Student's t 0.975 quantile (two-sided 95%)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
    if df in table:
        return table[df]
    below = [k for k in table if k < df]
    return table[max(below)] if df <= 120 else 1.960  # the next smaller df: a slightly wider, safe interval
