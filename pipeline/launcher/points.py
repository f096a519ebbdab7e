"""Sweep points on the launch side, in named steps: type and check a point's config (`prepare_run`), ask Slurm
once per distinct allocation whether it would take it (`check_allocations`), then freeze every point into its
folder and start them (`start`): the Slurm ones submitted, one job array per distinct allocation, then the local
ones run here one after another. `python -m pipeline.launch` takes these steps for a single point, the sweep
launcher (`pipeline.launcher.sweep`) for every point of a sweep, and `status --resubmit-failed` for the points it
resubmits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shlex
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from pipeline.badnodes import bad_nodes_or_empty, read_bad_nodes
from pipeline.config import ConfigError, RunConfig
from pipeline.containers import start_for
from pipeline.launcher.local import RunFailed, run_local, simulated_slurm_env, sweep_threads
from pipeline.launcher.manifest import add_skipped, add_submissions, read_manifest
from pipeline.launcher.overlap import overlapped
from pipeline.launcher.slurm import allocation, group_by_allocation, preflight, submit, write_dry_run
from pipeline.launcher.status import RESUBMITTABLE, PointStatus, exclusion_stops
from pipeline.point import PlannedPoint, check_folder, check_job_name, freeze_point, git_info, prepare_run
from pipeline.rundir import BAD_NODES_NAME, POINT_NAME, RECORD_NAME, Point, diverged_at, rank_log_path
from pipeline.runlock import Claim, claim, exclusive
from pipeline.slurm import DEFAULT_MAX_ARRAY, excluded

log = logging.getLogger("pipeline.launch")
DRY_RUN_NAME = "dry_run.txt"  # local debug mode's dry run: the processes it would have started
RESUBMIT_LOCK = ".resubmit.lock"  # in the sweep folder


def check_allocations(points: list[PlannedPoint], sweep_dir: Path) -> dict[int, str]:
    """Would Slurm accept them? One `sbatch --test-only` per distinct allocation (dry runs are not asked: they
    also work where no cluster is reachable), kept off the nodes the sweep avoids; the allocations are asked at
    once (overlapped). Returns the reason for each point it would not."""
    slurm = [p for p in points if p.run.cluster.kind == "slurm" and not p.run.dry_run]
    avoid = sweep_avoids(sweep_dir) if slurm else ()
    # the arrays as they will be submitted (split at MaxArraySize), each allocation asked about once, for its
    # first (largest) array
    groups = group_by_allocation(slurm)
    first = {}  # allocation -> its first array
    for group in groups:
        first.setdefault(allocation(group[0].run), group)
    answers = overlapped(lambda group: preflight(group, sweep_dir, "pipeline-preflight", avoid), first.values())
    left_out = f" (the sweep leaves out {', '.join(avoid)}: {sweep_dir / BAD_NODES_NAME})" if avoid else ""
    refusals = {key: answer + left_out for key, answer in zip(first, answers) if answer}
    problems = {}
    for group in groups:
        refusal = refusals.get(allocation(group[0].run))
        if refusal:
            problems.update({p.index: refusal for p in group})
    return problems


def sweep_avoids(sweep_dir: Path) -> tuple[str, ...]:
    """The Slurm nodes on the sweep's bad-node list, which every submission into it leaves out (cluster.exclude
    adds the user's own). A list that cannot be read is said, and avoids nothing."""
    try:
        return tuple(read_bad_nodes(sweep_dir).slurm_nodes())
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read (%s): no node on it is left out", sweep_dir / BAD_NODES_NAME, e)
        return ()


def start(points: list[PlannedPoint], sweep_dir: Path) -> None:
    """Claim every point's folder (locked and checked before anything is written: ConfigError if one cannot be
    used), freeze every point, submit the Slurm ones (one job array per distinct allocation), then run the local
    ones here (run_local_points)."""
    with contextlib.ExitStack() as held:
        claims = claim_folders(points, sweep_dir, held)
        frozen = freeze_points(points, sweep_dir, claims)
        slurm = [p for p in points if p.run.cluster.kind == "slurm"]
        submit_points(slurm, sweep_dir)
        for p in slurm:
            claims[p.index].lock.release()  # the job's rank 0 takes it when the job starts (runlock.lock_for_job)
        run_local_points([(p, point) for p, point in zip(points, frozen) if p.run.cluster.kind == "local"], claims)


