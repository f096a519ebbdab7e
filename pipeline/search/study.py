"""The study a search's workers share, through Optuna's own storages: its journal file in the search's folder
(JournalFileBackend: no server, a shared filesystem is enough) or a database URL the user gives.

Two ways a worker can die are handled here, both of which Optuna leaves to its user:
- the journal's lock file, left behind by a worker killed while holding it (Optuna #5921), is taken over once it
  has not been renewed for search.lock_grace_s (the lock's own `grace_period`);
- a trial whose worker died keeps Optuna's state RUNNING forever. A worker beats (SEARCH_DIR/workers/<k>/heartbeat);
  a trial whose worker has not beaten for search.stale_after_s, and whose Slurm job is no longer pending or
  running (a preempted job waits in the queue, to resume its trial), is marked FAIL and its parameters are enqueued
  again, at most search.max_retries times.

Asking for a trial, with the count of trials left, is done under an flock of SEARCH_DIR/.search.lock (released by
the kernel when its holder dies), so that K workers never start more than search.trials trials between them.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline.config import OptunaSearchConfig
from pipeline.objective import INTERMEDIATE
from pipeline.point import prepare_run
from pipeline.rundir import HEARTBEAT_NAME, WORKERS_DIR, SearchPlan, TrialRef, WorkerState
from pipeline.runlock import exclusive
from pipeline.search.space import Param

log = logging.getLogger("pipeline.search")
ASK_LOCK = ".search.lock"
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
         "RESIZING", "SIGNALING", "STAGE_OUT"}
# the user attributes a trial carries
WORKER_ATTR, JOB_ATTR, FAILURE_ATTR, RETRY_OF_ATTR, RETRIES_ATTR, RETRIED_ATTR, FOLDER_ATTR = (
    "worker", "job_id", "failure", "retry_of", "retries", "retried", "folder")


def storage_of(plan: SearchPlan, settings: OptunaSearchConfig):
    if plan.storage.startswith(("sqlite:", "mysql", "postgresql", "oracle", "mssql")):
        return optuna.storages.RDBStorage(plan.storage)
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(plan.storage, grace_period=settings.lock_grace_s)
    return optuna.storages.JournalStorage(JournalFileBackend(plan.storage, lock_obj=lock))


def sampler_of(settings: OptunaSearchConfig, worker: int, params: list[Param]):
    """The sampler by its name, seeded per worker (search.seed + the worker's number): workers with one seed would
    draw the same parameters. The grid's points are each tried once, whichever worker asks (Optuna's GridSampler
    skips the points running or done)."""
    s = optuna.samplers
    seed = None if settings.seed is None else settings.seed + worker
    if settings.sampler == "grid":
        return s.GridSampler({p.name: p.grid() for p in params}, seed=seed)
    return {"tpe": lambda: s.TPESampler(seed=seed, multivariate=True, constant_liar=True),
            "random": lambda: s.RandomSampler(seed=seed),
            "cmaes": lambda: s.CmaEsSampler(seed=seed),
            "gp": lambda: s.GPSampler(seed=seed),
            "qmc": lambda: s.QMCSampler(seed=seed),
            "nsgaii": lambda: s.NSGAIISampler(seed=seed)}[settings.sampler]()


def pruner_of(settings: OptunaSearchConfig):
    p = optuna.pruners
    return {"none": p.NopPruner, "median": lambda: p.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
            "percentile": lambda: p.PercentilePruner(25.0, n_startup_trials=2),
            "hyperband": p.HyperbandPruner, "successive_halving": p.SuccessiveHalvingPruner}[settings.pruner]()


def open_study(plan: SearchPlan, settings: OptunaSearchConfig, create: bool = False, worker: int = 0
               ) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = dict(study_name=plan.study, storage=storage_of(plan, settings),
                  sampler=sampler_of(settings, worker, params_of(plan)),
                  pruner=pruner_of(settings))
    if create:
        return optuna.create_study(directions=plan.directions, load_if_exists=True, **kwargs)
    return optuna.load_study(**kwargs)


class TrialJudge:
    """Rank 0 of a search's trial: each evaluation during training (trainer.eval_every) reported to the study as
    the trial's intermediate value at its step, and the study's pruner asked whether to stop there. The study is
    opened at the first evaluation; one that cannot be reached, or a trial marked ended meanwhile, prunes nothing
    (the trial trains on, and the log says why)."""

    def __init__(self, ref: TrialRef):
        self.ref, self.trial = ref, None

    def __call__(self, step: int, evaluation) -> bool:
        try:
            if self.trial is None:
                plan = SearchPlan.read(Path(self.ref.search_dir))
                self.figure = INTERMEDIATE.get(plan.objectives[0]) if len(plan.objectives) == 1 else None
                study = open_study(plan, prepare_run(plan.config).search)
                self.trial = optuna.Trial(study, study.get_trials(deepcopy=False)[self.ref.number]._trial_id)
            if self.figure is None:  # not the objective: nothing to judge it by (the launch refuses a pruner then)
                return False
            self.trial.report(getattr(evaluation, self.figure), step)
            return self.trial.should_prune()
        except Exception as e:  # the study is the search's, not the trial's: it trains on without it
            log.warning("trial %d: its evaluation at step %d was not reported to the study: %s: %s", self.ref.number,
                        step, type(e).__name__, e)
            return False


def params_of(plan: SearchPlan) -> list[Param]:
    return [Param(**{k: getattr(p, k) for k in ("name", "type", "low", "high", "log", "step", "choices")})
            for p in plan.space]


# ------------------------------------------------------------------------------------------- counting
def retried(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get(RETRIED_ATTR))


def ended(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards search.trials: complete, pruned, or failed (those failed with their worker and
    tried again are replaced by their retry)."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not retried(t))]


def taken(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials ended, running or waiting to be run: search.trials less this is what is left to ask for."""
    return len(ended(trials)) + sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)


