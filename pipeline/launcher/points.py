"""Sweep points on the launch side, in named steps: type and check a point's config (`prepare_run`), ask Slurm
once per distinct allocation whether it would take it (`check_allocations`), then freeze every point into its
folder and start them (`start`): the Slurm ones submitted, one job array per distinct allocation, then the local
ones run here one after another. `python -m pipeline.launch` takes these steps for a single point, the sweep
launcher (`pipeline.launcher.sweep`) for every point of a sweep, and `status --resubmit-failed` for the points it
resubmits.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import resource
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from hydra.errors import HydraException
from hydra.utils import get_class
from omegaconf import DictConfig

from pipeline.config import ConfigError, RunConfig, abspath_dataset_root, parse_run_config, register_configs, to_plain
from pipeline.launcher.local import RunFailed, run_local, simulated_slurm_env
from pipeline.launcher.manifest import add_submissions
from pipeline.launcher.rundir_lock import Claim, claim, keep_until_exit
from pipeline.launcher.slurm import (DEFAULT_MAX_ARRAY, allocation, check_script_text, check_slurm_values,
                                     group_by_allocation, max_array_size, preflight, submit, write_dry_run)
from pipeline.rundir import RECORD_NAME, GitInfo, Point, diverged_at, rank_log_path, utc_now

log = logging.getLogger("pipeline.launch")
DRY_RUN_NAME = "dry_run.txt"  # local debug mode's dry run: the processes it would have started


@dataclass
class PlannedPoint:
    """A point whose config is typed and checked, with its place in the sweep and its folder."""

    index: int  # its number in the sweep (Hydra's job number): its folder's name by default, its manifest key
    overrides: list[str]
    run: RunConfig
    point_dir: Path


def prepare_run(cfg: DictConfig | dict) -> RunConfig:
    """Type and check one point's config, the built-in datasets' files included (a user's `_target_`s have had
    their modules found, without being imported). Raises ConfigError naming the key."""
    run = parse_run_config(cfg)
    abspath_dataset_root(run)
    if not isinstance(run.dataset, dict):  # a built-in dataset: constructing it checks its files, importing no torch
        fields = {k: v for k, v in vars(run.dataset).items() if k != "_target_"}
        get_class(run.dataset._target_)(**fields, split="train")
    if run.cluster.kind == "slurm":
        check_slurm_values(run)
    return run


def check_folder(key: str, path: Path) -> Path:
    check_script_text(key, str(path))
    return path


def check_allocations(points: list[PlannedPoint], sweep_dir: Path) -> dict[int, str]:
    """Would Slurm accept them? One `sbatch --test-only` per distinct allocation (dry runs are not asked: they
    also work where no cluster is reachable). Returns the reason for each point it would not."""
    problems, asked = {}, {}
    slurm = [p for p in points if p.run.cluster.kind == "slurm" and not p.run.dry_run]
    # the arrays as they will be submitted (split at MaxArraySize), each allocation asked about once, for its
    # first (largest) array
    for group in group_by_allocation(slurm, max_array=max_array_size() if slurm else DEFAULT_MAX_ARRAY):
        key = allocation(group[0].run)
        if key not in asked:
            asked[key] = preflight(group, sweep_dir, job_name="pipeline-preflight")
        problems.update({p.index: asked[key] for p in group if asked[key]})
    return problems


@functools.cache
def git_info(path: Path = Path(__file__).resolve().parent) -> GitInfo:
    """The commit the pipeline's code is at, and whether its work tree has changes (None outside git); asked
    once per launch, however many points it has."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return GitInfo(sha=sha, dirty=bool(status) if status is not None else None)


def freeze_point(p: PlannedPoint, sweep_dir: Path, launch_mode: str, run_id: str | None = None) -> Point:
    """POINT_DIR/point.json: the resolved config and where it came from, which every rank reads; the run id is
    new unless this point continues an earlier launch's run (`run_id`)."""
    point = Point(run_id=run_id or uuid.uuid4().hex, sweep_id=sweep_dir.name, point=p.index, overrides=p.overrides,
                  launch_mode=launch_mode, launched_at=utc_now(), launch_host=platform.node(), launch_argv=sys.argv,
                  git=git_info(), config=to_plain(p.run), sweep_dir=str(sweep_dir))
    p.point_dir.mkdir(parents=True, exist_ok=True)
    point.write(p.point_dir)
    return point


def start(points: list[PlannedPoint], sweep_dir: Path) -> None:
    """Claim every point's folder (locked and checked before anything is written: ConfigError if one cannot be
    used), freeze every point, submit the Slurm ones (one job array per distinct allocation), then run the local
    ones here (run_local_points)."""
    with contextlib.ExitStack() as held:
        claims = claim_folders(points, sweep_dir, held)
        frozen = [freeze_point(p, sweep_dir, p.run.cluster.kind, claims[p.index].resumes) for p in points]
        slurm = [p for p in points if p.run.cluster.kind == "slurm"]
        submit_points(slurm, sweep_dir)
        for p in slurm:
            claims[p.index].lock.release()  # the job's rank 0 takes it when the job starts (rundir_lock.lock_for_job)
        run_local_points([(p, point) for p, point in zip(points, frozen) if p.run.cluster.kind == "local"], claims)


