"""Scaling metrics: repeats combined, speedup and efficiency against a baseline, where the step time goes,
stragglers, the fabric each run measured; and per group the forecasts (collector/forecast.py) and the cost view
(collector/cost.py). Each figure's definition is in DEFINITIONS, and the report prints them. Pure Python and
numpy: no torch."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from itertools import groupby

import numpy as np

from pipeline.collector.cost import COST_FRACTION, CostView, cost_view
from pipeline.collector.diagnosis import DEFINITIONS as REASONS, diagnose
from pipeline.collector.forecast import PREDICT_AT, Baseline, Forecast, Group, from_fit, from_probes, t975
from pipeline.collector.memory import ASSUMPTION, MemoryForecast, forecast_memory
from pipeline.collector.records import Diverged, GroupKey, Run
from pipeline.definitions import FABRIC

SLOW_FABRIC = 0.5  # a probe whose bus bandwidth is below this fraction of the median at its world size is flagged

DEFINITIONS = {
    "group": "runs that differ only in node count: same model and dataset (and their configs), per-rank batch "
             "(weak) or global batch (strong), precision, optimizer, scaling mode, tasks per node, CPU threads per "
             "rank, device, git sha, parallel mode (ddp, fsdp, hsdp) and trainer.grad_accum_steps as configured "
             "(auto: picked per node count, the global batch fixed). Oversubscribed runs form groups of their own "
             "and are never a baseline.",
    "throughput": "samples/s over the timed steps (global batch x timed steps / slowest rank's timed time); "
                  "repeats of a point are averaged, with a 95% confidence interval mean +- t(0.975, n-1) s/sqrt(n)",
    "per-rank throughput": "throughput / world size",
    "tokens/s": "a token model's throughput in tokens: samples/s x tokens per sample (the input's length)",
    "baseline": "the group's smallest node count",
    "speedup": "throughput_N / throughput_base",
    "efficiency": "strong scaling: T_base x N_base / (T_N x N), T the time for the fixed work, = "
                  "throughput_N x N_base / (throughput_base x N); weak scaling: throughput_N / (throughput_base x "
                  "N / N_base), the same expression. Its interval propagates both throughputs' relative intervals "
                  "in quadrature.",
    "data / compute / comm share": "each phase's share of the mean step time (phases as defined in the records: "
                                   "comm is the all-reduce time not hidden behind backward; a run of one rank has "
                                   "no communication, so no comm phase: shown as -)",
    "straggler skew": "per run, the slowest rank's median busy time (data + compute per step, i.e. the step "
                      "without waiting for communication, which DDP's all-reduce evens out) over the median "
                      "rank's; the host is that rank's Slurm node; averaged over repeats, host of the worst run",
    "fabric": FABRIC + f". Flagged: a multi-node NCCL job on TCP sockets; a busbw below {SLOW_FABRIC:.0%} of the "
              "median of the collection's probes at the same world size",
    "forecast": "step(P) = work x (P_src/P in strong scaling) + comm(P), efficiency(N) = throughput(N) x N_base / "
                "(throughput_base x N) with throughput_base the baseline's measured one. 'probes': comm(P) = kappa x "
                "ring(P), ring(P) = 2(P-1) latency + 2(P-1)/P gradient_bytes / bandwidth with latency and bandwidth "
                "from the fabric probes (of the largest measured node count <= N), kappa (the measured comm phase "
                "over the run's own probe's ring time: < 1 where DDP hides part of the all-reduce behind backward, "
                "> 1 where its buckets pay the latency again or compete with backward for the CPU) and the work "
                "(data + compute) from the runs of the largest measured node count below N (none below the smallest "
                "multi-rank count: kappa 1, the baseline's work), so a measured row is predicted without the "
                "training at that node count. 'fit': latency and bandwidth fitted by non-negative least squares to "
                "the measured comm phase of the multi-rank runs, the baseline's work. Held out: each model on the "
                "runs below the largest measured node count alone, predicting that count. Intervals (95%): probes, "
                "the t-based relative half-widths of the probes' predictions, of kappa and of the work (weighted by "
                "their shares of the step), of the baseline throughput and of a new measurement's scatter (the "
                "repeats' pooled relative spread, for as many repeats), in quadrature, cut at 0; fit, the 2.5-97.5 "
                "percentiles over 200 resamplings of one run per node count. Where probes, repeats or points are too "
                "few the forecast says what is missing instead of a number. Error = predicted / measured - 1.",
    "sharded forecast": "a sharded group's comm(P) sums its step's collectives as the records plan them: FSDP's "
                        "all-gathers (every group's parameters in forward, again in backward where resharded) and "
                        "reduce-scatters (its gradients) over every rank, each call k(P-1) latency + k(P-1)/P bytes "
                        "/ bandwidth (k = 1), with each collective's own latency and bandwidth from the probes; "
                        "HSDP's within a node (its shard group stays) plus the all-reduce (k = 2) of each rank's "
                        "shard across the nodes. The calls per step are the baseline's (with grad_accum_steps=0 they "
                        "fall as the nodes grow: an upper bound then)",
    "memory": "per rank, the largest over a run's ranks (the record's counts from the tensors' local shards: "
              "parameters, gradients, optimizer state), the peak (CUDA's peak allocated, or a CPU's peak resident "
              "set), repeats averaged. Predicted from the baseline: " + ASSUMPTION + ". The 95% interval of the peak: "
              "t over the baseline's repeats. Fits: the smallest node count whose state (and whose peak's upper "
              "bound) is within the device's memory (--device-memory, default the measured device's)",
    **REASONS,
    "cost": "epoch time = samples per epoch (steps per epoch x global batch) / throughput; node-hours = nodes x "
            "epoch time / 3600 (GPU-hours = ranks x epoch time / 3600, on GPUs); marginal value of a step up = "
            "(throughput_b - throughput_a) / (N_b - N_a) / (throughput_base / N_base); the knee is the node count "
            f"beyond which the marginal value falls below {COST_FRACTION:.0%}",
}


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
    busbw_gb_s: float | None = None  # the probes' bus bandwidth at their largest message (mean of repeats)
    transport: str | None = None
    fabric_flag: str = ""  # why this point's fabric looks wrong, if it does
    predicted_efficiency: float | None = None  # the probe forecast's, where it has an interval
    tokens_per_s: float | None = None  # a token model's throughput in tokens (samples/s x tokens per sample)
    parallel: str = "ddp"
    family: str = ""  # the experiment whatever its parallel mode and accumulation: what "Parallel modes compared" pairs
    accumulation: str = "1"  # trainer.grad_accum_steps as configured
    state_bytes: float | None = None  # per rank (the largest rank's), mean of repeats
    peak_bytes: float | None = None
    threads: int = 0  # CPU threads per rank
    reason: str = ""  # why it loses efficiency (pipeline.collector.diagnosis), and the evidence
    evidence: str = ""
    implausible: str = ""  # an efficiency above the plausible, and its likely cause


@dataclass
class GroupAnalysis:
    group: str
    probes: Forecast  # the forecast from the fabric probes
    fit: Forecast  # the forecast fitted to the measured comm phase
    cost: CostView | None  # None for oversubscribed groups
    hosts: dict[int, str] = field(default_factory=dict)  # rank -> Slurm node name, at the largest node count
    memory: MemoryForecast | None = None


def group_label(key: GroupKey, code_version: bool = True) -> str:
    """The group as people read it: the model as they name it (its class and size), the dataset, the fixed batch
    and the rest, with a hash of the configs (no two groups share a label). Without the code version it names the
    experiment, which a regression check compares across collections: that one keeps the model's config name
    (key.model), so it reads the same for records written before models were labelled."""
    cfg = hashlib.sha1((key.model_config + key.dataset_config).encode()).hexdigest()[:6]
    batch_kind = "global" if key.scaling == "strong" else "per-rank"
    model = (key.model_label or key.model) if code_version else key.model
    # the parallel mode, accumulation and threads only where they are not the defaults, so older groups keep
    # their names
    parallel = "" if key.parallel == "ddp" else f" {key.parallel}"
    accumulation = "" if key.accumulation == "1" else f" accum {key.accumulation}"
    threads = f" {key.threads} thread{'s' if key.threads != 1 else ''}/rank" if key.threads else ""
    label = (f"{model}/{key.dataset}{parallel} {key.scaling} {batch_kind} batch {key.batch}{accumulation} "
             f"{key.precision} {key.optimizer} {key.tasks_per_node}/node{threads} {key.device} cfg {cfg}")
    if code_version:
        label += f" @{key.git_sha[:7]}"
    return label + (" [oversubscribed]" if key.oversubscribed else "")


def aggregate(runs: list[Run], diverged: list[Diverged] = (), predict_at: tuple[int, ...] = PREDICT_AT,
              device_bytes: int | None = None) -> tuple[list[Row], list[GroupAnalysis]]:
    """Rows per group and node count, and each group's analysis; `device_bytes`: the device memory the memory
    forecast fits to (None: the measured device's)."""
    rows, analyses = [], []
    medians = median_busbw(runs)
    ordered = sorted(runs, key=lambda r: (r.group, r.nodes))
    for key, members in groupby(ordered, key=lambda r: r.group):
        members = list(members)
        group_rows = _group_rows(key, members)
        flag_fabrics(group_rows, members, medians)
        diagnose(group_rows, members, [d for d in diverged if d.group == key])
        analysis = analyse(key, members, group_rows, predict_at)
        analysis.memory = forecast_memory(analysis.group, key.parallel, members, device_bytes)
        predicted = {p.nodes: p.predicted for p in analysis.probes.predictions}
        for row in group_rows:
            row.predicted_efficiency = predicted.get(row.nodes)
        rows += group_rows
        analyses.append(analysis)
    return rows, analyses


def analyse(key: GroupKey, members: list[Run], rows: list[Row], predict_at: tuple[int, ...]) -> GroupAnalysis:
    label = group_label(key)
    largest = max(members, key=lambda r: r.nodes)
    hosts = dict(largest.hosts)
    if key.oversubscribed:
        why = "oversubscribed runs: their timings do not model scaling"
        return GroupAnalysis(label, Forecast(label, "probes", missing=why), Forecast(label, "fit", missing=why), None,
                             hosts)
    base_row = rows[0]
    at_base = [r for r in members if r.nodes == base_row.nodes]
    first = members[0]
    base = Baseline(nodes=base_row.nodes, world_size=base_row.world_size,
                    work_s=[r.breakdown[0] + r.breakdown[1] for r in at_base],
                    tasks_per_node=base_row.world_size // base_row.nodes, strong=key.scaling == "strong",
                    global_batch=first.global_batch, per_rank_batch=first.global_batch // first.world_size,
                    gradient_bytes=first.gradient_bytes, collectives=first.collectives, kind=key.parallel,
                    throughputs=[r.throughput for r in at_base])
    measured = {r.nodes: r.efficiency for r in rows}
    rel = base_row.throughput_ci / base_row.throughput if base_row.throughput_ci is not None else None
    group = Group(label, base, members, measured, rel, predict_at)
    return GroupAnalysis(label, from_probes(group), from_fit(group),
                         cost_view(label, rows, epoch_samples([r.samples_per_epoch for r in at_base]),
                                   first.device_type == "cuda"), hosts)


def epoch_samples(known: list[int | None]) -> float | None:
    """The baseline's samples per epoch (their mean), unless a run's epoch length is unknown (a stream)."""
    return None if None in known else float(np.mean(known))


def median_busbw(runs: list[Run]) -> dict[int, float]:
    """The collection's median probe bus bandwidth at each world size."""
    by_world: dict[int, list[float]] = {}
    for r in runs:
        if r.probe is not None:
            by_world.setdefault(r.world_size, []).append(r.probe.busbw_gb_s)
    return {w: float(np.median(v)) for w, v in by_world.items()}


def flag_fabrics(rows: list[Row], members: list[Run], medians: dict[int, float]) -> None:
    """Each row's probes summed up, and flagged when NCCL fell back to sockets across nodes, or when their bus
    bandwidth is far below the collection's median at the same world size."""
    for row in rows:
        probes = [r.probe for r in members if r.nodes == row.nodes and r.probe is not None]
        if not probes:
            continue
        row.busbw_gb_s = float(np.mean([p.busbw_gb_s for p in probes]))
        row.transport = "/".join(sorted({f"{p.backend}:{p.transport}" for p in probes}))
        flags = []
        if row.nodes > 1 and any(p.backend == "nccl" and p.transport and "sockets" in p.transport for p in probes):
            flags.append("NCCL fell back to TCP sockets between nodes (no InfiniBand used)")
        if row.busbw_gb_s < SLOW_FABRIC * medians[row.world_size]:
            flags.append(f"busbw {row.busbw_gb_s:.3g} GB/s is below {SLOW_FABRIC:.0%} of the collection's median "
                         f"({medians[row.world_size]:.3g} GB/s) at {row.world_size} ranks")
        row.fabric_flag = "; ".join(flags)


def _group_rows(key: GroupKey, members: list[Run]) -> list[Row]:
    label, experiment, oversubscribed = group_label(key), group_label(key, code_version=False), key.oversubscribed
    rows = []
    for nodes, point in groupby(members, key=lambda r: r.nodes):
        point = list(point)
        thr, thr_ci = mean_ci([r.throughput for r in point])
        tokens = point[0].tokens_per_sample
        breakdown = tuple(float(np.mean([r.breakdown[i] for r in point])) for i in range(3))
        step = sum(breakdown)
        worst = max(point, key=lambda r: r.skew)
        held = [r.memory for r in point if r.memory is not None]
        peaks = [m.peak_bytes for m in held if m.peak_bytes is not None]
        rows.append(Row(group=label, experiment=experiment, scaling=key.scaling, nodes=nodes,
                        world_size=point[0].world_size, runs=len(point), oversubscribed=oversubscribed,
                        throughput=thr, throughput_ci=thr_ci, throughput_per_rank=thr / point[0].world_size,
                        baseline_nodes=None, speedup=None, efficiency=None, efficiency_ci=None, step_time_s=step,
                        share_data=breakdown[0] / step if step else 0.0,
                        share_compute=breakdown[1] / step if step else 0.0,
                        share_comm=breakdown[2] / step if step and point[0].world_size > 1 else 0.0,
                        breakdown_s=breakdown,
                        skew=float(np.mean([r.skew for r in point])), straggler_host=worst.slowest_host,
                        straggler_rank=worst.slowest_rank, tokens_per_s=thr * tokens if tokens else None,
                        parallel=key.parallel, family=group_label(key._replace(parallel="ddp", accumulation="1")),
                        accumulation=key.accumulation,
                        state_bytes=float(np.mean([m.state_bytes for m in held])) if held else None,
                        peak_bytes=float(np.mean(peaks)) if peaks else None, threads=key.threads))
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
