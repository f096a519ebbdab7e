"""What more nodes would buy: the step time and efficiency of a scaling group predicted at its measured node
counts (the validation), at the node counts a user is choosing between (`collect --predict-at`, default 8, 16,
64), and for the largest measured node count from the smaller ones alone (the held-out validation).

    ring(P) = sum over the step's collectives of calls x k(P_g-1) x latency + k(P_g-1)/P_g x bytes / bandwidth
    step(P) = work x (P_src / P in strong scaling, 1 in weak) + comm(P)
    efficiency(N) = throughput(N) x N_base / (throughput_base x N),   throughput = global batch / step

(the ring model, pipeline.allreduce: k = 2 for an all-reduce, 1 for an all-gather or a reduce-scatter; P_g the
ranks of the collective's group at P ranks). DDP's step has one all-reduce of the gradient over every rank, as
2(P-1) latency + 2(P-1)/P gradient_bytes / bandwidth. A sharded run's are as its record plans them: FSDP all-gathers
every group's parameters in forward and again in backward where resharded, and reduce-scatters its gradients, over
every rank; HSDP does both within a node (its shard group does not grow with the nodes) and all-reduces each rank's
reduced shard across the nodes. throughput_base is the baseline's measured throughput (so a noisy baseline moves
the prediction as it moves the measurement it is judged against). Two models of comm(P):

- "probes": comm(P) = kappa x ring(P), latency and bandwidth from the fabric probes the jobs ran before training
  (each collective with its own: a sharded job probes its all-gather and reduce-scatter on its shard group),
  and kappa and the work (data + compute) from the runs of the largest measured node count below N. kappa, the
  measured comm phase over what the run's own probe predicts for its step's collectives, carries what the ring
  model of them does not: DDP hides part of it behind backward (kappa < 1), or splits it into buckets that each
  pay the latency and, on CPUs, compete with backward for the cores (kappa > 1: 1.3 to 2 on the shaped 2-core
  fabric of docs/performance.md). Below the smallest multi-rank node count there is nothing to take it from: kappa
  is 1 there, and the work the baseline's. A prediction at a measured N thus uses nothing of the training at N
  (its own probes, which are measured before training, it does use); beyond, everything of the largest measured.
- "fit": one latency and bandwidth fitted (pipeline.allreduce, non-negative least squares) to the measured comm phase
  of the group's multi-rank runs, the work the baseline's: it reproduces what it was fitted to, so it validates
  nothing by itself.

Held out: each model again on the runs below the largest measured node count L alone (probes included), its
prediction at L beside the measurement there, with the error and whether the measurement is inside the interval.

Every prediction carries a 95% interval. Probes: the relative half-widths (Student's t over the repeats) of the
probes' predictions, of kappa and of the work (each weighted by its share of the step), of the baseline
throughput, and of a new measurement's own scatter (the repeats' relative spread, pooled over the measured node
counts, for the mean of as many repeats), added in quadrature; cut at 0. Fit: the 2.5-97.5 percentiles of the fits
of 200 resamplings of the runs (one per node count each time, and a baseline run). With too few probes, repeats or
node counts the forecast says what is missing instead of giving a number. Pure Python and numpy: no torch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
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
    kappa: float | None = None  # the probe model's exposed-comm factor for this prediction
    source: str = ""  # what it was predicted from, in words

    @property
    def error(self) -> float | None:
        """predicted / measured - 1, the validation at a measured node count."""
        if self.predicted is None or not self.measured:
            return None
        return self.predicted / self.measured - 1

    @property
    def inside(self) -> bool | None:
        """Whether the measurement is inside the interval."""
        if self.measured is None or self.low is None:
            return None
        return self.low <= self.measured <= self.high


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
    held_out: Prediction | None = None  # the largest measured node count, predicted from the smaller ones alone
    held_out_missing: str = ""  # why there is none
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
    throughputs: list[float] = field(default_factory=list)  # measured, per repeat
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


@dataclass
class Group:
    """One scaling group as both models see it."""

    label: str
    base: Baseline
    members: list[Run]
    measured: dict[int, float]  # node count -> measured efficiency
    base_ci_rel: float | None  # the baseline throughput's relative 95% half-width (None: one run)
    predict_at: tuple[int, ...] = PREDICT_AT
    hold_out: bool = True  # whether to predict the largest measured node count from the smaller ones too

    def below(self, nodes: int) -> "Group":
        """The group as if nothing at `nodes` nodes or more had been measured, predicting at `nodes`."""
        return replace(self, members=[r for r in self.members if r.nodes < nodes],
                       measured={n: e for n, e in self.measured.items() if n < nodes}, predict_at=(nodes,),
                       hold_out=False)


def throughput(base: Baseline, nodes: int, step: float) -> float:
    p = nodes * base.tasks_per_node
    return (base.global_batch if base.strong else base.per_rank_batch * p) / step


def efficiency(base: Baseline, nodes: int, step: float, base_throughput: float) -> float:
    """The efficiency at `nodes` of a step of `step` seconds, against the baseline's measured throughput."""
    return throughput(base, nodes, step) / base_throughput * base.nodes / nodes