def freeze_points(points: list[PlannedPoint], sweep_dir: Path, claims: dict[int, Claim]) -> list[Point]:
    """Every point's point.json, each written durably (fsynced, file and folder), several at once (overlapped: a
    durable write mostly waits for the disk)."""
    git_info()  # asked once, before the threads that all want it
    return overlapped(lambda p: freeze_point(p, sweep_dir, p.run.cluster.kind, claims[p.index].resumes), points)


def run_local_points(local: list[tuple[PlannedPoint, Point]], claims: dict[int, Claim]) -> None:
    """Run local points one after another, each folder's lock released once its ranks have ended. A point that
    fails does not stop the next: a point alone raises its RunFailed; of several, each failure is logged as it
    happens and one RunFailed names them at the end (each message said once)."""
    failed = []
    threads = sweep_threads([p.run for p, _ in local if not p.run.dry_run])
    if threads and len(local) > 1:
        log.info("every point's ranks get %d CPU thread(s) (this machine's %d cores over the largest point's ranks), "
                 "so that the points differ in their ranks alone; OMP_NUM_THREADS sets another", threads,
                 os.cpu_count() or 1)
    for n, (p, point) in enumerate(local, start=1):
        try:
            run_here(p, point, position=f"point {n} of {len(local)}", threads=threads)
        except RunFailed as e:
            if len(local) == 1:
                raise
            log.error("point %d failed: %s", p.index, e)
            failed.append(p.index)
        finally:
            claims[p.index].lock.release()
    if failed:
        raise RunFailed(f"{len(failed)} of {len(local)} points failed: {', '.join(f'point {i}' for i in failed)} "
                        "(each one's message is above)")


def claim_folders(points: list[PlannedPoint], sweep_dir: Path, held: contextlib.ExitStack) -> dict[int, Claim]:
    """Every point's folder claimed (pipeline.runlock.claim) and held until `held` closes, then prepared for its run.
    If any is refused, ConfigError names every refusal, and no folder was changed."""
    allow_open_files(len(points))
    claims, refused, seen = {}, [], {}
    for p in points:
        key = "hydra.run.dir" if p.point_dir == sweep_dir else "hydra.sweep.dir"
        if p.point_dir in seen:
            refused.append(f"points #{seen[p.point_dir]} and #{p.index} would share the folder {p.point_dir}; "
                           "give each point its own (hydra.sweep.subdir)")
            continue
        seen[p.point_dir] = p.index
        try:
            claims[p.index] = claim(p.point_dir, p.config, p.run.overwrite, key)
        except ConfigError as e:
            refused.append(str(e) if len(points) == 1 else f"point #{p.index}: {e}")
            continue
        held.callback(claims[p.index].lock.release)
    if refused:
        raise ConfigError("\n".join(refused))
    for c in claims.values():
        c.prepare()
    return claims


