"""Where a sweep stands: its manifest reconciled with Slurm (squeue for live jobs, sacct for their history) and
the result records; waiting for a sweep, and resubmitting the points that ended without a record."""

from __future__ import annotations

from collections import Counter
import sys
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from pipeline.badnodes import read_bad_nodes
from pipeline.launcher.logs import first_failed_log
from pipeline.launcher.local import RunFailed
from pipeline.launcher.manifest import read_manifest
from pipeline.rundir import BAD_NODES_NAME, RECORD_NAME, BadNodes, ManifestPoint, Point, Progress
from pipeline.slurm import job_states

LIVE = {"PENDING": "pending", "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
        "SUSPENDED": "running", "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued", "REQUEUE_FED": "requeued",
        "RESIZING": "running", "SIGNALING": "running", "STAGE_OUT": "running"}
FINAL = {"FAILED": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed",
         "DEADLINE": "timed out", "TIMEOUT": "timed out", "PREEMPTED": "preempted", "CANCELLED": "cancelled",
         "REQUEUED": "requeued", "COMPLETED": "failed"}  # COMPLETED without a record: the job ran but wrote none
# "bad record": a record that cannot be used (unreadable, truncated, impossible values) is no result; "bad node": the
# job stopped before training, its health check having found a bad node (health.on_bad=exclude)
RESUBMITTABLE = {"failed", "timed out", "preempted", "cancelled", "never started", "bad record", "bad node"}
# what a usable record says; a diverged run is resubmitted only when asked, a pruned trial (a search's) never
RECORDED = ("completed", "diverged", "pruned", "incomplete")
ENDED = RESUBMITTABLE | set(RECORDED)


@dataclass
class PointStatus:
    point: int
    nodes: int | None
    job_id: str | None
    state: str
    detail: str
    dir: Path | None
    failed_log: Path | None = None  # for a point that ended without a record: the rank that failed first

    @property
    def has_record(self) -> bool:
        """A usable record: the point completed or diverged."""
        return self.state in RECORDED


def record_state(folder: Path) -> tuple[str | None, str]:
    """What a point's record says, and why: (None, "") without one; "completed", "diverged" (with its reason),
    "incomplete" (trained, but its weights not written: why) or "bad record" (with what is wrong with it)."""
    # imported here: the collector's reader brings numpy (pipeline.allreduce), which a launch imports this module
    # without needing, unless a built-in dataset's check brings it
    from pipeline.collector.records import Diverged, Problem, Pruned, read_record

    path = folder / RECORD_NAME
    if not (path.exists() or path.is_symlink()):
        return None, ""
    rec = read_record(str(path))
    if isinstance(rec, (Diverged, Pruned)):
        return ("diverged" if isinstance(rec, Diverged) else "pruned"), rec.reason
    if isinstance(rec, Problem):
        return "bad record", rec.reason
    if rec.status == "incomplete":
        return "incomplete", rec.missing.get("weights", "")
    return "completed", ""


def classify(job_id: str | None, record: str | None, live: str | None, history: list[str]) -> tuple[str, str]:
    """A point's state from its record's (record_state) and its job's live state and history."""
    requeues = sum(s in ("REQUEUED", "PREEMPTED") for s in history[:-1]) if history else 0
    note = f"requeued {requeues}x" if requeues else ""
    if record == "completed":
        return "completed", note
    if job_id is None:
        return record or "never started", ""
    if live in LIVE:  # a job resubmitted for a bad or diverged record: what it does now
        state = "requeued" if live == "PENDING" and requeues else LIVE[live]
        return state, note
    if record:
        return record, note
    if history:
        last = history[-1]
        return FINAL.get(last, last.lower()), note or ("ended without a record" if last == "COMPLETED" else "")
    if live:
        return FINAL.get(live, live.lower()), note
    return "never started", "Slurm does not know this job"


def sweep_status(sweep_dir: Path) -> list[PointStatus]:
    sweep_dir = Path(sweep_dir)
    points = read_manifest(sweep_dir).points
    try:
        bad = read_bad_nodes(sweep_dir)
    except (OSError, ValueError) as e:
        print(f"pipeline.status: {sweep_dir / BAD_NODES_NAME} cannot be read ({e}): no point is shown as stopped "
              "for a bad node", file=sys.stderr)
        bad = BadNodes()
    job_of = {p: (e.jobs[-1].job_id if e.jobs else None) for p, e in points.items()}
    live, history = job_states([j for j in job_of.values() if j])
    out = []
    for p, entry in sorted(points.items()):
        folder = sweep_dir / entry.dir if entry.dir else None
        job = job_of[p]
        record, why = record_state(folder) if folder is not None else (None, "")
        state, detail = classify(job, record, live.get(job), history.get(job, []))
        if state == record:
            detail = ", ".join(filter(None, [detail, why]))
        if state in RESUBMITTABLE and bad.of_job(job):
            state, detail = "bad node", bad_node_detail(entry, bad, folder)
        elif entry.skipped and not job:
            detail = entry.skipped
        elif exclusion_stops(entry, bad):  # an earlier job of the point stopped for a bad node: said
            stopped = sorted({e.node for j in entry.jobs for e in bad.of_job(j.job_id)})
            detail = ", ".join(filter(None, [detail, f"resubmitted {exclusion_stops(entry, bad)}x without "
                                                     f"{', '.join(stopped)} (bad node)"]))
        failed_log = first_failed_log(folder) if folder and state in RESUBMITTABLE else None
        if state == "running" and folder is not None:
            detail = ", ".join(filter(None, [detail, progress_text(folder)]))
        if failed_log is not None:
            detail = ", ".join(filter(None, [detail, f"rank log {failed_log.name}"]))
        out.append(PointStatus(p, entry.nodes, job, state, detail, folder, failed_log))
    return out