Fabric = dict[str, tuple[float, float]]  # op -> (latency s, seconds per byte)


def comm_model(base: Baseline, fabric: Fabric) -> Callable[[int], float]:
    """ring(nodes): the baseline's collectives at that node count on the ring model, each op on its fabric."""
    return lambda n: allreduce.volume_time(base.volumes_at(n), fabric)


def _described(forecast: Forecast, base: Baseline, fabric: Fabric) -> None:
    """The forecast's fabric per op (latency us, bandwidth GB/s), the all-reduce's (else the first op's) as its
    headline, and the bytes the baseline's step moves per op."""
    forecast.fabric = {op: (lat * 1e6, 1 / spb / 1e9 if spb > 0 else None) for op, (lat, spb) in fabric.items()
                       if op in base.ops}
    headline = forecast.fabric.get("all_reduce") or next(iter(forecast.fabric.values()), (None, None))
    forecast.latency_us, forecast.bandwidth_gb_s = headline
    forecast.step_bytes = {}
    for _, v in base.collectives:
        forecast.step_bytes[v.op] = forecast.step_bytes.get(v.op, 0) + v.bytes


def mean_fabric(entries: list[tuple[Fabric, Run]], ops: set[str]) -> Fabric:
    return {op: tuple(float(x) for x in np.mean([f[op] for f, _ in entries], axis=0)) for op in ops}


def targets(measured: dict[int, float], predict_at: tuple[int, ...]) -> list[int]:
    return sorted(set(measured) | set(predict_at))


def next_measurement(measured: dict[int, float], reason_missing: str, predict_at: tuple[int, ...]) -> str:
    largest = max(measured)
    if reason_missing:
        return f"repeat the measured node counts (e.g. -m trainer.seed=0,1): {reason_missing}"
    if largest >= max(predict_at):
        return ""
    return (f"{2 * largest} nodes: the forecast beyond {largest} nodes extrapolates from {largest}; a point at "
            f"{2 * largest} halves the distance to {2 * largest * 2} and tests the fabric at a larger scale")


def half_width(values: list[float]) -> float:
    """The relative 95% half-width of the mean of `values` (Student's t); 0 for one value."""
    mean = float(np.mean(values))
    if len(values) < 2 or mean == 0:
        return 0.0
    return t975(len(values) - 1) * float(np.std(values, ddof=1)) / math.sqrt(len(values)) / abs(mean)


def scatter(members: list[Run]) -> tuple[float, int]:
    """The repeats' relative spread of throughput (a standard deviation, pooled over the node counts with two runs
    or more), and its degrees of freedom."""
    squares, df = 0.0, 0
    for n in {r.nodes for r in members}:
        values = [r.throughput for r in members if r.nodes == n]
        if len(values) >= 2:
            squares += float(np.var(values, ddof=1)) / float(np.mean(values)) ** 2 * (len(values) - 1)
            df += len(values) - 1
    return (math.sqrt(squares / df), df) if df else (0.0, 0)


# ------------------------------------------------------------------------------------------- the probe model
def from_probes(g: Group) -> Forecast:
    forecast = Forecast(g.label, "probes", gradient_bytes=g.base.gradient_bytes)
    probes = probes_by_nodes(g.members, g.base.ops)
    if not probes:
        forecast.missing = (f"no fabric probes of {', '.join(sorted(g.base.ops))} in these records (multi-rank runs "
                            "with probe.enabled=true record them)")
        return forecast
    _described(forecast, g.base, mean_fabric(probes[max(probes)], g.base.ops))
    lacking = lacking_repeats(g, probes)
    forecast.missing = "needs " + " and ".join(lacking) + " for an interval" if lacking else ""
    for n in targets(g.measured, g.predict_at):
        forecast.predictions.append(predict(g, probes, n, bool(lacking)))
    forecast.next_measurement = next_measurement(g.measured, forecast.missing, g.predict_at)
    held_out(g, forecast, from_probes)
    return forecast