# ------------------------------------------------------------------------------------- workers' lives
def beat(worker_dir: Path) -> None:
    (worker_dir / HEARTBEAT_NAME).touch()


def last_beat(worker_dir: Path) -> float | None:
    try:
        return (worker_dir / HEARTBEAT_NAME).stat().st_mtime
    except OSError:
        return None


def job_alive(job_id: str | None, host: str, pid: int) -> bool | None:
    """Whether a worker's job (Slurm's) or process (local debug mode's, on this host) still lives: True, False, or
    None where that cannot be told (no squeue here, another host's process)."""
    if job_id is None:
        if host != socket.gethostname():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie (its parent, the launch, has not waited for it yet) is dead
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # a job that has left Slurm's memory ("Invalid job id")
        return False if "Invalid job id" in out.stderr else None
    return bool(set(out.stdout.split()) & ALIVE)


def stale(study: optuna.Study, search_dir: Path, settings: OptunaSearchConfig, me: int) -> list[tuple[int, str]]:
    """The RUNNING trials of other workers that are dead: no heartbeat for stale_after_s, and their job gone (or,
    where that cannot be told, no heartbeat for twice as long). Returns (trial number, why)."""
    out, now = [], time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR)
        if worker is None or worker == me:
            continue
        folder = search_dir / WORKERS_DIR / str(worker)
        beat_at = last_beat(folder) or t.datetime_start.timestamp()
        silent = now - beat_at
        if silent < settings.stale_after_s:
            continue
        try:
            state = WorkerState.read(folder)
        except (OSError, ValueError):
            state = None
        if state is not None and state.trial != t.number:
            alive = False  # its worker has moved on (or restarted) without it
        else:
            alive = job_alive(t.user_attrs.get(JOB_ATTR), state.host if state else "", state.pid if state else -1)
        if alive is False or (alive is None and silent >= 2 * settings.stale_after_s):
            job = t.user_attrs.get(JOB_ATTR)
            out.append((t.number, f"its worker {worker}{f' (Slurm job {job})' if job else ''} gave no sign of life "
                                  f"for {silent:.0f} s and {'is gone' if alive is False else 'cannot be reached'}"))
    return out


def tell(study: optuna.Study, number: int, state: TrialState, values: list[float] | None = None) -> str | None:
    """Tell a trial's end; None when told, else why not (told meanwhile: by its worker come back, or by another
    that took it for dead). Optuna's grid, exhausted, stops the study from its after_trial hook, which raises
    outside `optimize` once the state is stored: told all the same."""
    try:
        study.tell(number, values, state=state)
    except (RuntimeError, ValueError) as e:
        if study.get_trials(deepcopy=False)[number].state != state:
            return f"{type(e).__name__}: {e}"
    return None


def may_be_orphaned(study: optuna.Study, search_dir: Path, settings: OptunaSearchConfig, me: int) -> bool:
    """Whether another worker's running trial may have lost its worker: its job (or process) is gone, or it has
    been silent for three heartbeats and its job is not known to live. Only a worker still here can find it dead
    (after search.stale_after_s) and take its retry; a preempted job waiting in the queue to resume its trial
    lives."""
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR)
        if worker is None or worker == me:
            continue
        folder = search_dir / WORKERS_DIR / str(worker)
        silent = now - (last_beat(folder) or t.datetime_start.timestamp()) >= 3 * settings.heartbeat_s
        try:
            state = WorkerState.read(folder)
        except (OSError, ValueError):
            state = None
        alive = job_alive(t.user_attrs.get(JOB_ATTR), state.host if state else "", state.pid if state else -1)
        if alive is False or (silent and alive is not True):
            return True
    return False


def fail_stale(study: optuna.Study, search_dir: Path, settings: OptunaSearchConfig, me: int) -> None:
    """Mark dead workers' trials FAIL and enqueue their parameters again (search.max_retries times at most)."""
    for number, why in stale(study, search_dir, settings, me):
        trial = study.get_trials(deepcopy=False)[number]
        retries = trial.user_attrs.get(RETRIES_ATTR, 0)
        again = retries < settings.max_retries
        study._storage.set_trial_user_attr(trial._trial_id, FAILURE_ATTR, why)
        study._storage.set_trial_user_attr(trial._trial_id, RETRIED_ATTR, again)
        if tell(study, number, TrialState.FAIL) is not None:  # told meanwhile (its worker came back, or another did)
            continue
        if again:
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: number, RETRIES_ATTR: retries + 1})
        log.warning("trial %d failed: %s; %s", number, why,
                    f"its parameters are tried again ({retries + 1} of {settings.max_retries}, search.max_retries)"
                    if again else f"not tried again: search.max_retries={settings.max_retries} reached")


def ask(study: optuna.Study, plan: SearchPlan, settings: OptunaSearchConfig, search_dir: Path, me: int,
        job_id: str | None) -> optuna.Trial | None:
    """The next trial for worker `me`, or None when search.trials are ended or taken by others: the dead workers'
    trials failed first (and their parameters enqueued, which Optuna hands out before sampling)."""
    with exclusive(search_dir / ASK_LOCK):
        fail_stale(study, search_dir, settings, me)
        trials = study.get_trials(deepcopy=False)
        if taken(trials) >= settings.trials and not any(t.state == TrialState.WAITING for t in trials):
            return None
        trial = study.ask({p.name: p.distribution() for p in params_of(plan)})
        trial.set_user_attr(WORKER_ATTR, me)
        trial.set_user_attr(JOB_ATTR, job_id)
        return trial
