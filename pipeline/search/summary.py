"""Where a search stands, in words, for `pipeline.status SEARCH_DIR`: its trials by state, the best so far (on
the Pareto front where there are several objectives) and its folder, and each worker's job, trial and last sign
of life. Reads the study through Optuna (imported here only); imports no torch."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.rundir import WORKERS_DIR, SearchPlan, WorkerState
from pipeline.slurm import job_states


def study_lines(search_dir: Path) -> list[str]:
    from optuna.trial import TrialState

    from pipeline.config import parse_run_config
    from pipeline.search import study as studies

    plan = SearchPlan.read(search_dir)
    settings = parse_run_config(plan.config).search
    study = studies.open_study(plan, settings)
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    retried = sum(studies.retried(t) for t in trials)
    ended = len(studies.ended(trials))
    lines = [f"search {plan.study}: {ended} of {settings.trials} trial(s) ended: {count[TrialState.COMPLETE]} "
             f"complete, {count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL] - retried} failed; "
             f"{count[TrialState.RUNNING]} running, {count[TrialState.WAITING]} waiting"
             + (f"; {retried} failed with their worker and tried again" if retried else "")]
    objectives = ", ".join(f"{o} ({d})" for o, d in zip(plan.objectives, plan.directions))
    best = ([study.best_trial] if len(plan.objectives) == 1 else study.best_trials) if count[TrialState.COMPLETE] \
        else []
    for t in best[:5]:
        values = ", ".join(f"{v:.6g}" for v in t.values)
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        lines.append(f"{'best' if len(plan.objectives) == 1 else 'on the Pareto front'}: trial {t.number}, "
                     f"{objectives} = {values}: {params} ({search_dir / t.user_attrs.get(studies.FOLDER_ATTR, '?')})")
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get(studies.FAILURE_ATTR):
            lines.append(f"trial {t.number} failed: {t.user_attrs[studies.FAILURE_ATTR]}")
    lines += worker_lines(search_dir)
    return lines


def worker_lines(search_dir: Path) -> list[str]:
    states = []
    for folder in sorted((search_dir / WORKERS_DIR).glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 0):
        try:
            states.append((folder, WorkerState.read(folder)))
        except (OSError, ValueError):
            continue
    live, history = job_states([s.job_id for _, s in states if s.job_id])
    out = []
    for folder, s in states:
        beat = folder / "heartbeat"
        age = f", last sign of life {time.time() - beat.stat().st_mtime:.0f} s ago" if beat.exists() else ""
        job = s.job_id and (live.get(s.job_id) or (history.get(s.job_id) or ["?"])[-1])
        out.append(f"worker {s.worker}: {f'job {s.job_id} {job}' if s.job_id else 'local'}, "
                   f"{f'training trial {s.trial}' if s.trial is not None else 'between trials'}, "
                   f"{len(s.started_trials)} trial(s) started{age}")
    return out
