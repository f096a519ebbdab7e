"""Reading result records for the collector (and status): every `result.json` under the given folders, each
reduced at once to the few figures the collector uses. A record that cannot be used is listed with the reason,
never dropped silently, and none can stop the reading: only regular files of a sane size are read (a FIFO, a link
to a device, a huge file are reported), finite numbers only, every field typed, every value one a run can have.
A diverged run's record is listed apart, with its reason."""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from pipeline.allreduce import Volume
from pipeline.config import target_name
from pipeline.result import Result
from pipeline.rundir import RECORD_NAME, SchemaError, parse_json, read_small, record_status

PARALLEL_FROM = 1000  # records; below this, starting worker processes costs more than it saves


class GroupKey(NamedTuple):
    """Everything that defines an experiment except the node count: runs with equal keys form one scaling group."""

    model: str
    model_config: str  # JSON, keys sorted
    dataset: str
    dataset_config: str  # JSON, keys sorted, without the dataset's root folder
    scaling: str
    batch: int  # the batch that stays fixed as nodes change: per rank in weak scaling, global in strong
    precision: str
    optimizer: str
    tasks_per_node: int
    device: str
    git_sha: str
    oversubscribed: bool  # such runs form groups of their own
    # how people name the model (its innermost class and size, pipeline.job.build.model_label): what the report
    # shows; derived from the model's config, so it splits no group
    model_label: str = ""
    parallel: str = "ddp"  # ddp | fsdp | hsdp (records from before: ddp)
    # trainer.grad_accum_steps as configured: "1", "4", or "auto" (picked per node count in strong scaling, where
    # the global batch, already in the key, stays fixed): the accumulation itself may differ within a group
    accumulation: str = "1"
    # CPU threads per rank: a rank's compute depends on them, so runs with other thread counts are no repeats
    threads: int = 0


@dataclass(frozen=True)
class Probe:
    """A run's fabric probe, reduced: the fitted ring model and the largest message's bus bandwidth."""

    latency_s: float | None
    bandwidth_bytes_s: float | None
    busbw_gb_s: float  # at the largest message probed
    transport: str | None
    backend: str
    # every collective probed, op -> (latency s per ring step, seconds per byte): the all-reduce over every rank, and
    # a sharded job's all-gather and reduce-scatter (and HSDP's all-reduce across replicas, which replaces the other)
    ops: tuple[tuple[str, tuple[float, float]], ...] = ()


@dataclass(frozen=True)
class NodeFigures:
    """One node's figures in a run's health check, reduced."""

    node: str
    gemm_gflops: float | None
    link_gb_s: float | None
    membw_gb_s: float | None
    flags: str  # why it was flagged ("" when it was not)


@dataclass(frozen=True)
class Run:
    """One record, reduced to what the collector uses."""

    path: str
    run_id: str
    group: GroupKey
    nodes: int
    world_size: int
    global_batch: int
    throughput: float  # samples/s
    breakdown: tuple[float, float, float]  # mean seconds per step: data, compute, comm
    skew: float  # slowest rank's median busy time / the median rank's
    slowest_rank: int
    slowest_host: str
    oversubscribed: bool
    gradient_bytes: int
    samples_per_epoch: int | None  # steps per epoch x global batch; None: a stream whose end the run did not reach
    device_type: str  # "cuda" or "cpu": GPU-hours are counted on GPUs
    probe: Probe | None  # the fabric probe of a multi-rank run (None before probes, or when disabled)
    hosts: tuple[tuple[int, str], ...]  # (rank, Slurm node name) of every rank
    tokens_per_sample: int | None = None  # a token model's: tokens/s = this x throughput
    # the step's collectives, (group, volume): planned from the record's parallel part (records from before: DDP's
    # all-reduce of the gradient over every rank)
    collectives: tuple[tuple[str, Volume], ...] = ()
    memory: MemoryPoint | None = None  # the record's per-rank memory (None in records from before)
    # what explains a slow run (defaults for records from before they were kept)
    threads: int = 0  # CPU threads per rank
    # the most loaded rank's threads x the job's processes on its machine / the machine's cores: above 1 the threads
    # oversubscribe the cores, which the record's `oversubscribed` (processes > cores) does not catch
    thread_load: float = 0.0
    thread_host: str = ""  # that rank's processes, threads and cores, in words
    step_spread: float = 1.0  # step time p95 / median: a run whose steps were held up now and then
    health: tuple[NodeFigures, ...] = ()  # the health check's nodes (a multi-node job's)
    simulated: bool = True  # local debug mode's nodes are this machine, not Slurm nodes


