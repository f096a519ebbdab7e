"""Scaling metrics: repeats combined, speedup and efficiency against a baseline, where the step time goes,
stragglers, and a fitted alpha-beta model of the gradient all-reduce. Each figure's definition is in
DEFINITIONS, and the report prints them. Pure Python and numpy: no torch."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from itertools import groupby

import numpy as np

from pipeline.collector.records import GroupKey, Run

PREDICT_AT = (8, 16, 64)

DEFINITIONS = {
    "group": "runs that differ only in node count: same model and dataset (and their configs), per-rank batch "
             "(weak) or global batch (strong), precision, optimizer, scaling mode, tasks per node, device and git "
             "sha. Oversubscribed runs form groups of their own and are never a baseline.",
    "throughput": "samples/s over the timed steps (global batch x timed steps / slowest rank's timed time); "
                  "repeats of a point are averaged, with a 95% confidence interval mean +- t(0.975, n-1) s/sqrt(n)",
    "per-rank throughput": "throughput / world size",
    "baseline": "the group's smallest node count",
    "speedup": "throughput_N / throughput_base",
    "efficiency": "strong scaling: T_base x N_base / (T_N x N), T the time for the fixed work, = "
                  "throughput_N x N_base / (throughput_base x N); weak scaling: throughput_N / (throughput_base x "
                  "N / N_base), the same expression. Its interval propagates both throughputs' relative intervals "
                  "in quadrature.",
    "data / compute / comm share": "each phase's share of the mean step time (phases as defined in the records: "
                                   "comm is the all-reduce time not hidden behind backward)",
    "straggler skew": "per run, the slowest rank's median busy time (data + compute per step, i.e. the step "
                      "without waiting for communication, which DDP's all-reduce evens out) over the median "
                      "rank's; the host is that rank's Slurm node; averaged over repeats, host of the worst run",
    "model": "ring all-reduce alpha-beta model, fitted by non-negative least squares to the measured comm time "
             "per step of every run with more than one rank: comm(P) = alpha x 2(P-1) + 2(P-1)/P x bytes / "
             "bandwidth, P ranks, bytes the gradient bytes. Because the measured comm is the part not overlapped "
             "with backward, the bandwidth is an effective one. Predicted step(P) = the baseline's data + compute "
             "(scaled by P_base/P in strong scaling) + comm(P); predicted efficiency compares predicted "
             "throughputs as above.",
}


def t975(df: int) -> float:
    """Student's t 0.975 quantile (two-sided 95%)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
    if df in table:
        return table[df]
    below = [k for k in table if k < df]
    return table[max(below)] if df <= 120 else 1.960  # the next smaller df: a slightly wider, safe interval


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% confidence interval (None for a single value)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, None
    return mean, t975(n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n)


@dataclass
class Row:
    group: str
    experiment: str  # the group without its code version: what a regression check compares across commits
    scaling: str
    nodes: int
    world_size: int
    runs: int
    oversubscribed: bool
    throughput: float
    throughput_ci: float | None
    throughput_per_rank: float
    baseline_nodes: int | None
    speedup: float | None
    efficiency: float | None
    efficiency_ci: float | None
    step_time_s: float
    share_data: float
    share_compute: float
    share_comm: float
    breakdown_s: tuple[float, float, float]
    skew: float
    straggler_host: str
    straggler_rank: int
    predicted_efficiency: float | None = None


@dataclass
class ScalingModel:
    group: str
    fitted: bool
    reason: str
    alpha_us: float | None = None
    bandwidth_gb_s: float | None = None
    gradient_bytes: int | None = None
    measured: dict = field(default_factory=dict)  # nodes -> (measured efficiency, predicted efficiency)
    predicted: dict = field(default_factory=dict)  # nodes -> predicted efficiency


def group_label(key: GroupKey, code_version: bool = True) -> str:
    """The group as people read it; without the code version it names the experiment, which a regression check
    compares across commits."""
    cfg = hashlib.sha1((key.model_config + key.dataset_config).encode()).hexdigest()[:6]
    batch_kind = "global" if key.scaling == "strong" else "per-rank"
    label = (f"{key.model}/{key.dataset} {key.scaling} {batch_kind} batch {key.batch} {key.precision} {key.optimizer} "
             f"{key.tasks_per_node}/node {key.device} cfg {cfg}")
    if code_version:
        label += f" @{key.git_sha[:7]}"
    return label + (" [oversubscribed]" if key.oversubscribed else "")


def aggregate(runs: list[Run]) -> tuple[list[Row], list[ScalingModel]]:
    rows, models = [], []
    ordered = sorted(runs, key=lambda r: (r.group, r.nodes))
    for key, members in groupby(ordered, key=lambda r: r.group):
        members = list(members)
        group_rows = _group_rows(key, members)
        model = fit_model(key, members, group_rows)
        for row in group_rows:
            row.predicted_efficiency = model.measured.get(row.nodes, (None, None))[1]
        rows += group_rows
        models.append(model)
    return rows, models