def exclusion_stops(entry: ManifestPoint, bad: BadNodes) -> int:
    """How many of a point's jobs stopped before training for a bad node."""
    return sum(1 for job in entry.jobs if bad.of_job(job.job_id))


def resubmissions_allowed(folder: Path | None) -> int | None:
    """The point's health.max_resubmits, from its frozen config (None where it cannot be read)."""
    try:
        return int(Point.read(folder).config["health"]["max_resubmits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bad_node_detail(entry: ManifestPoint, bad: BadNodes, folder: Path | None) -> str:
    """Which nodes the point's last job found bad and why, and where its resubmission stands."""
    said = "; ".join(f"{e.node}: {e.reason}" for e in bad.of_job(entry.jobs[-1].job_id))
    stops, allowed = exclusion_stops(entry, bad), resubmissions_allowed(folder)
    if allowed is not None and stops > allowed:
        said += f"; stopped for bad nodes {stops} times, health.max_resubmits={allowed} spent: not resubmitted"
    elif entry.skipped:
        said += f"; not resubmitted: {entry.skipped}"
    return said


def progress_text(point_dir: Path) -> str:
    """Rank 0's last reported position (POINT_DIR/progress.json), e.g. 'step 400/1000, 5120 samples/s, ETA 12 s'."""
    p = Progress.latest(point_dir)
    if p is None:
        return ""
    return f"step {p.step}/{p.total_steps}, {p.samples_per_s:.0f} samples/s, ETA {p.eta_s:.0f} s"


def format_table(statuses: list[PointStatus]) -> str:
    rows = [("point", "nodes", "job", "state", "detail")]
    rows += [(str(s.point), str(s.nodes or "-"), s.job_id or "-", s.state, s.detail) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in rows)


def summary_line(statuses: list[PointStatus]) -> str:
    counts = Counter(s.state for s in statuses)
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def progress_line(statuses: list[PointStatus]) -> str:
    """Counts of points by state, then each running point's step and speed."""
    running = [f"point {s.point}: {s.detail}" for s in statuses if s.state == "running" and s.detail]
    return "; ".join([summary_line(statuses), *running])


# resubmits the points whose job stopped for a bad node, and says what it did (launcher.points, which submits: this
# module only reads, so that `status` need not import Hydra and submitit where nothing is resubmitted)
Resubmit = Callable[[Path, list[PointStatus]], list[str]]


def check_completed(sweep_dir: Path, statuses: list[PointStatus]) -> None:
    """After waiting (wait=true): RunFailed naming every point that ended without completing, so that the launch's
    exit status says what its points did."""
    unfinished = [s for s in statuses if s.state != "completed"]
    if unfinished:
        named = "; ".join(f"point {s.point}: {s.state}" + (f" ({s.detail})" if s.detail else "") for s in unfinished)
        raise RunFailed(f"{len(unfinished)} of {len(statuses)} point(s) did not complete: {named[:1500]}; "
                        f"python -m pipeline.status {sweep_dir} says more")


def wait_for_sweep(sweep_dir: Path, resubmit: Resubmit, poll_s: float = 5.0, out=sys.stderr) -> list[PointStatus]:
    """Block until every point has ended, resubmitting the points whose job stopped for a bad node on the way
    (health.on_bad=exclude; each resubmission said). On a terminal one status line is rewritten in place;
    otherwise (a Slurm log file, a pipe) a plain timestamped line is printed whenever it changes."""
    tty, last = out.isatty(), None
    while True:
        statuses = sweep_status(sweep_dir)
        said = resubmit(sweep_dir, statuses) if any(s.state == "bad node" for s in statuses) else []
        if said:
            print(("\n" if tty else "") + "\n".join(said), file=out, flush=True)
            statuses = sweep_status(sweep_dir)
        text = f"{sweep_dir.name}: {progress_line(statuses)}"
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        done = all(s.state in ENDED for s in statuses)
        if tty:
            print(f"\r\033[K{line}", end="\n" if done else "", file=out, flush=True)
        elif text != last:
            print(line, file=out, flush=True)
            last = text
        if done:
            return statuses
        time.sleep(poll_s)