@dataclass(frozen=True)
class MemoryPoint:
    """A run's memory per rank: the largest over its ranks (FSDP's padding leaves ranks a few bytes apart)."""

    state_bytes: int
    sharded_bytes: int  # of the rank with the most state
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    peak_bytes: int | None
    peak_kind: str
    device_bytes: int | None  # the smallest over ranks
    shard_ranks: int


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str


@dataclass(frozen=True)
class Diverged(Problem):
    """The record of a run that diverged: not a scaling measurement, listed apart with its reason, and counted in
    its group's reasons (where its record can be typed)."""

    group: GroupKey | None = None
    nodes: int | None = None


@dataclass(frozen=True)
class Pruned(Problem):
    """The record of a search's trial that its pruner stopped early: fewer steps than its config asks, so no
    scaling measurement; listed apart (a search's report shows it in its study section)."""


def optimizer_name(cfg: dict) -> str:
    """The optimizer's name: its `_target_`'s class (sgd, adamw, lars); records written before the optimizer
    became a `_target_` name it as trainer.optimizer."""
    return target_name(cfg["optimizer"]) if "optimizer" in cfg else cfg["trainer"]["optimizer"]


def group_key(rec: Result) -> GroupKey:
    cfg = rec.config
    dataset_cfg = {k: v for k, v in cfg["dataset"].items() if k != "root"}
    return GroupKey(model=rec.model, model_config=json.dumps(cfg["model"], sort_keys=True), dataset=rec.dataset,
                    dataset_config=json.dumps(dataset_cfg, sort_keys=True), scaling=rec.scaling,
                    batch=rec.global_batch if rec.scaling == "strong" else rec.per_rank_batch,
                    precision=rec.precision, optimizer=optimizer_name(cfg), tasks_per_node=rec.tasks_per_node,
                    device=rec.device.name, git_sha=rec.provenance.git.sha or "unknown",
                    oversubscribed=rec.oversubscribed, model_label=rec.model_label or rec.model,
                    parallel=rec.parallel.kind if rec.parallel else "ddp", accumulation=accumulation(cfg),
                    threads=rec.ranks[0].host.threads if rec.ranks else 0)


def accumulation(cfg: dict) -> str:
    steps = cfg.get("trainer", {}).get("grad_accum_steps", 1)
    return "auto" if steps == 0 else str(steps)


def collectives(rec: Result) -> tuple[tuple[str, Volume], ...]:
    """The step's collectives as the record plans them; before records had them, DDP's one all-reduce."""
    if rec.parallel is None:
        return (("world", Volume("all_reduce", rec.world_size, 1, rec.gradient_bytes)),)
    return tuple((c.group, Volume(c.op, c.ranks, c.calls, c.bytes)) for c in rec.parallel.collectives)


def memory_point(rec: Result) -> MemoryPoint | None:
    held = [r.memory for r in rec.ranks if r.memory is not None]
    if len(held) != len(rec.ranks) or not held:
        return None
    most = max(held, key=lambda m: m.state_bytes)
    peaks = [m.peak_bytes for m in held if m.peak_bytes is not None]
    devices = [m.device_bytes for m in held if m.device_bytes is not None]
    return MemoryPoint(state_bytes=most.state_bytes, sharded_bytes=most.sharded_bytes,
                       parameter_bytes=max(m.parameter_bytes for m in held),
                       gradient_bytes=max(m.gradient_bytes for m in held),
                       optimizer_bytes=max(m.optimizer_bytes for m in held), peak_bytes=max(peaks) if peaks else None,
                       peak_kind=most.peak_kind, device_bytes=min(devices) if devices else None,
                       shard_ranks=rec.parallel.shard_ranks if rec.parallel else 1)


