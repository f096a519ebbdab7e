"""A point's run folder sent to its trackers after the fact (`pipeline.track sync`): for compute nodes without
internet (W&B offline, a tracker unreachable from the nodes), for a tracker that was down or slow during the run, and
for a run killed before its tracker had everything.

metrics.jsonl holds every report (the lines that stand after restarts: read_metric_rows); each tracker is sent the
(figure, step) pairs it does not hold, so a second sync sends nothing and no step is sent twice. The tracked run is
the one tracking.json names (MLflow: else the one tagged with the point's run id; W&B: the point's run id), so no
second run is made. A point that has ended (a record, a rank's failure, or neither and no one running it) ends its
runs in that state; one that runs now is left to its rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import TrackingConfig, parse_run_config
from pipeline.result import Result
from pipeline.rundir import LOG_DIR, RECORD_NAME, Point, parse_json, read_metric_rows, read_small, record_status
from pipeline.runlock import FolderInUse, RunLock
from pipeline.tracking.trackers import RunFacts, make_tracker, summary_figures


@dataclass(frozen=True)
class Ending:
    status: str  # the record's status, or "failed" (a rank's failure file), or "interrupted"
    figures: dict[str, float]


def ending(point_dir: Path) -> Ending:
    """How the point's run ended, from its folder."""
    try:
        raw = parse_json(read_small(point_dir / RECORD_NAME))
    except FileNotFoundError:
        failed = any((point_dir / LOG_DIR).glob("rank*.failed.json"))
        return Ending("failed" if failed else "interrupted", {})
    status = record_status(raw)
    try:
        record = Result.from_json(raw)
        return Ending(status, summary_figures(record))
    except ValueError:  # a record of another schema: its status still ends the run
        return Ending(status, {})


def sync_point(point_dir: Path, tracking: TrackingConfig | None = None) -> list[str]:
    """Send what the point's trackers lack (its own tracking=[...], or `tracking`); a line said per tracker.
    Raises OSError/ValueError for a folder that cannot be read, and the tracker's own errors."""
    point = Point.read(point_dir)
    tracking = tracking or parse_run_config(point.config).tracking
    if not tracking.names:
        return [f"{point_dir}: no tracker (its launch had no tracking=[...]; give one: --mlflow-uri)"]
    try:
        lock = RunLock(point_dir)
    except FolderInUse:
        return [f"{point_dir}: running now; its rank 0 sends its figures itself"]
    try:
        end = ending(point_dir)
        rows = read_metric_rows(point_dir)
        facts = RunFacts(point_dir=point_dir, point=point, starting=False, slurm={})
        said = []
        for name in tracking.names:
            tracker = make_tracker(name, tracking, point_dir)
            tracked = tracker.open(facts)
            held = tracker.present()
            missing = [(r.step, r.unix, {k: v for k, v in r.values.items()
                                         if v is not None and r.step not in held.get(k, ())}) for r in rows]
            missing = [m for m in missing if m[2]]
            tracker.log(missing)
            tracker.end(end.status, end.figures, [point_dir / RECORD_NAME, point_dir / LOG_DIR])
            sent = sum(len(values) for _, _, values in missing)
            said.append(f"{point_dir}: {name} run {tracked.run_id}: {sent} figure(s) of {len(rows)} report(s) sent "
                        f"({sum(len(r.values) for r in rows) - sent} held already); ended as {end.status}")
        return said
    finally:
        lock.release()


def point_dirs(path: Path) -> list[Path]:
    """The point folders at or under `path` (each holds point.json), in path order."""
    if (path / Point.FILE).is_file():
        return [path]
    return sorted(p.parent for p in path.rglob(Point.FILE))


def end_sweeps(points: list[Path], tracking: TrackingConfig | None = None) -> list[str]:
    """Each MLflow sweep among `points` gets its parent run FINISHED once every point of it has ended."""
    said, seen = [], set()
    for point_dir in points:
        point = Point.read(point_dir)
        config = tracking or parse_run_config(point.config).tracking
        facts = RunFacts(point_dir=point_dir, point=point, starting=False, slurm={})
        if config.mlflow is None or not facts.in_sweep or facts.sweep_dir in seen:
            continue
        seen.add(facts.sweep_dir)
        ended = all(ending(p).status != "interrupted" for p in point_dirs(facts.sweep_dir))
        parent = make_tracker("mlflow", config, point_dir).end_sweep(facts, done=ended)
        said.append(f"{facts.sweep_dir}: mlflow parent run {parent}: {'FINISHED' if ended else 'RUNNING'}")
    return said


def track_collection(paths: list[Path], out: Path) -> list[str]:
    """`collect --track`: the collection (its report, tables, forecast and plots: every file under `out`) logged to
    each collected sweep's tracker: MLflow's parent run of the sweep (a single run's own run; the parent FINISHED
    once every point has ended), and a W&B run of the sweep's group (job_type collect)."""
    said, seen, points = [], set(), [p for path in paths for p in point_dirs(path)]
    for point_dir in points:
        point = Point.read(point_dir)
        tracking = parse_run_config(point.config).tracking
        facts = RunFacts(point_dir=point_dir, point=point, starting=False, slurm={})
        if facts.sweep_dir in seen or not tracking.names:
            continue
        seen.add(facts.sweep_dir)
        for name in tracking.names:
            tracker = make_tracker(name, tracking, point_dir)
            where = tracker.log_collection(facts, out)
            said.append(f"{facts.sweep_dir}: the collection in {out} logged to {name} {where}")
    return said + end_sweeps(points)