def allow_open_files(locks: int) -> None:
    """A sweep holds a lock file open per point while it starts them: raise the soft limit on open files (often
    1,024) as far as the hard limit allows, for sweeps of thousands of points."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = locks + 256  # and what the launch itself opens
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))


def submit_points(points: list[PlannedPoint], sweep_dir: Path) -> list[tuple[int, str]]:
    """Submit points (already frozen) with one `sbatch` per distinct allocation (split at the cluster's
    MaxArraySize; the allocations at once: overlapped), adding each to the manifest; dry runs write the scripts
    instead. Returns (point, job id)."""
    avoid = sweep_avoids(sweep_dir) if points else ()
    dry = [p for p in points if p.run.dry_run]
    for group in group_by_allocation(dry, max_array=DEFAULT_MAX_ARRAY):
        script = write_dry_run(group, sweep_dir, job_name(sweep_dir, group), avoid)
        log.info("dry run, nothing submitted: %d point(s) would go as %s; its sbatch script: %s", len(group),
                 "one job" if len(group) == 1 else "one job array", script)
    real = [p for p in points if not p.run.dry_run]
    groups = group_by_allocation(real)
    done, failed = [], []
    for group, outcome in zip(groups, overlapped(lambda group: submitted(group, sweep_dir, avoid), groups)):
        if isinstance(outcome, Exception):
            failed.append(outcome)
            continue
        r = group[0].run
        left_out = excluded(r.cluster.exclude, avoid)
        add_submissions(sweep_dir, [(p.index, p.point_dir, p.overrides, p.run.nodes, job)
                                    for p, job in zip(group, outcome)], left_out)
        log.info("%d point(s) submitted as %s %s (%d node(s) x %d task(s) each%s)", len(group),
                 "Slurm job" if len(group) == 1 else "Slurm job array", outcome[0].split("_")[0], r.nodes,
                 r.cluster.tasks_per_node, f", leaving out {', '.join(left_out)}" if left_out else "")
        done += [(p.index, job) for p, job in zip(group, outcome)]
    if failed:
        raise failed[0]
    return done


def submitted(group: list[PlannedPoint], sweep_dir: Path, avoid: tuple[str, ...]) -> list[str] | Exception:
    """The group's job ids, or the error that stopped its submission, raised once the other groups' submissions
    (made at the same time) are in the manifest."""
    try:
        return submit(group, sweep_dir, job_name(sweep_dir, group), avoid)
    except Exception as e:
        return e


def job_name(sweep_dir: Path, group: list[PlannedPoint]) -> str:
    return f"pipeline-{sweep_dir.name}-{group[0].index}"


def run_here(p: PlannedPoint, point: Point, position: str, threads: int | None) -> None:
    """Local debug mode: the point's ranks as processes on this machine, with `threads` CPU threads each (None:
    their share of the cores); returns when they have ended. A dry run writes the processes it would start to
    POINT_DIR/dry_run.txt instead."""
    run = p.run
    if run.dry_run:
        write_local_dry_run(p, point)
        log.info("point %s: dry run, nothing started; what would run: %s", p.index, p.point_dir / DRY_RUN_NAME)
        return
    cores = os.cpu_count() or 1
    if run.world_size > cores:
        log.warning("%d processes on %d cores: this point is oversubscribed; its record says so, and its timings "
                    "do not measure scaling", run.world_size, cores)
    log.info("point %s: %d node(s) x %d task(s) in local debug mode, folder %s",
             p.index, run.nodes, run.cluster.tasks_per_node, p.point_dir)
    run_local_again_on_bad_nodes(p, point, position, threads)
    step = diverged_at(p.point_dir)
    if step is not None:  # the ranks stopped together and wrote the record: the run itself failed
        raise RunFailed(f"point {p.index} diverged: its loss was not finite at step {step}, so training stopped; "
                        f"the record says so (status diverged): {p.point_dir / RECORD_NAME}")
    log.info("record: %s", p.point_dir / RECORD_NAME)


def run_local_again_on_bad_nodes(p: PlannedPoint, point: Point, position: str, threads: int | None) -> None:
    """Run the point's ranks here. Local debug mode's nodes are all this machine, so under health.on_bad=exclude
    a bad node cannot be left out: the point is run again instead (what makes a simulated node slow is mostly
    load from elsewhere, which passes), at most health.max_resubmits times, each time said."""
    health = p.run.health
    for attempt in range(health.max_resubmits + 1):
        job_id = f"local-{point.run_id[:8]}" + (f"-{attempt}" if attempt else "")
        try:
            run_local(p.point_dir, p.run, job_id=job_id, position=position, threads=threads,
                      sweep_dir=Path(point.sweep_dir) if point.sweep_dir else p.point_dir)
            return
        except RunFailed:
            stopped = bad_nodes_or_empty(Path(point.sweep_dir) if point.sweep_dir else p.point_dir).of_job(job_id)
            if not stopped or health.on_bad != "exclude":
                raise
            if attempt == health.max_resubmits:
                raise RunFailed(f"point {p.index} stopped before training in each of its {attempt + 1} run(s): its "
                                f"health check found {'; '.join(f'{e.node}: {e.reason}' for e in stopped)} (local "
                                "debug mode cannot leave a simulated node out: they are all this machine)") from None
            log.warning("point %s stopped before training: its health check found %s; local debug mode's nodes "
                        "are all this machine, so none can be left out: running it again (%d of %d, "
                        "health.max_resubmits)", p.index, "; ".join(f"{e.node}: {e.reason}" for e in stopped),
                        attempt + 1, health.max_resubmits)


def write_local_dry_run(p: PlannedPoint, point: Point) -> None:
    tpn, job = p.run.cluster.tasks_per_node, f"local-{point.run_id[:8]}"
    lines = [f"# dry run: nothing was started. Local debug mode would start {p.run.world_size} process(es), one "
             "per rank, each with these variables (MASTER_ADDR=127.0.0.1 and a free MASTER_PORT besides):"]
    sweep_dir = Path(point.sweep_dir) if point.sweep_dir else p.point_dir
    python = start_for([p.run], sweep_dir, name="local").python_text if p.run.cluster.container.image else \
        shlex.quote(sys.executable)
    for node in range(p.run.nodes):
        for local in range(tpn):
            env = simulated_slurm_env(job, p.run.nodes, tpn, node, local)
            lines.append(" ".join(f"{k}={v}" for k, v in env.items()) +
                         f" {python} -m pipeline.worker {shlex.quote(str(p.point_dir))}"
                         f" > {shlex.quote(str(rank_log_path(p.point_dir, node, node * tpn + local)))}")
    (p.point_dir / DRY_RUN_NAME).write_text("\n".join(lines) + "\n")


def plan_from_hydra(run: RunConfig) -> tuple[PlannedPoint, Path]:
    """A single run's point (no -m): the folder Hydra made for it, which is also its sweep folder."""
    hc = HydraConfig.get()
    check_job_name(str(hc.job.name))
    point_dir = check_folder("hydra.run.dir", Path(hc.runtime.output_dir), str(hc.run.dir))
    return PlannedPoint(index=0, overrides=list(hc.overrides.task), run=run, point_dir=point_dir), point_dir