def probed(r: Run) -> Fabric:
    """A run's probes, per op (latency s, seconds per byte); records from before probes named their op had the
    all-reduce alone."""
    if r.probe is None:
        return {}
    ops = dict(r.probe.ops)
    if not ops and r.probe.bandwidth_bytes_s:
        ops = {"all_reduce": (r.probe.latency_s or 0.0, 1 / r.probe.bandwidth_bytes_s)}
    return ops


def probes_by_nodes(members: list[Run], ops: set[str]) -> dict[int, list[tuple[Fabric, Run]]]:
    """node count -> [(the fabric per op, the run)] of the multi-rank runs that probed every op of the step."""
    probes: dict[int, list] = {}
    for r in members:
        fabric = probed(r)
        if r.world_size > 1 and fabric and ops <= set(fabric):
            probes.setdefault(r.nodes, []).append((fabric, r))
    return probes


def lacking_repeats(g: Group, probes: dict[int, list]) -> list[str]:
    lacking = []
    if min(len(v) for v in probes.values()) < 2:
        lacking.append("two runs with probes at each multi-node count")
    if g.base_ci_rel is None:
        lacking.append(f"two runs at the baseline ({g.base.nodes} node(s))")
    return lacking


def training_source(g: Group, n: int) -> tuple[list[Run], str]:
    """The runs kappa and the work come from for a prediction at n: the largest measured node count below n with
    multi-rank runs; none below the smallest."""
    counts = sorted({r.nodes for r in g.members if r.world_size > 1 and r.nodes < n})
    if not counts:
        return [], ""
    return [r for r in g.members if r.nodes == counts[-1]], f"{counts[-1]} node(s)"


def predict(g: Group, probes: dict[int, list], n: int, lacking: bool) -> Prediction:
    base = g.base
    prediction = Prediction(n, g.measured.get(n), None)
    if n == base.nodes:
        prediction.predicted = prediction.low = prediction.high = 1.0
        return prediction
    source_nodes = max([k for k in probes if k <= n], default=min(probes))
    rings = [comm_model(base, fabric)(n) for fabric, _ in probes[source_nodes]]
    runs, trained = training_source(g, n)
    if runs:
        p_src = runs[0].world_size
        scale = p_src / (n * base.tasks_per_node) if base.strong else 1.0
        work = [(r.breakdown[0] + r.breakdown[1]) * scale for r in runs]
        kappas = [r.breakdown[2] / comm_model(base, own_probe(r, probes, base.ops))(r.nodes) for r in runs]
    else:  # nothing below communicates: the baseline's work, and the whole communication exposed
        scale = base.world_size / (n * base.tasks_per_node) if base.strong else 1.0
        work, kappas = [w * scale for w in base.work_s], [1.0]
    kappa = float(np.mean(kappas))
    prediction.kappa = kappa
    prediction.source = (f"probes of {source_nodes} node(s); kappa {kappa:.2f} and the work from "
                         f"{trained or f'the baseline ({base.nodes} node(s)), kappa 1'}")
    if lacking:
        return prediction
    base_throughput = float(np.mean(base.throughputs))
    steps = [float(np.mean(work)) + kappa * c for c in rings]
    each = [efficiency(base, n, s, base_throughput) for s in steps]
    mean = float(np.mean(each))
    step = float(np.mean(steps))
    comm_share = kappa * float(np.mean(rings)) / step
    spread_rel, df = scatter(g.members)
    repeats = len(runs) if n not in g.measured else sum(1 for r in g.members if r.nodes == n)
    half = math.sqrt(half_width(each) ** 2 + (comm_share * half_width(kappas)) ** 2
                     + ((1 - comm_share) * half_width(work)) ** 2 + (g.base_ci_rel or 0.0) ** 2
                     + (t975(df) * spread_rel / math.sqrt(max(repeats, 1)) if df else 0.0) ** 2)
    prediction.predicted, prediction.low, prediction.high = mean, max(mean * (1 - half), 0.0), mean * (1 + half)
    return prediction


