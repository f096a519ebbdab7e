"""Slurm through submitit: every point of a sweep is its own job, with the allocation its config asks for; points
whose allocations are identical (every sbatch value) go out as one job array, one task per point, by one
`sbatch` call (split where the array would pass the cluster's MaxArraySize).

`sbatch_parameters` is the one mapping from config to sbatch options; submitit renders them (its own
whitelisted, quoted `#SBATCH` lines). Under health.on_bad=exclude the script ends by resubmitting its point
without the bad nodes its health check found (`heal_lines`). The values that reach the script are checked when
the config is typed (pipeline.slurm), since a newline in a quoted `#SBATCH` value would still start a new shell
line; `cluster.setup` is the one place for raw shell. What Slurm's own commands say (the array limit, a
test-only submission) is pipeline.slurm's too. Nothing here imports torch: it runs on login nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import sys
import uuid
from pathlib import Path
from typing import Protocol

import submitit

from pipeline.config import RunConfig
from pipeline.containers import USER_LINE, start_for
from pipeline.rundir import LOG_DIR, REQUEUE_MARK, SBATCH_NAME, SRUN_LOG_PATTERN, SUBMITIT_DIR
from pipeline.slurm import DEFAULT_MAX_ARRAY, excluded, max_array_size, would_accept
from pipeline.worker import TrainingJob

SIGNAL_DELAY_S = 90  # Slurm sends the preemption / time-limit signal this long before the end
ARRAY_LOGS = ".array-logs"  # SWEEP_DIR/.array-logs/<array>/<task> -> the task's POINT_DIR/logs


def sbatch_parameters(run: RunConfig, job_name: str, log_dir: Path, avoid: tuple[str, ...] = ()) -> dict:
    """submitit's SlurmExecutor parameters for one point (its allocation, requeue on preemption, fail fast,
    per-rank logs in `log_dir`), kept off cluster.exclude's nodes and the nodes in `avoid` (the sweep's bad-node
    list)."""
    c = run.cluster
    params = {
        "job_name": job_name,
        "nodes": run.nodes,
        "ntasks_per_node": c.tasks_per_node,
        "time": c.time,
        "signal_delay_s": SIGNAL_DELAY_S,
        "setup": list(c.setup),
        # one failing rank ends the whole step instead of leaving the others waiting in a collective; each rank's
        # stdout and stderr go to POINT_DIR/logs/node{N}-rank{R}.log, appended to across requeues
        "srun_args": ["--kill-on-bad-exit=1", "--open-mode=append", f"--output={log_dir}/{SRUN_LOG_PATTERN}"],
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True, **c.sbatch_extra},
    }
    optional = {"partition": c.partition, "account": c.account, "qos": c.qos, "cpus_per_task": c.cpus_per_task,
                "mem": c.mem, "constraint": c.constraint, "gpus_per_node": c.gpus_per_node or None,
                "exclusive": True if c.exclusive else None,
                "exclude": ",".join(excluded(c.exclude, avoid)) or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


class _ScriptWriter(submitit.SlurmExecutor):
    """submitit's executor, used only to write the script: it does not ask for `srun` on PATH (submitit's own
    check for a cluster), so a dry run works where no Slurm is installed."""

    @classmethod
    def affinity(cls) -> int:
        return 1


class SlurmPoint(Protocol):
    """What this module needs of a point (points.PlannedPoint has it): its typed config, its number in the sweep
    and its folder."""

    index: int
    run: RunConfig
    point_dir: Path


def allocation(run: RunConfig, avoid: tuple[str, ...] = ()) -> str:
    """Everything of a point's sbatch script but its name and folders: points with equal allocations share an
    array."""
    return json.dumps({**sbatch_parameters(run, job_name="", log_dir=Path(), avoid=avoid),
                       "container": dataclasses.asdict(run.cluster.container)}, sort_keys=True, default=str)


def group_by_allocation(points: list[SlurmPoint], max_array: int | None = None) -> list[list[SlurmPoint]]:
    """Points with identical allocations together, in sweep order, at most `max_array` to a group (None: the
    cluster's MaxArraySize, asked only where some allocation has several points; one point alone is a plain job,
    whatever the size). The nodes a sweep avoids are the same for all of its points, so they split no group."""
    groups: dict[str, list[SlurmPoint]] = {}
    for p in points:
        groups.setdefault(allocation(p.run), []).append(p)
    if max_array is None:
        max_array = max_array_size() if any(len(g) > 1 for g in groups.values()) else DEFAULT_MAX_ARRAY
    return [g[i:i + max_array] for g in groups.values() for i in range(0, len(g), max_array)]


def _executor(group: list[SlurmPoint], sweep_dir: Path, job_name: str, avoid: tuple[str, ...] = (),
              kind=submitit.SlurmExecutor):
    """One point: its own job, submitit's files in POINT_DIR/submitit, its ranks' logs in POINT_DIR/logs. Several:
    a job array, submitit's files in SWEEP_DIR/submitit, each task's logs reached through
    SWEEP_DIR/.array-logs/<array>/<task id> (srun's %a), a link to that task's POINT_DIR/logs."""
    first = group[0]
    if len(group) == 1:
        folder, log_dir = first.point_dir / SUBMITIT_DIR, first.point_dir / LOG_DIR
    else:
        folder, log_dir = sweep_dir / SUBMITIT_DIR, sweep_dir / ARRAY_LOGS / uuid.uuid4().hex[:12]
    params = sbatch_parameters(first.run, job_name, log_dir / "%a" if len(group) > 1 else log_dir, avoid)
    container = first.run.cluster.container.image is not None
    if container:  # the ranks' Python through the runtime; srun's own options for pyxis
        start = start_for([p.run for p in group], sweep_dir, name=container_name(sweep_dir, first.run))
        params["srun_args"] += start.srun_args
        if first.run.cluster.container.runtime == "charliecloud":
            params["setup"] = [*params["setup"], USER_LINE]
    executor = kind(folder=folder, max_num_timeout=3, python=start.python_text if container else None)
    executor.update_parameters(**params)
    if len(group) > 1:
        executor.update_parameters(array_parallelism=first.run.cluster.array_parallelism or len(group))
    task_logs = f'{shlex.quote(str(log_dir))}/"$SLURM_ARRAY_TASK_ID"' if len(group) > 1 else \
        shlex.quote(str(log_dir))
    lines = host_lines(sweep_dir, requeue=task_logs if container else None,
                       heal=any(p.run.health.on_bad == "exclude" for p in group))
    if lines:
        executor.update_parameters(teardown=lines)
    return executor, log_dir


def container_name(sweep_dir: Path, run: RunConfig) -> str:
    """pyxis's name for a sweep's container of an image: a requeued job, back on a node that has it, reuses it
    instead of importing the image again; another sweep, or another image, never does."""
    digest = hashlib.sha256(f"{Path(sweep_dir).resolve()}\0{run.cluster.container.image}".encode()).hexdigest()
    return f"pipeline-{digest[:12]}"


def host_lines(sweep_dir: Path, requeue: str | None, heal: bool) -> list[str]:
    """The batch script's last lines, on the host once the ranks' step has ended, then the step's exit status as
    the script's: with `requeue` (the task's logs folder, as shell text), the job is requeued where its rank 0
    left this job's and restart's mark there (a rank in a container stopped to be continued: it has no scontrol
    to requeue; the step's status cannot say it, srun having stopped the slower ranks); with `heal`, the job
    resubmits its point without a bad node its health check found (pipeline.launcher.heal, with nobody
    watching)."""
    if not (requeue or heal):
        return []
    mark = REQUEUE_MARK.format(job="$SLURM_JOB_ID", restart="${SLURM_RESTART_COUNT:-0}")
    return ["step_status=$?",
            *([f'mark={requeue}/"{mark}"',
               'if [ -e "$mark" ]; then rm -f "$mark"; scontrol requeue "$SLURM_JOB_ID"; fi'] if requeue else []),
            *([f"{shlex.quote(sys.executable)} -m pipeline.launcher.heal {shlex.quote(str(sweep_dir))} || true"]
              if heal else []),
            'exit "$step_status"']


def render_sbatch(group: list[SlurmPoint], sweep_dir: Path, job_name: str, avoid: tuple[str, ...] = ()) -> str:
    """The exact script submitit submits for these points (a job array for several; the job-specific paths keep
    Slurm's %j, %A and %a patterns)."""
    executor, _ = _executor(group, sweep_dir, job_name, avoid, kind=_ScriptWriter)
    if len(group) > 1:
        executor.parameters["map_count"] = len(group)  # as submitit sets it for an array
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def write_dry_run(group: list[SlurmPoint], sweep_dir: Path, job_name: str, avoid: tuple[str, ...] = ()) -> Path:
    """The script that would be submitted: POINT_DIR/job.sbatch for one point, SWEEP_DIR/array-<first
    point>.sbatch for an array."""
    path = (group[0].point_dir / SBATCH_NAME if len(group) == 1 else
            sweep_dir / f"array-{group[0].index}-{group[-1].index}.sbatch")
    path.write_text(render_sbatch(group, sweep_dir, job_name, avoid))
    return path


def preflight(group: list[SlurmPoint], sweep_dir: Path, job_name: str, avoid: tuple[str, ...] = ()) -> str | None:
    """Ask Slurm whether it would accept these points' job or array (`sbatch --test-only`); the reason if not."""
    return would_accept(render_sbatch(group, sweep_dir, job_name, avoid))


def submit(group: list[SlurmPoint], sweep_dir: Path, job_name: str, avoid: tuple[str, ...] = ()) -> list[str]:
    """Submit the points with one `sbatch` call: a job, or a job array with a task per point. Returns each
    point's Slurm job id ("123", or "123_4" for task 4 of array 123)."""
    executor, log_dir = _executor(group, sweep_dir, job_name, avoid)
    if len(group) > 1:
        log_dir.mkdir(parents=True, exist_ok=True)
    for task, p in enumerate(group):
        (p.point_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
        if len(group) > 1:  # srun writes the task's logs through this link, into its own point's folder
            (log_dir / str(task)).symlink_to(os.path.relpath(p.point_dir / LOG_DIR, log_dir))
    with executor.batch():
        jobs = [executor.submit(TrainingJob(), str(p.point_dir)) for p in group]
    return [job.job_id for job in jobs]


def submit_search(run: RunConfig, search_dir: Path, workers: int, dry_run: bool = False) -> list[str] | Path:
    """A search's workers (pipeline.search.worker.SearchWorker) as one job array of `workers` tasks, each with the
    allocation `run` asks for. The worker runs on the batch step (no srun: its trials are the job's steps), so
    submitit's files and its log are in SEARCH_DIR/submitit. A dry run writes the script, SEARCH_DIR/workers.sbatch,
    and returns its path."""
    from pipeline.search.worker import SearchWorker

    kind = _ScriptWriter if dry_run else submitit.SlurmExecutor
    executor = kind(folder=search_dir / SUBMITIT_DIR, max_num_timeout=3)
    params = sbatch_parameters(run, f"pipeline-search-{search_dir.name}", search_dir / LOG_DIR)
    del params["srun_args"]  # the trials' steps set their own (pipeline.search.worker.srun_command)
    executor.update_parameters(**params, use_srun=False, array_parallelism=workers)
    if dry_run:
        executor.parameters["map_count"] = workers
        path = search_dir / "workers.sbatch"
        path.write_text(executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run"))
        return path
    jobs = executor.map_array(SearchWorker(), [str(search_dir)] * workers, list(range(workers)))
    return [job.job_id for job in jobs]