def _group_rows(key: GroupKey, members: list[Run]) -> list[Row]:
    label, experiment, oversubscribed = group_label(key), group_label(key, code_version=False), key.oversubscribed
    rows = []
    for nodes, point in groupby(members, key=lambda r: r.nodes):
        point = list(point)
        thr, thr_ci = mean_ci([r.throughput for r in point])
        breakdown = tuple(float(np.mean([r.breakdown[i] for r in point])) for i in range(3))
        step = sum(breakdown)
        worst = max(point, key=lambda r: r.skew)
        rows.append(Row(group=label, experiment=experiment, scaling=key.scaling, nodes=nodes,
                        world_size=point[0].world_size, runs=len(point), oversubscribed=oversubscribed,
                        throughput=thr, throughput_ci=thr_ci, throughput_per_rank=thr / point[0].world_size,
                        baseline_nodes=None, speedup=None, efficiency=None, efficiency_ci=None, step_time_s=step,
                        share_data=breakdown[0] / step if step else 0.0,
                        share_compute=breakdown[1] / step if step else 0.0,
                        share_comm=breakdown[2] / step if step else 0.0, breakdown_s=breakdown,
                        skew=float(np.mean([r.skew for r in point])), straggler_host=worst.slowest_host,
                        straggler_rank=worst.slowest_rank))
    if not oversubscribed:
        base = rows[0]
        for row in rows:
            row.baseline_nodes = base.nodes
            row.speedup = row.throughput / base.throughput
            row.efficiency = row.speedup * base.nodes / row.nodes
            rel = [ci / t for ci, t in ((row.throughput_ci, row.throughput), (base.throughput_ci, base.throughput))
                   if ci is not None]
            if row is not base and rel:
                row.efficiency_ci = row.efficiency * math.sqrt(sum(x * x for x in rel))
    return rows


def fit_alpha_beta(ranks: np.ndarray, comm_s: np.ndarray, gradient_bytes: float) -> tuple[float, float]:
    """Non-negative least squares for comm = alpha x 2(P-1) + beta x 2(P-1)/P x bytes. Returns (alpha, beta)."""
    x = np.stack([2 * (ranks - 1), 2 * (ranks - 1) / ranks * gradient_bytes], axis=1)
    solution, *_ = np.linalg.lstsq(x, comm_s, rcond=None)
    if (solution >= 0).all():
        return float(solution[0]), float(solution[1])
    # one coefficient would be negative: the best fit has it at zero; fit the other alone
    fits = []
    for j in (0, 1):
        col = x[:, j]
        coef = max(0.0, float(col @ comm_s / (col @ col)))
        fits.append((float(np.sum((comm_s - coef * col) ** 2)), j, coef))
    _, j, coef = min(fits)
    return (coef, 0.0) if j == 0 else (0.0, coef)


def fit_model(key: GroupKey, members: list[Run], rows: list[Row]) -> ScalingModel:
    label = group_label(key)
    if key.oversubscribed:
        return ScalingModel(label, False, "oversubscribed runs: their timings do not model scaling")
    multi = [r for r in members if r.world_size > 1]
    distinct = sorted({r.world_size for r in multi})
    if len(distinct) < 2:
        return ScalingModel(label, False, f"too few points to fit: runs with more than one rank at "
                                          f"{len(distinct)} world size(s) {distinct}; the two parameters need two")
    ranks = np.array([r.world_size for r in multi], dtype=float)
    comm = np.array([r.breakdown[2] for r in multi])
    nbytes = members[0].gradient_bytes
    alpha, beta = fit_alpha_beta(ranks, comm, nbytes)
    base = rows[0]
    tpn = base.world_size // base.nodes
    strong = key.scaling == "strong"
    per_rank_batch = members[0].global_batch // members[0].world_size  # fixed in a weak-scaling group

    def predicted_throughput(nodes: int) -> float:
        p = nodes * tpn
        work = base.breakdown_s[0] + base.breakdown_s[1]
        step = work * (base.world_size / p if strong else 1.0) + alpha * 2 * (p - 1) + beta * 2 * (p - 1) / p * nbytes
        batch = members[0].global_batch if strong else per_rank_batch * p
        return batch / step

    def predicted_efficiency(nodes: int) -> float:
        return predicted_throughput(nodes) / predicted_throughput(base.nodes) * base.nodes / nodes

    return ScalingModel(label, True, "", alpha_us=alpha * 1e6, bandwidth_gb_s=(1 / beta / 1e9) if beta > 0 else None,
                        gradient_bytes=nbytes,
                        measured={r.nodes: (r.efficiency, predicted_efficiency(r.nodes)) for r in rows},
                        predicted={n: predicted_efficiency(n) for n in PREDICT_AT})


def regressions(rows: list[Row], baseline_rows: list[dict], tolerance: float) -> list[str]:
    """Where throughput or efficiency fell by more than `tolerance` (relative) against an earlier collection."""
    old = {(r["experiment"], r["nodes"]): r for r in baseline_rows}
    found = []
    for row in rows:
        before = old.get((row.experiment, row.nodes))
        if before is None:
            continue
        for name in ("throughput", "efficiency"):
            new, was = getattr(row, name), before.get(name)
            if new is not None and was and new < was * (1 - tolerance):
                found.append(f"{row.experiment}, {row.nodes} node(s): {name} {was:.4g} -> {new:.4g} "
                             f"({(new / was - 1) * 100:+.1f}%, tolerance -{tolerance * 100:.0f}%)")
    return found


def to_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
