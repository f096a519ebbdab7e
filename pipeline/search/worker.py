"""One worker of a search (search=optuna), in named steps: ask the study for a trial, make it a point (its own
folder SEARCH_DIR/trials/<number>, frozen like any point), train it (on Slurm a job step, `srun`, over the first
`nodes` nodes of the worker's allocation; in local debug mode its ranks here), tell the study its objective from
the record, and ask again, until search.trials have ended. It never waits for another worker.

A worker whose job is preempted or requeued resumes the trial it was training (SEARCH_DIR/workers/<k>/worker.json
names it) from that trial's checkpoint: the trial's rank 0 checkpoints on the signal and requeues the job, as any
point's does. Runs on the allocation's first node (the batch step, not srun), or as a process of a local launch:

    python -m pipeline.search.worker SEARCH_DIR K
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from submitit.helpers import Checkpointable

from pipeline.config import ConfigError
from pipeline.launcher.logs import first_failed_log
from pipeline.objective import NoValue, value_of
from pipeline.point import PlannedPoint, freeze_point, prepare_run
from pipeline.rundir import (LOG_DIR, RECORD_NAME, SRUN_LOG_PATTERN, TRIALS_DIR, WORKERS_DIR, SearchPlan, TrialRef,
                             WorkerState, record_status, parse_json, read_small)
from pipeline.runlock import claim
from pipeline.search import study as studies
from pipeline.slurm import EXIT_REQUEUED, RESTART_COUNT_VAR, job_id_from_env, port_for_job

log = logging.getLogger("pipeline.search")


class Requeued(Exception):
    """The worker's job is ending (requeued after the trial's rank 0 checkpointed, cancelled, out of time): the
    trial is left running in the study, for the requeued job to resume (or, for a job that does not come back, for
    another worker to find dead and retry)."""


# set by SIGTERM, which Slurm sends the batch step when the job is requeued, cancelled or out of time
ENDING = threading.Event()


def work(search_dir: Path, me: int) -> None:
    search_dir = Path(search_dir)
    plan = SearchPlan.read(search_dir)
    settings = prepare_run(plan.config).search
    folder = search_dir / WORKERS_DIR / str(me)
    folder.mkdir(parents=True, exist_ok=True)
    job_id = job_id_from_env()
    study = studies.open_study(plan, settings, worker=me)
    state = resumed_state(folder, me, job_id)
    stop = start_heartbeat(folder, settings.heartbeat_s)
    try:
        while (trial := current_trial(study, state) or next_trial(study, plan, settings, search_dir, me, job_id)):
            state = state_with(folder, state, trial.number)
            try:
                tell(study, trial, train_trial(search_dir, plan, trial))
            except Requeued:
                log.warning("worker %d: its job is ending (requeued, cancelled or out of time) while training trial "
                            "%d, which its requeued job resumes from its checkpoint", me, trial.number)
                return
            state = state_with(folder, state, None)
            if ENDING.is_set():
                return
        log.info("worker %d: no trial left (search.trials=%d)", me, settings.trials)
    finally:
        stop.set()


def next_trial(study, plan: SearchPlan, settings, search_dir: Path, me: int, job_id: str | None):
    """The next trial to train, or None when none is left. With none left to ask for while another worker's trial
    may have lost its worker, this one waits (heartbeat by heartbeat) until that trial ends or is found dead and
    its retry enqueued, and takes the retry: were every worker gone, the retry would wait for a relaunch."""
    while not ENDING.is_set():
        trial = studies.ask(study, plan, settings, search_dir, me, job_id)
        if trial is not None or not studies.may_be_orphaned(study, search_dir, settings, me):
            return trial
        ENDING.wait(settings.heartbeat_s)
    return None


def resumed_state(folder: Path, me: int, job_id: str | None) -> WorkerState:
    """The worker's state as its last job left it (a trial it was training), now this job's."""
    try:
        earlier = WorkerState.read(folder)
    except (OSError, ValueError):
        earlier = None
    state = WorkerState(worker=me, job_id=job_id, host=socket.gethostname(), pid=os.getpid(),
                        trial=earlier.trial if earlier else None,
                        started_trials=earlier.started_trials if earlier else [])
    state.write(folder)
    return state


def state_with(folder: Path, state: WorkerState, trial: int | None) -> WorkerState:
    started = state.started_trials + ([trial] if trial is not None and trial not in state.started_trials else [])
    state = WorkerState(worker=state.worker, job_id=state.job_id, host=state.host, pid=state.pid, trial=trial,
                        started_trials=started)
    state.write(folder)
    return state


def current_trial(study, state: WorkerState):
    """The trial this worker was training when its job stopped (preempted, requeued), if the study still has it
    running: resumed from its checkpoint. One marked failed meanwhile (its worker looked dead) is left."""
    import optuna

    if state.trial is None:
        return None
    frozen = study.get_trials(deepcopy=False)[state.trial]
    if frozen.state != optuna.trial.TrialState.RUNNING:
        log.warning("trial %d, which this worker was training, is %s meanwhile: asking for another", state.trial,
                    frozen.state.name)
        return None
    log.info("resuming trial %d", state.trial)
    return optuna.Trial(study, frozen._trial_id)


def start_heartbeat(folder: Path, every_s: float) -> threading.Event:
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                studies.beat(folder)
            except OSError as e:
                log.warning("worker heartbeat not written: %s", e)
            stop.wait(every_s)

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()
    return stop


# ------------------------------------------------------------------------------------------- a trial
def trial_point(search_dir: Path, plan: SearchPlan, number: int, params: dict) -> PlannedPoint:
    """The trial as a point: the search's config with the trial's parameters set, typed and checked (ConfigError
    where they make no valid run), in SEARCH_DIR/trials/<number>."""
    config = copy.deepcopy(plan.config)
    config["search"] = None
    for name, value in params.items():
        node = config
        *parents, leaf = name.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    overrides = [*plan.overrides, *(f"{name}={value}" for name, value in params.items())]
    return PlannedPoint(number, overrides, prepare_run(config), search_dir / TRIALS_DIR / str(number))


def train_trial(search_dir: Path, plan: SearchPlan, trial) -> tuple[str, list[float] | None, str]:
    """Train the trial as a point (resumed where its folder has a checkpoint; its rank 0 reporting to the study,
    trial.json); returns (its state: complete, pruned or failed; its objective's values; why it failed)."""
    try:
        point = trial_point(search_dir, plan, trial.number, trial.params)
    except ConfigError as e:
        return "failed", None, f"its parameters make no valid run: {e}"
    trial.set_user_attr(studies.FOLDER_ATTR, str(point.point_dir.relative_to(search_dir)))
    record = point.point_dir / RECORD_NAME
    if not record.exists():
        point.point_dir.mkdir(parents=True, exist_ok=True)
        held = claim(point.point_dir, point.config, overwrite=False, key=f"trial {trial.number}'s folder")
        try:
            held.prepare()
            freeze_point(point, search_dir, plan.launch_mode, run_id=held.resumes)
            TrialRef(search_dir=str(search_dir.resolve()), number=trial.number,
                     starts=earlier_starts(point.point_dir) + 1).write(point.point_dir)
        finally:
            held.lock.release()
        failure = run_trial(point, plan.launch_mode)
        if failure is not None and not record.exists():
            return "failed", None, failure
    return outcome(point, plan)


def earlier_starts(point_dir: Path) -> int:
    """How many times the trial was started before (a requeued worker resumes it): its trial.json's count."""
    try:
        return TrialRef.read(point_dir).starts
    except (OSError, ValueError):
        return 0


def outcome(point: PlannedPoint, plan: SearchPlan) -> tuple[str, list[float] | None, str]:
    from pipeline.collector.records import Problem, read_record

    path = point.point_dir / RECORD_NAME
    try:
        status = record_status(parse_json(read_small(path)))
    except (OSError, ValueError) as e:
        return "failed", None, f"its record cannot be read: {e}"
    if status == "diverged":
        return "failed", None, "training diverged (a non-finite loss)"
    if status == "pruned":  # Optuna takes its last reported value
        return "pruned", None, ""
    rec = read_record(str(path))
    if isinstance(rec, Problem):
        return "failed", None, rec.reason
    try:
        return "complete", [value_of(rec, name) for name in plan.objectives], ""
    except NoValue as e:
        return "failed", None, str(e)


def tell(study, trial, result: tuple[str, list[float] | None, str]) -> None:
    import optuna

    state, values, why = result
    if why:
        trial.set_user_attr(studies.FAILURE_ATTR, why)
        log.warning("trial %d failed: %s", trial.number, why)
    states = {"complete": optuna.trial.TrialState.COMPLETE, "failed": optuna.trial.TrialState.FAIL,
              "pruned": optuna.trial.TrialState.PRUNED}
    refused = studies.tell(study, trial.number, states[state], values if state == "complete" else None)
    if refused:  # marked failed meanwhile by a worker that took this one for dead
        log.warning("trial %d could not be told %s: %s", trial.number, state, refused)
    elif not why:
        log.info("trial %d %s%s", trial.number, state, f": {values}" if values else "")


def run_trial(point: PlannedPoint, launch_mode: str) -> str | None:
    """Train the point's ranks; None when they ended well, else why not. Raises Requeued when its rank 0 requeued
    this worker's Slurm job (preemption, time limit)."""
    if launch_mode == "local":
        from pipeline.launcher.local import RunFailed, run_local

        try:
            run_local(point.point_dir, point.run, job_id=f"local-{os.getpid()}-{point.index}",
                      position=f"trial {point.index}")
            return None
        except RunFailed as e:
            return str(e)
    (point.point_dir / LOG_DIR).mkdir(exist_ok=True)  # srun cannot open its logs in a missing folder
    code = subprocess.call(srun_command(point), stdout=sys.stdout, stderr=sys.stderr)
    # a step ended by the job's end: Slurm signals the batch step at the same time, which may be told a moment later
    if code == EXIT_REQUEUED or ENDING.wait(timeout=5 if code in (128 + 15, 128 + 9, 15, 9) else 0):
        raise Requeued()
    if code == 0:
        return None
    failed = first_failed_log(point.point_dir)
    return f"its job step ended with exit code {code}" + (f"; the rank that failed first: {failed}" if failed else "")


def srun_command(point: PlannedPoint) -> list[str]:
    """The trial's job step: its nodes (the allocation's first `nodes`) x cluster.tasks_per_node ranks, as a
    point's job runs them (one failing rank ends the step; each rank's log appended to across requeues); the
    rendezvous on the step's first node, at a port of the step's own."""
    run = point.run
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()[:run.nodes]
    restarts = earlier_starts(point.point_dir) - 1  # the trial's, not the worker job's (SLURM_RESTART_COUNT)
    env = (f"ALL,MASTER_ADDR={hosts[0]},MASTER_PORT={port_for_job(f'{job_id_from_env()}-{point.index}')},"
           f"{RESTART_COUNT_VAR}={max(0, restarts)}")
    return ["srun", f"--nodes={run.nodes}", f"--ntasks={run.world_size}",
            f"--ntasks-per-node={run.cluster.tasks_per_node}",
            f"--nodelist={','.join(hosts)}", "--kill-on-bad-exit=1", "--open-mode=append", f"--export={env}",
            f"--output={point.point_dir / LOG_DIR / SRUN_LOG_PATTERN}", sys.executable, "-m", "pipeline.worker",
            str(point.point_dir)]


class SearchWorker(Checkpointable):
    """What submitit runs for each worker of a search: on the batch step (use_srun=False), once per job. The
    preemption signal goes to the trial's ranks (its job step), whose rank 0 checkpoints and requeues the job."""

    def __call__(self, search_dir: str, me: int) -> None:
        import signal

        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the trial's rank 0 requeues: not submitit's handler here
        signal.signal(signal.SIGTERM, lambda signum, frame: ENDING.set())
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                            format=f"%(asctime)s [search worker {me}] %(message)s")
        work(Path(search_dir), me)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s [search worker {argv[1]}] %(message)s")
    work(Path(argv[0]), int(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