def resubmit_failed(sweep_dir: Path, statuses: list[PointStatus], include_diverged: bool = False
                    ) -> list[tuple[int, str]]:
    """Resubmit the points that ended without a usable record (and, if asked, those that diverged), from their
    frozen point.json, after the checks a launch makes (the config typed and checked, the dataset's files, Slurm
    asked once per distinct allocation); the ones with identical allocations go as one job array. Returns (point,
    job id)."""
    wanted = RESUBMITTABLE | ({"diverged"} if include_diverged else set())
    planned = []
    for s in statuses:
        if s.state not in wanted or s.dir is None or not (s.dir / POINT_NAME).exists():
            continue
        try:
            point = Point.read(s.dir)
        except (OSError, ValueError) as e:
            print(f"point {s.point}: not resubmitted, its {POINT_NAME} cannot be read: {e}", file=sys.stderr)
            continue
        try:
            planned.append(PlannedPoint(s.point, point.overrides, prepare_run(point.config), s.dir))
        except ConfigError as e:
            print(f"point {s.point}: not resubmitted, its config does not pass the launch's checks: {e}",
                  file=sys.stderr)
    problems = check_allocations(planned, sweep_dir)
    for index, problem in problems.items():
        print(f"point {index}: not resubmitted, Slurm rejects it: {problem}", file=sys.stderr)
    return submit_points([p for p in planned if p.index not in problems], sweep_dir)


def resubmit_without_bad_nodes(sweep_dir: Path, statuses: list[PointStatus]) -> list[str]:
    """Each point whose last job stopped before training for a bad node (health.on_bad=exclude), resubmitted
    without the sweep's bad nodes, at most health.max_resubmits times; one that Slurm cannot place without them is
    not resubmitted and says why (the manifest keeps the reason, and --resubmit-failed tries again). Returns what
    was done, in words. Called by `status`, `status --wait` and the launch's wait=true."""
    said = []
    with exclusive(sweep_dir / RESUBMIT_LOCK):  # two `status` calls at once must not both resubmit a point
        manifest, bad = read_manifest(sweep_dir), read_bad_nodes(sweep_dir)
        planned, stops = [], {}
        for s in statuses:
            entry = manifest.points.get(s.point)
            if s.state != "bad node" or entry is None or entry.jobs[-1].job_id != s.job_id or entry.skipped:
                continue  # resubmitted meanwhile, or already found impossible to place
            try:
                run = prepare_run(Point.read(s.dir).config)
            except (OSError, ValueError) as e:  # ConfigError among them
                said.append(f"point {s.point}: not resubmitted, its {POINT_NAME} does not pass the launch's "
                            f"checks: {e}")
                continue
            stops[s.point] = exclusion_stops(entry, bad)
            if run.health.on_bad == "exclude" and stops[s.point] <= run.health.max_resubmits:
                planned.append(PlannedPoint(s.point, entry.overrides, run, s.dir))
        avoid = ", ".join(sweep_avoids(sweep_dir))
        problems = check_allocations(planned, sweep_dir)
        for index, problem in problems.items():
            add_skipped(sweep_dir, index, manifest.points[index].overrides, f"Slurm cannot place it: {problem}")
            said.append(f"point {index}: not resubmitted: Slurm cannot place it: {problem}")
        allowed = {p.index: p.run.health.max_resubmits for p in planned}
        for point, job in submit_points([p for p in planned if p.index not in problems], sweep_dir):
            said.append(f"point {point}: its job {manifest.points[point].jobs[-1].job_id} stopped before training "
                        f"for a bad node; resubmitted without {avoid} as job {job} ({stops[point]} of "
                        f"{allowed[point]} resubmissions, health.max_resubmits)")
    return said