def run_local_points(local: list[tuple[PlannedPoint, Point]], claims: dict[int, Claim]) -> None:
    """Run local points one after another, each folder's lock released once its ranks have ended. A point that
    fails does not stop the next: a point alone raises its RunFailed; of several, each failure is logged as it
    happens and one RunFailed names them at the end (each message said once)."""
    failed = []
    for n, (p, point) in enumerate(local, start=1):
        try:
            run_here(p, point, position=f"point {n} of {len(local)}")
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
    """Every point's folder claimed (rundir_lock.claim) and held until `held` closes, then prepared for its run.
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
            claims[p.index] = claim(p.point_dir, to_plain(p.run), p.run.overwrite, key)
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
    MaxArraySize), adding each to the manifest; dry runs write the scripts instead. Returns (point, job id)."""
    dry = [p for p in points if p.run.dry_run]
    for group in group_by_allocation(dry, max_array=DEFAULT_MAX_ARRAY):
        script = write_dry_run(group, sweep_dir, job_name(sweep_dir, group))
        log.info("dry run, nothing submitted: %d point(s) would go as %s; its sbatch script: %s", len(group),
                 "one job" if len(group) == 1 else "one job array", script)
    real = [p for p in points if not p.run.dry_run]
    done = []
    for group in group_by_allocation(real, max_array=max_array_size() if real else DEFAULT_MAX_ARRAY):
        job_ids = submit(group, sweep_dir, job_name(sweep_dir, group))
        add_submissions(sweep_dir, [(p.index, p.point_dir, p.overrides, p.run.nodes, job)
                                    for p, job in zip(group, job_ids)])
        r = group[0].run
        log.info("%d point(s) submitted as %s %s (%d node(s) x %d task(s) each)", len(group),
                 "Slurm job" if len(group) == 1 else "Slurm job array", job_ids[0].split("_")[0], r.nodes,
                 r.cluster.tasks_per_node)
        done += [(p.index, job) for p, job in zip(group, job_ids)]
    return done


def job_name(sweep_dir: Path, group: list[PlannedPoint]) -> str:
    return f"pipeline-{sweep_dir.name}-{group[0].index}"


def run_here(p: PlannedPoint, point: Point, position: str) -> None:
    """Local debug mode: the point's ranks as processes on this machine; returns when they have ended. A dry
    run writes the processes it would start to POINT_DIR/dry_run.txt instead."""
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
    run_local(p.point_dir, run, job_id=f"local-{point.run_id[:8]}", position=position)
    step = diverged_at(p.point_dir)
    if step is not None:  # the ranks stopped together and wrote the record: the run itself failed
        raise RunFailed(f"point {p.index} diverged: its loss was not finite at step {step}, so training stopped; "
                        f"the record says so (status diverged): {p.point_dir / RECORD_NAME}")
    log.info("record: %s", p.point_dir / RECORD_NAME)


def write_local_dry_run(p: PlannedPoint, point: Point) -> None:
    tpn, job = p.run.cluster.tasks_per_node, f"local-{point.run_id[:8]}"
    lines = [f"# dry run: nothing was started. Local debug mode would start {p.run.world_size} process(es), one "
             "per rank, each with these variables (MASTER_ADDR=127.0.0.1 and a free MASTER_PORT besides):"]
    for node in range(p.run.nodes):
        for local in range(tpn):
            env = simulated_slurm_env(job, p.run.nodes, tpn, node, local)
            lines.append(" ".join(f"{k}={v}" for k, v in env.items()) +
                         f" {sys.executable} -m pipeline.worker {p.point_dir}"
                         f" > {rank_log_path(p.point_dir, node, node * tpn + local)}")
    (p.point_dir / DRY_RUN_NAME).write_text("\n".join(lines) + "\n")


def plan_from_hydra(run: RunConfig) -> tuple[PlannedPoint, Path]:
    """A single run's point (no -m): the folder Hydra made for it, which is also its sweep folder."""
    hc = HydraConfig.get()
    point_dir = check_folder("hydra.run.dir", Path(hc.runtime.output_dir))
    return PlannedPoint(index=0, overrides=list(hc.overrides.task), run=run, point_dir=point_dir), point_dir


def freeze_from_overrides(overrides: list[str], launch_mode: str) -> Path:
    """Compose the config from Hydra overrides (Hydra's compose API: no Hydra run, so no folder or log of its
    own), type and check it, and freeze it into the folder `hydra.run.dir` names. What rank 0 does when the
    worker is started without a launch (torchrun). Returns the point's folder; raises ConfigError."""
    register_configs()
    setup_globals()  # Hydra's resolvers, e.g. ${now:...} in hydra.run.dir
    try:
        with initialize_config_module(config_module="pipeline.conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except HydraException as e:  # an unknown key or group option, a wrong type: Hydra names it
        raise ConfigError(str(e)) from None
    HydraConfig.instance().set_config(cfg)
    run = prepare_run(cfg)
    point_dir = check_folder("hydra.run.dir", Path(cfg.hydra.run.dir).absolute())
    folder = claim(point_dir, to_plain(run), run.overwrite, "hydra.run.dir")
    folder.prepare()
    keep_until_exit(folder.lock)  # this process (rank 0) runs the point: the folder is its until it exits
    freeze_point(PlannedPoint(index=0, overrides=overrides, run=run, point_dir=point_dir), point_dir,
                 launch_mode=launch_mode, run_id=folder.resumes)
    return point_dir
