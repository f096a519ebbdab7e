"""The launch of a search (`python -m pipeline.launch search=optuna ...`), in named steps: check the search (its
space, objectives and directions, and that Optuna is installed) before anything is written, claim the folder,
write search.json, create the study, then start the workers: on Slurm one job array of search.workers tasks, each
with the point's allocation (with `nodes` in the space, the largest), and return; in local debug mode the
workers as processes here, waited for. Imports no torch.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from pipeline.config import ConfigError, RunConfig
from pipeline.objective import INTERMEDIATE, auto_direction
from pipeline.point import PlannedPoint
from pipeline.rundir import STUDY_JOURNAL_NAME, WORKERS_DIR, SearchParam, SearchPlan, WorkerState
from pipeline.runlock import claim
from pipeline.search.space import Param, parse_space

log = logging.getLogger("pipeline.launch")
MIN_OPTUNA = (4, 2)  # the journal file's lock with a grace period (a killed worker's lock is taken over)


def launch_search(point: PlannedPoint, search_dir: Path) -> None:
    plan = plan_search(point, search_dir)
    run = point.run
    held = claim(search_dir, point.config, run.overwrite, "hydra.run.dir")
    try:
        held.prepare()
        plan.write(search_dir)
        from pipeline.search.study import open_study

        open_study(plan, run.search, create=True)
    finally:
        held.lock.release()
    log.info("search: %d trial(s) by %d worker(s); study %s in %s; follow with: python -m pipeline.status %s",
             run.search.trials, run.search.workers, plan.study, plan.storage, search_dir)
    if plan.launch_mode == "local":
        run_local_workers(search_dir, run.search.workers, largest(run, parse_space(run.search.space,
                                                                                  point.config)).world_size)
    else:
        submit_workers(point, search_dir)


def plan_search(point: PlannedPoint, search_dir: Path) -> SearchPlan:
    """Everything a worker needs, checked: ConfigError (exit 2, before anything is written) names the key."""
    run = point.run
    check_optuna()
    space = parse_space(run.search.space, point.config)
    nodes = next((p for p in space if p.name == "nodes"), None)
    whole = nodes is None or (nodes.type == "int" and nodes.low >= 1) or (
        nodes.type == "categorical" and all(isinstance(c, int) and c >= 1 for c in nodes.choices))
    if not whole:
        raise ConfigError("search.space.nodes must be whole node counts of at least 1, e.g. int(interval(1, 4)) or "
                          "choice(1, 2, 4)")
    objectives = run.objective if isinstance(run.objective, list) else [run.objective]
    check_pruner(run, objectives, space)
    check_grid(run, space)
    storage = run.search.storage or str(search_dir / STUDY_JOURNAL_NAME)  # Optuna's journal file: no server
    return SearchPlan(config=point.config, overrides=point.overrides,
                      space=[SearchParam(**vars(p)) for p in space], objectives=objectives,
                      directions=directions(run, objectives), storage=storage,
                      study=run.search.study or search_dir.name, launch_mode=run.cluster.kind)


def check_optuna() -> None:
    try:
        version = importlib.metadata.version("optuna")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("search=optuna needs Optuna, which is not installed: pip install 'pipeline[search]'") \
            from None
    if tuple(int(x) for x in version.split(".")[:2]) < MIN_OPTUNA:
        raise ConfigError(f"search=optuna needs optuna>={'.'.join(map(str, MIN_OPTUNA))} (its journal lock's grace "
                          f"period), found {version} (hydra-optuna-sweeper pins optuna<3: install it with --no-deps): "
                          "pip install 'pipeline[search]'")


def check_grid(run: RunConfig, space: list[Param]) -> None:
    """search.sampler=grid tries every combination once: each parameter a choice or a whole-number range, and as
    many trials as combinations at most (Optuna's grid stops the study when it is exhausted)."""
    if run.search.sampler != "grid":
        return
    intervals = [p.name for p in space if p.grid() is None]
    if intervals:
        raise ConfigError(f"search.sampler=grid needs every parameter to be choice(...) or range(...); "
                          f"search.space.{intervals[0]} is an interval: give it as choice(...) or choose another "
                          "sampler")
    points = 1
    for p in space:
        points *= len(p.grid())
    if run.search.trials > points:
        raise ConfigError(f"search.trials={run.search.trials} is more than the grid's {points} point(s) "
                          f"(search.sampler=grid tries each once): set search.trials<={points}")


def check_pruner(run: RunConfig, objectives: list[str], space: list[Param]) -> None:
    """A pruner judges a trial by the objective's value at its evaluations during training: one objective that
    evaluations report, and evaluations during training (trainer.eval_every)."""
    pruner = run.search.pruner
    if pruner == "none":
        return
    if len(objectives) != 1 or objectives[0] not in INTERMEDIATE:
        raise ConfigError(f"search.pruner={pruner} judges a trial by its evaluations during training, so the "
                          f"objective must be one figure they report ({' or '.join(INTERMEDIATE)}); objective="
                          f"{','.join(objectives)}: set search.pruner=none, or objective={next(iter(INTERMEDIATE))}")
    if run.trainer.eval_every == 0 and not any(p.name == "trainer.eval_every" for p in space):
        raise ConfigError(f"search.pruner={pruner} needs evaluations during training to judge a trial by: set "
                          "trainer.eval_every (every this many steps; e.g. a fifth of the run's steps), or "
                          "search.pruner=none")


def directions(run: RunConfig, objectives: list[str]) -> list[str]:
    given = run.search.direction
    given = [given] * len(objectives) if isinstance(given, str) else list(given)
    if len(given) != len(objectives):
        raise ConfigError(f"search.direction={run.search.direction!r} gives {len(given)} direction(s) for "
                          f"{len(objectives)} objective(s) ({', '.join(objectives)})")
    provides = getattr(run.dataset, "provides", None)
    out = []
    for name, direction in zip(objectives, given):
        if direction == "auto":
            direction = auto_direction(name, provides)
            if direction is None:
                raise ConfigError(f"search.direction=auto cannot tell which way {name} is better for dataset."
                                  f"_target_={run.dataset['_target_']} (accuracy is maximised, perplexity and loss "
                                  "minimised): set search.direction=maximize or minimize")
        elif direction not in ("minimize", "maximize"):
            raise ConfigError(f"search.direction={direction!r} is not allowed; choose one of: auto, minimize, "
                              "maximize (or a list, one per objective)")
        out.append(direction)
    return out


def largest(run: RunConfig, space: list[Param]) -> RunConfig:
    """The worker's allocation: the point's, with as many nodes as the space's largest node count."""
    nodes = next((p for p in space if p.name == "nodes"), None)
    if nodes is None:
        return run
    return replace(run, nodes=int(max(nodes.choices) if nodes.type == "categorical" else nodes.high))


def run_local_workers(search_dir: Path, workers: int, ranks: int) -> None:
    """Local debug mode: the workers as processes of this launch, at once; returns when all have ended. The
    machine's cores are shared out among the workers' ranks (OMP_NUM_THREADS, unless the user set it): each trial
    alone would take them all, and two trials' threads spinning against each other ran 50x slower."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // (workers * ranks)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.search.worker", str(search_dir), str(k)], env=env)
             for k in range(workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        from pipeline.launcher.local import RunFailed

        raise RunFailed(f"search worker(s) {', '.join(str(k) for k, c in enumerate(codes) if c)} failed (exit codes "
                        f"{codes}); the study keeps what was told: python -m pipeline.status {search_dir}")


def submit_workers(point: PlannedPoint, search_dir: Path) -> list[str]:
    """One job array of search.workers tasks, each running a SearchWorker on its allocation's first node; each
    worker's job id is written to its folder before the job can start."""
    from pipeline.launcher.slurm import submit_search

    plan = SearchPlan.read(search_dir)
    from pipeline.search.study import params_of

    run = largest(point.run, params_of(plan))
    if point.run.dry_run:
        script = submit_search(run, search_dir, point.run.search.workers, dry_run=True)
        log.info("dry run, nothing submitted: the workers' sbatch script: %s", script)
        return []
    jobs = submit_search(run, search_dir, point.run.search.workers)
    for k, job in enumerate(jobs):
        folder = search_dir / WORKERS_DIR / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        WorkerState(worker=k, job_id=job, host=socket.gethostname(), pid=0).write(folder)
    log.info("%d search worker(s) submitted as Slurm job array %s (%d node(s) x %d task(s) each)", len(jobs),
             jobs[0].split("_")[0], run.nodes, run.cluster.tasks_per_node)
    return jobs