def own_probe(r: Run, probes: dict[int, list], ops: set[str]) -> Fabric:
    """A run's own probes, else the mean of its node count's."""
    fabric = probed(r)
    if fabric and ops <= set(fabric):
        return fabric
    return mean_fabric(probes.get(r.nodes) or next(iter(probes.values())), ops)


def held_out(g: Group, forecast: Forecast, model: Callable[[Group], Forecast]) -> None:
    """The largest measured node count predicted by `model` from the smaller ones alone."""
    if not g.hold_out:
        return
    largest = max(g.measured)
    smaller = sorted(n for n in g.measured if n < largest)
    if not smaller:
        forecast.held_out_missing = "one node count: nothing to hold out"
        return
    alone = model(g.below(largest))
    found = next((p for p in alone.predictions if p.nodes == largest), None)
    if found is None or found.predicted is None:
        forecast.held_out_missing = (f"the runs below {largest} nodes ({', '.join(map(str, smaller))}) give no "
                                     f"prediction: {alone.missing or 'too few of them'}")
        return
    found.measured = g.measured[largest]
    forecast.held_out = found


# ---------------------------------------------------------------------------------------------- the fit
def from_fit(g: Group) -> Forecast:
    base = g.base
    forecast = Forecast(g.label, "fit", gradient_bytes=base.gradient_bytes)
    multi = [r for r in g.members if r.world_size > 1]
    by_nodes: dict[int, list[Run]] = {}
    for r in multi:
        by_nodes.setdefault(r.nodes, []).append(r)
    if len(by_nodes) < 2:
        forecast.missing = (f"too few points to fit: multi-rank runs at {len(by_nodes)} node count(s) "
                            f"{sorted(by_nodes)}; latency and bandwidth need two")
        largest = max(g.measured)
        forecast.next_measurement = (f"{2 * largest} nodes: the fit needs multi-rank runs at two node counts, and "
                                     f"repeats of the same ones would not give it a second")
        held_out(g, forecast, from_fit)
        return forecast

    def fit(runs: list[Run]) -> tuple[float, float]:
        x = np.array([allreduce.volume_terms(base.volumes_at(r.nodes)) for r in runs])
        return allreduce.fit_columns(x, [r.breakdown[2] for r in runs])

    def each_op(a: float, b: float) -> Fabric:
        return {op: (a, b) for op in base.ops}

    def step(n: int, work: float, a: float, b: float) -> float:
        p = n * base.tasks_per_node
        return work * (base.world_size / p if base.strong else 1.0) + (comm_model(base, each_op(a, b))(n)
                                                                        if p > 1 else 0.0)

    alpha, beta = fit(multi)
    _described(forecast, base, each_op(alpha, beta))
    work, base_throughput = float(np.mean(base.work_s)), float(np.mean(base.throughputs))
    repeated = min(len(v) for v in by_nodes.values()) >= 2 and len(base.work_s) >= 2
    if not repeated:
        forecast.missing = "needs two runs at each node count for an interval (the fit is resampled over repeats)"
    rng = random.Random(0)
    samples = []
    for _ in range(RESAMPLES if repeated else 0):
        a, b = fit([rng.choice(v) for v in by_nodes.values()])
        k = rng.randrange(len(base.work_s))
        samples.append((a, b, base.work_s[k], base.throughputs[k]))
    for n in targets(g.measured, g.predict_at):
        prediction = Prediction(n, g.measured.get(n), None, source="fitted to the comm phase of " + ", ".join(
            f"{k}" for k in sorted(by_nodes)) + " node(s)")
        if n == base.nodes:
            prediction.predicted = prediction.low = prediction.high = 1.0
        elif repeated:
            each = sorted(efficiency(base, n, step(n, w, a, b), thr) for a, b, w, thr in samples)
            prediction.predicted = efficiency(base, n, step(n, work, alpha, beta), base_throughput)
            prediction.low, prediction.high = float(np.percentile(each, 2.5)), float(np.percentile(each, 97.5))
        forecast.predictions.append(prediction)
    forecast.next_measurement = next_measurement(g.measured, forecast.missing, g.predict_at)
    held_out(g, forecast, from_fit)
    return forecast


def t975(df: int) -> float:
    """Student's t 0.975 quantile (two-sided 95%)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
    if df in table:
        return table[df]
    below = [k for k in table if k < df]
    return table[max(below)] if df <= 120 else 1.960  # the next smaller df: a slightly wider, safe interval
