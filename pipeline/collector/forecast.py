"""What more nodes would buy: the step time and efficiency of a scaling group predicted at its measured node
counts (the validation) and at 8, 16 and 64 nodes, by two models of the gradient all-reduce.

    comm(P) = 2(P-1) x latency + 2(P-1)/P x gradient_bytes / bandwidth          (ring all-reduce, P ranks)
    step(P) = (data + compute)_base x (P_base / P in strong scaling, 1 in weak) + comm(P)
    efficiency(N) = throughput(N) x N_base / (throughput(N_base) x N),   throughput = global batch / step

- "probes": latency and bandwidth from the fabric probes the jobs ran before training (independent of the
  training times they are judged against). comm(P) is the whole all-reduce, none of it hidden behind backward,
  so the predicted step is an upper bound and the efficiency a lower bound for a model whose all-reduce DDP
  overlaps with backward. A prediction at N nodes uses the probes of the largest measured node count <= N.
- "fit": latency and bandwidth fitted (pipeline.allreduce, non-negative least squares) to the measured comm phase
  (the all-reduce not hidden behind backward) of the group's multi-rank runs: it reproduces what it was fitted
  to, so it validates nothing by itself.

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


def efficiency(base: Baseline, work: float, nodes: int, comm: Callable[[int], float]) -> float:
    """Predicted efficiency at `nodes` against the baseline, for a ring all-reduce taking comm(P) seconds."""
    def throughput(n: int) -> float:
        p = n * base.tasks_per_node
        step = work * (base.world_size / p if base.strong else 1.0) + (comm(p) if p > 1 else 0.0)
        return (base.global_batch if base.strong else base.per_rank_batch * p) / step
    return throughput(nodes) / throughput(base.nodes) * base.nodes / nodes


def ring(latency_s: float, seconds_per_byte: float, nbytes: int) -> Callable[[int], float]:
    return lambda p: allreduce.ring_time(latency_s, seconds_per_byte, p, nbytes)


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
    probes = {}  # node count -> [(latency s, seconds per byte)]
    for r in members:
        if r.probe is not None and r.probe.bandwidth_bytes_s and r.world_size > 1:
            probes.setdefault(r.nodes, []).append((r.probe.latency_s or 0.0, 1 / r.probe.bandwidth_bytes_s))
    forecast = Forecast(label, "probes", gradient_bytes=base.gradient_bytes)
    if not probes:
        forecast.missing = ("no fabric probes in these records (multi-rank runs with probe.enabled=true record "
                            "one)")
        return forecast
    largest = max(probes)
    lat, spb = np.mean([p[0] for p in probes[largest]]), np.mean([p[1] for p in probes[largest]])
    forecast.latency_us, forecast.bandwidth_gb_s = float(lat * 1e6), float(1 / spb / 1e9)
    work = float(np.mean(base.work_s))
    lacking = []
    if min(len(v) for v in probes.values()) < 2:
        lacking.append("two runs with probes at each multi-node count")
    if base_ci_rel is None:
        lacking.append(f"two runs at the baseline ({base.nodes} node(s))")
    forecast.missing = "needs " + " and ".join(lacking) + " for an interval" if lacking else ""
    for n in targets(measured):
        source = probes[max([k for k in probes if k <= n], default=min(probes))]
        each = [efficiency(base, work, n, ring(a, b, base.gradient_bytes)) for a, b in source]
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
        return allreduce.fit([r.world_size for r in runs], base.gradient_bytes, [r.breakdown[2] for r in runs])

    alpha, beta = fit(multi)
    forecast.latency_us, forecast.bandwidth_gb_s = alpha * 1e6, (1 / beta / 1e9) if beta > 0 else None
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
            each = sorted(efficiency(base, w, n, ring(a, b, base.gradient_bytes)) for a, b, w in samples)
            prediction.predicted = efficiency(base, work, n, ring(alpha, beta, base.gradient_bytes))
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