def _reduce(path: str, rec: Result) -> Run:
    ranks = rec.ranks
    busy = [r.timing.busy_time_median_s for r in ranks]
    slowest = max(range(len(busy)), key=busy.__getitem__)
    median = sorted(busy)[(len(busy) - 1) // 2]  # the lower median: a rank's own value
    b = rec.timing.breakdown_s
    return Run(path=path, run_id=rec.run_id, group=group_key(rec), nodes=rec.nodes, world_size=rec.world_size,
               global_batch=rec.global_batch, throughput=rec.timing.throughput_samples_per_s,
               breakdown=(b.data, b.compute, b.comm), skew=busy[slowest] / median if median > 0 else 1.0,
               slowest_rank=ranks[slowest].rank, slowest_host=ranks[slowest].node_name,
               oversubscribed=rec.oversubscribed, gradient_bytes=rec.gradient_bytes,
               samples_per_epoch=rec.steps_per_epoch * rec.global_batch if rec.steps_per_epoch else None,
               device_type=rec.device.type,
               probe=_probe(rec), hosts=tuple((r.rank, r.node_name) for r in ranks),
               tokens_per_sample=rec.tokens_per_sample, collectives=collectives(rec),
               memory=memory_point(rec), **_placement(rec))


def _placement(rec: Result) -> dict:
    """The threads, how loaded their cores were, the steps' spread and the health check's figures."""
    loaded = max(rec.ranks, key=lambda r: r.host.threads * r.host.processes_on_host / max(r.host.host_cores, 1))
    h = loaded.host
    step = rec.timing.step_time_s
    slurm = rec.provenance.slurm
    return {"threads": h.threads, "thread_load": h.threads * h.processes_on_host / max(h.host_cores, 1),
            "thread_host": f"{h.processes_on_host} rank(s) x {h.threads} thread(s) on {h.host_cores} core(s) of "
                           f"{h.hostname}",
            "step_spread": step.p95 / step.median if step is not None and step.median > 0 else 1.0,
            "health": tuple(NodeFigures(node=n.node, gemm_gflops=n.gemm_gflops, link_gb_s=n.link_gb_s,
                                        membw_gb_s=n.membw_gb_s, flags="; ".join(n.flags))
                            for n in (rec.health.nodes if rec.health else ())),
            "simulated": slurm is None or slurm.simulated}


def _probe(rec: Result) -> Probe | None:
    f = rec.fabric
    if f is None or not f.points:
        return None
    ops = {getattr(c, "op", "all_reduce"): (c.latency_us / 1e6, 1e-9 / c.bandwidth_gb_s)
           for c in [f, *f.collectives] if c.latency_us is not None and c.bandwidth_gb_s}
    return Probe(latency_s=f.latency_us / 1e6 if f.latency_us is not None else None,
                 bandwidth_bytes_s=f.bandwidth_gb_s * 1e9 if f.bandwidth_gb_s is not None else None,
                 busbw_gb_s=f.points[-1].busbw_gb_s, transport=f.transport, backend=f.backend,
                 ops=tuple(ops.items()))


def read_record(path: str) -> Result | Diverged | Pruned | Problem:
    """One record, typed and checked, or why it cannot be used."""
    try:
        data = parse_json(read_small(Path(path)))
    except OSError as e:  # missing, unreadable, not a regular file, too large
        return Problem(path, f"not read: {e.strerror or e}")
    except SchemaError as e:  # a NaN or Infinity, named
        return Problem(path, str(e))
    except ValueError as e:  # corrupt or truncated
        return Problem(path, f"not valid JSON ({type(e).__name__}: {e})")
    try:
        status = record_status(data)
        if status == "diverged":
            return diverged(path, data)
        if status == "pruned":
            return Pruned(path, f"pruned by the search's pruner after its evaluation at step "
                                f"{data.get('pruned_at_step', '?')}")
        rec = Result.from_json(data)  # SchemaError names a missing or mistyped field (or the wrong schema_version)
    except ValueError as e:
        return Problem(path, str(e))
    problem = impossible(rec)
    return Problem(path, problem) if problem else rec


def diverged(path: str, data: dict) -> Diverged:
    """A diverged run's record, with its group and node count where it can be typed (it may lack figures)."""
    reason = f"training diverged: a non-finite loss at step {data.get('diverged_at_step', '?')}"
    try:
        rec = Result.from_json(data)
        return Diverged(path, reason, group_key(rec), rec.nodes)
    except (ValueError, KeyError, TypeError):
        return Diverged(path, reason)


def impossible(rec: Result) -> str | None:
    """The first value no run can have (a record edited, or written by a broken worker), named with its field:
    the collector would divide by it or report it."""
    for name, value, least in (("nodes", rec.nodes, 1), ("tasks_per_node", rec.tasks_per_node, 1),
                               ("per_rank_batch", rec.per_rank_batch, 1), ("global_batch", rec.global_batch, 1),
                               ("steps_per_epoch", rec.steps_per_epoch or 1, 1), ("steps", rec.steps, 0),
                               ("timed_steps", rec.timing.timed_steps, 0), ("gradient_bytes", rec.gradient_bytes, 0)):
        if value < least:
            return f"{name}: {value} is impossible (at least {least})"
    if rec.world_size != rec.nodes * rec.tasks_per_node:
        return (f"world_size: {rec.world_size} is not nodes ({rec.nodes}) x tasks_per_node ({rec.tasks_per_node}) = "
                f"{rec.nodes * rec.tasks_per_node}")
    if len(rec.ranks) != rec.world_size:
        return f"ranks: {len(rec.ranks)} entries for world_size {rec.world_size}"
    throughput = rec.timing.throughput_samples_per_s
    if throughput is not None and throughput <= 0:
        return f"throughput_samples_per_s: {throughput} is impossible (> 0)"
    if _earliest(rec) >= 0:  # the common case, without naming every field (10,000 records are read in seconds)
        return None
    return next(f"{name}: {value} is negative, which no time is" for name, value in _times(rec) if value < 0)


def _earliest(rec: Result) -> float:
    """The smallest of a record's times."""
    timing = rec.timing
    times = [rec.wall_time_s, *(vars(timing.step_time_s).values() if timing.step_time_s else ()),
             *(vars(timing.breakdown_s).values() if timing.breakdown_s else ())]
    for r in rec.ranks:
        t = r.timing
        times += (t.step_time_median_s, t.busy_time_median_s, t.data_mean_s, t.compute_mean_s, t.comm_mean_s)
        if t.step_times_s:
            times.append(min(t.step_times_s))
    return min((t for t in (timing.timed_wall_s, *times) if t is not None), default=0.0)


def _times(rec: Result) -> Iterator[tuple[str, float]]:
    """(field, seconds) of every time in a record, to name the one that is wrong."""
    yield "wall_time_s", rec.wall_time_s
    for group in ("step_time_s", "breakdown_s"):
        if getattr(rec.timing, group) is not None:
            yield from ((f"{group}.{k}", v) for k, v in vars(getattr(rec.timing, group)).items())
    if rec.timing.timed_wall_s is not None:
        yield "timed_wall_s", rec.timing.timed_wall_s
    for i, r in enumerate(rec.ranks):
        t = r.timing
        if t.step_times_s and min(t.step_times_s) < 0:
            step = next(j for j, v in enumerate(t.step_times_s) if v < 0)
            yield f"ranks[{i}].step_times_s[{step}]", t.step_times_s[step]
        for name in ("step_time_median_s", "busy_time_median_s", "data_mean_s", "compute_mean_s", "comm_mean_s"):
            if getattr(t, name) is not None:
                yield f"ranks[{i}].{name}", getattr(t, name)


def read_one(path: str) -> Run | Problem:
    rec = read_record(path)
    if isinstance(rec, Problem):
        return rec
    if rec.timing.throughput_samples_per_s is None or rec.timing.breakdown_s is None:
        return Problem(path, "no timed steps (the run had no steps after warm-up)")
    try:
        return _reduce(path, rec)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # the config's fields, an empty rank list
        return Problem(path, f"malformed field ({type(e).__name__}: {e})")


def find_records(paths: list[Path]) -> list[str]:
    found: list[str] = []
    for p in paths:
        if p.is_file():
            found.append(str(p))
        elif p.is_dir():
            _scan(str(p), found)
    return sorted(set(found))


def _scan(folder: str, found: list[str]) -> None:
    """Every result.json below `folder` (os.scandir: twice as fast as os.walk on 10,000 folders)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name == RECORD_NAME:  # a folder of that name too: read, it is said why it is no record
                found.append(entry.path)
            if entry.is_dir(follow_symlinks=False):
                _scan(entry.path, found)


def _read_many(paths: list[str]) -> list[Run | Problem]:
    return [read_one(p) for p in paths]


def load_runs(paths: list[Path]) -> tuple[list[Run], list[Problem]]:
    """Every record under `paths`, or the reason it cannot be used. Large collections are parsed on every core."""
    files = find_records(paths)
    workers = min(os.cpu_count() or 1, 8)
    if len(files) < PARALLEL_FROM or workers == 1:
        results = _read_many(files)
    else:
        results: list = [None] * len(files)
        with ProcessPoolExecutor(workers) as pool:
            for i, part in enumerate(pool.map(_read_many, [files[i::workers] for i in range(workers)])):
                results[i::workers] = part  # back in file order, so "first" of two duplicates is stable
    runs, problems, seen = [], [], {}
    for r in results:
        if isinstance(r, Problem):
            problems.append(r)
        elif r.run_id in seen:
            problems.append(Problem(r.path, f"duplicate of {seen[r.run_id]} (same run_id), not counted twice"))
        else:
            seen[r.run_id] = r.path
            runs.append(r)
    return runs, problems
