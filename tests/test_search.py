"""Searches: Hydra's Optuna sweeper through the pipeline's launcher (one JobReturn per point, batch after batch),
the built-in asynchronous search (search=optuna) in local debug mode and on the real local Slurm (a preempted
worker resumes its trial, a SIGKILLed one's trial is retried), and the bad input a search refuses at launch."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from pipeline.rundir import Progress, SearchPlan, WorkerState
from pipeline.search import study as studies
from tests.conftest import launch, rank_pid, start_launch

pytestmark = pytest.mark.e2e
FAST = ["trainer.max_steps=20", "dataset.train_size=2048", "dataset.test_size=256"]
LR = '+search.space.optimizer.lr="tag(log, interval(0.001, 0.1))"'


def record(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def study_of(search_dir: Path) -> optuna.Study:
    plan = SearchPlan.read(search_dir)
    from pipeline.config import parse_run_config

    return studies.open_study(plan, parse_run_config(plan.config).search)


def test_hydras_optuna_sweeper_gets_each_batchs_objectives(tmp_path):
    """6 trials, 2 per batch (3 batches): each point numbered on from the batch before (its own folder), its
    objective (the evaluation's accuracy) read from its record; Optuna's best is the best record."""
    sweep = tmp_path / "sweep"
    out = launch("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2",
                 "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=1", "optimizer.lr=interval(0.001,0.5)",
                 *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    folders = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in folders] == [str(i) for i in range(6)]
    accuracies = {p.name: record(p)["evaluation"]["value"] for p in folders}
    assert len({record(p)["run_id"] for p in folders}) == 6
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(accuracies.values()))


def test_a_failed_trial_is_a_failed_trial_not_a_traceback(tmp_path):
    """A trial that diverges gives Hydra's sweeper a failed JobReturn: Optuna marks it FAIL; with the sweeper's
    default max_failure_rate=0 the launch then ends with its reason, exit 1, and no traceback."""
    sweep = tmp_path / "sweep"
    out = launch("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                 "optimizer.lr=choice(1e6)", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "training diverged" in out.stderr and "Traceback" not in out.stderr


def test_the_built_in_search_trains_its_trials_in_local_debug_mode(tmp_path):
    """search=optuna with 2 workers (processes here) and 4 trials of different lengths: 4 complete trials, each a
    point of its own with its parameters, told the record's accuracy; status shows the best and its folder."""
    run_dir = tmp_path / "search"
    out = launch("search=optuna", "search.trials=4", "search.workers=2", "search.seed=3", LR,
                 '+search.space.trainer.max_steps="choice(8, 30)"', *FAST[1:], f"hydra.run.dir={run_dir}",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    study = study_of(run_dir)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    for t in trials:
        rec = record(run_dir / "trials" / str(t.number))
        assert t.values == [rec["evaluation"]["value"]]
        assert f"optimizer.lr={t.params['optimizer.lr']}" in rec["overrides"]
        assert rec["steps"] == t.params["trainer.max_steps"]
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both worked
    status = subprocess.run([sys.executable, "-m", "pipeline.status", str(run_dir)], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert "4 of 4 trial(s) ended: 4 complete" in status.stdout
    assert f"best: trial {study.best_trial.number}" in status.stdout


def test_a_pruner_stops_a_bad_trial_and_the_report_shows_the_study(tmp_path):
    """One worker, 5 trials, a good and a deliberately bad learning rate (1e-7: nothing learnt), the median pruner
    judging each trial by its evaluation every 5 steps: after two complete trials a bad one is pruned at its first
    evaluation, its record says so, and the worker goes on to the next trial. Then `status` and `collect` over
    the search folder: the study section with its trials table and Optuna's plots."""
    run_dir, out_dir = tmp_path / "search", tmp_path / "collect"
    out = launch("search=optuna", "search.trials=5", "search.workers=1", "search.seed=6", "search.pruner=median",
                 '+search.space.optimizer.lr="choice(0.05, 0.0000001)"', "trainer.eval_every=5", *FAST,
                 f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    trials = study_of(run_dir).get_trials()
    states = optuna.trial.TrialState
    pruned = [t for t in trials if t.state == states.PRUNED]
    assert len(trials) == 5 and pruned, [(t.number, t.state, t.params) for t in trials]
    assert all(t.params["optimizer.lr"] == 1e-7 for t in pruned)
    rec = record(run_dir / "trials" / str(pruned[0].number))
    assert (rec["status"], rec["pruned_at_step"], rec["steps"]) == ("pruned", 5, 5)
    assert rec["evaluation"]["value"] == pruned[0].intermediate_values[5]
    good = next(t for t in trials if t.state == states.COMPLETE)
    rec = record(run_dir / "trials" / str(good.number))
    assert [e["step"] for e in rec["evaluations"]] == [5, 10, 15, 20]  # during training, and the last
    assert good.intermediate_values == {e["step"]: e["value"] for e in rec["evaluations"][:-1]}
    assert rec["evaluations"][-1]["value"] == rec["evaluation"]["value"] == good.values[0]
    status = subprocess.run([sys.executable, "-m", "pipeline.status", str(run_dir)], capture_output=True, text=True)
    assert f"{len(pruned)} pruned" in status.stdout, status.stdout + status.stderr
    collect = subprocess.run([sys.executable, "-m", "pipeline.collect", str(run_dir), "--out", str(out_dir)],
                             capture_output=True, text=True)
    assert collect.returncode == 0, collect.stderr[-3000:]
    report = (out_dir / "report.md").read_text()
    assert "## Study search" in report and "### Best parameters" in report and "## Pruned trials" in report
    assert "| trial | state | evaluation.value | optimizer.lr |" in report and "pruned after step 5" in report
    for kind in ("history", "importances", "intermediate"):
        assert f"![study-search-{kind}](study-search-{kind}.png)" in report
        assert (out_dir / f"study-search-{kind}.png").stat().st_size > 1000
    # two searches of one name, collected together: a section and plots each
    shutil.copytree(run_dir, tmp_path / "again" / "search")
    both = subprocess.run([sys.executable, "-m", "pipeline.collect", str(run_dir), str(tmp_path / "again"), "--out",
                           str(tmp_path / "both")], capture_output=True, text=True)
    assert both.returncode == 0, both.stderr[-3000:]
    assert (tmp_path / "both/report.md").read_text().count("## Study search") == 2
    assert all((tmp_path / f"both/study{i}-search-history.png").is_file() for i in (1, 2))


def test_a_search_for_accuracy_and_cost_reports_its_pareto_front(tmp_path):
    """Two objectives, the evaluation (up) and the run's node-hours (down), with `nodes` in the space: each trial
    is told both from its record, and the report's study section has the Pareto front and Optuna's plot of it."""
    run_dir, out_dir = tmp_path / "search", tmp_path / "collect"
    out = launch("search=optuna", "search.trials=3", "search.workers=1", "search.seed=0", "search.sampler=nsgaii",
                 "objective=[evaluation.value,cost.node_hours]", '+search.space.nodes="choice(1, 2)"',
                 '+search.space.trainer.max_steps="choice(10, 20)"', "trainer.epochs=100", *FAST[1:],
                 f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    study = study_of(run_dir)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in study.get_trials():
        rec = record(run_dir / "trials" / str(t.number))
        assert rec["nodes"] == t.params["nodes"] and rec["steps"] == t.params["trainer.max_steps"]
        assert t.values == pytest.approx([rec["evaluation"]["value"], rec["nodes"] * rec["wall_time_s"] / 3600])
    collect = subprocess.run([sys.executable, "-m", "pipeline.collect", str(run_dir), "--out", str(out_dir)],
                             capture_output=True, text=True)
    assert collect.returncode == 0, collect.stderr[-3000:]
    report = (out_dir / "report.md").read_text()
    assert "### The Pareto front (" in report and "| trial | state | evaluation.value | cost.node_hours |" in report
    for kind in ("pareto", "importances-0", "importances-1"):
        assert (out_dir / f"study-search-{kind}.png").stat().st_size > 1000, report


@pytest.mark.parametrize("args, said", [
    (["objective=evaluation.valeu"], "did you mean evaluation.value"),
    (["search=optuna", "search.trials=0", LR], "search.trials"),
    (["search=optuna"], "search.space is empty"),
    (["search=optuna", '+search.space.optimizer.lr="interval(0.1, 0.001)"'], "reversed"),
    (["search=optuna", '+search.space.optimizer.lr="interval(0.001, inf)"'], "finite"),
    (["search=optuna", '+search.space.optimizer.lr="tag(log, interval(0, 0.1))"'], "logarithm"),
    (["search=optuna", '+search.space.optimizer.lr="interval(0.1"'], "malformed"),
    (["search=optuna", '+search.space.model="choice(mlp, cnn)"'], "config group"),
    (["search=optuna", '+search.space.nodes="interval(0.5, 2.5)"'], "search.space.nodes"),
    (["search=optuna", "search.direction=[maximize, minimize]", LR], "search.direction"),
    (["-m", "search=optuna", LR, "trainer.seed=1,2"], "without -m"),
    (["search=optuna", LR, "search.pruner=median"], "trainer.eval_every"),
    (["search=optuna", LR, "search.pruner=hyperband", "trainer.eval_every=5",
      "objective=[evaluation.value,cost.node_hours]", "search.direction=[maximize,minimize]"], "search.pruner=none"),
    (["trainer.eval_every=-1"], "trainer.eval_every"),
])
def test_bad_search_input_is_refused_at_launch(tmp_path, args, said):
    out = launch(*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert said in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "search.json").exists()


# ------------------------------------------------------------------------------------------------- Slurm
def wait_for(condition, within_s: float, what: str):
    deadline = time.time() + within_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {within_s} s: {what}")


def gone(pid: int) -> bool:
    """A process that has ended, though its parent may not have waited for it yet (a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def training(run_dir: Path, worker: int) -> tuple[WorkerState, Path] | None:
    """(the worker's state, its trial's folder) once the worker's trial has taken steps, and has more than half
    of them still to take (a signal then reaches its training, not its record's writing)."""
    try:
        state = WorkerState.read(run_dir / "workers" / str(worker))
    except (OSError, ValueError):
        return None
    folder = run_dir / "trials" / str(state.trial)
    progress = Progress.latest(folder) if state.trial is not None else None
    if progress is None or progress.step > progress.total_steps / 2 or (folder / "result.json").exists():
        return None
    return state, folder


@pytest.mark.slurm
def test_a_search_on_slurm_survives_a_preempted_and_a_killed_worker(slurm_cluster, tmp_path):
    """3 workers, 9 trials of different lengths on the real local Slurm. Worker 0 is preempted (USR2) mid-trial:
    its trial checkpoints, its job is requeued and resumes that trial. Worker 1's batch step and trial step are
    SIGKILLed: its job ends, no lock is left, and its trial is found dead, failed, and retried by another worker.
    The study ends with 9 complete trials."""
    run_dir = tmp_path / "search"
    out = launch("cluster=slurm", "cluster.time=10", "search=optuna", "search.trials=9", "search.workers=3",
                 "search.heartbeat_s=1", "search.stale_after_s=4", "search.seed=0", "trainer.checkpoint_every=100",
                 '+search.space.optimizer.lr="tag(log, interval(0.001, 0.05))"',
                 '+search.space.trainer.epochs="choice(8, 16, 24)"', "trainer.log_every=20", "dataset.train_size=4096",
                 "dataset.test_size=256",
                 f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    preempted_state, preempted = wait_for(lambda: training(run_dir, 0), 180, "worker 0 training a trial")
    subprocess.run(["scancel", "--signal=USR2", preempted_state.job_id], check=True)

    def status_during() -> bool:  # read while some worker trains (not between two of its trials)
        out = subprocess.run([sys.executable, "-m", "pipeline.status", str(run_dir)], capture_output=True,
                             text=True).stdout
        return bool(re.search(r"\d of 9 trial\(s\) ended: .*; [1-9] running", out)
                    and re.search(r"^worker \d: job \S+ RUNNING, training trial \d+, ", out, re.M))

    wait_for(status_during, 60, "status to show a worker training a trial")
    killed_state, _ = wait_for(lambda: training(run_dir, 1), 180, "worker 1 training a trial")
    pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(killed_state.pid)], capture_output=True,
                                           text=True).stdout.split()] + [killed_state.pid]
    for pid in pids:  # the worker and its srun: a batch step killed hard, as by the OOM killer or a node's end
        os.kill(pid, signal.SIGKILL)

    def ended() -> bool:
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        return not queue

    wait_for(ended, 600, "every worker's job to end")
    assert all(gone(pid) for pid in pids)
    study = study_of(run_dir)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 9, [(t.number, t.state, t.user_attrs) for t in trials]
    killed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(killed) == 1 and killed[0].number == killed_state.trial
    assert "gave no sign of life" in killed[0].user_attrs["failure"]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == killed_state.trial)
    assert retry.params == killed[0].params and retry.state == optuna.trial.TrialState.COMPLETE
    assert record(preempted)["resumed_from_step"] > 0  # the preempted trial resumed, in its own folder
    # each trial's restart count is its own: the preempted one restarted once, the others (worker 0's later trials,
    # in its requeued job, among them) never
    counts = {t.number: record(run_dir / "trials" / str(t.number))["restart_count"] for t in complete}
    assert counts == {t.number: int(run_dir / "trials" / str(t.number) == preempted) for t in complete}
    assert not os.path.lexists(run_dir / "study.journal.lock")  # no lock left behind
    status = subprocess.run([sys.executable, "-m", "pipeline.status", str(run_dir)], capture_output=True, text=True)
    assert "9 of 9 trial(s) ended: 9 complete" in status.stdout, status.stdout + status.stderr


def test_a_dead_workers_last_trial_is_retried_by_the_worker_still_there(tmp_path):
    """2 workers, 2 trials, locally: worker 1 and its rank are SIGKILLed mid-trial. Worker 0, its own trial done
    and none left to ask for, waits while worker 1's trial may have lost its worker, finds it dead after
    search.stale_after_s, and trains its retry: the study ends with 2 complete trials, not a trial left running.
    The launch says which worker failed (exit 1, no traceback)."""
    run_dir = tmp_path / "search"
    proc = start_launch("search=optuna", "search.trials=2", "search.workers=2", "search.heartbeat_s=0.5",
                        "search.stale_after_s=2", '+search.space.trainer.max_steps="choice(3000, 3001)"',
                        "trainer.epochs=100", *FAST[1:], f"hydra.run.dir={run_dir}", cwd=tmp_path)
    try:
        state, folder = wait_for(lambda: training(run_dir, 1), 120, "worker 1 training a trial")
        rank = wait_for(lambda: rank_pid(folder, 0), 60, "worker 1's rank 0 to start")
        for pid in (state.pid, rank):
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "search worker(s) 1 failed" in err and "Traceback" not in err, err[-3000:]
    for pid in (rank, state.pid):  # gone, or a zombie of a parent that does not reap (PID 1 of a container)
        wait_for(lambda: gone(pid), 30, f"process {pid} to end")
    trials = study_of(run_dir).get_trials()
    states = optuna.trial.TrialState
    assert sorted(t.state for t in trials) == sorted([states.COMPLETE, states.COMPLETE, states.FAIL]), trials
    dead = next(t for t in trials if t.state == states.FAIL)
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == dead.number)
    assert dead.number == state.trial and "gave no sign of life" in dead.user_attrs["failure"]
    assert retry.state == states.COMPLETE and retry.user_attrs["worker"] == 0 and retry.params == dead.params


@pytest.mark.slurm
def test_a_pruner_prunes_a_trial_on_slurm(slurm_cluster, tmp_path):
    """The local pruning test's search with its worker a Slurm job and each trial a job step: the trial's rank 0,
    on a node of its own, reports its evaluations to the study in the search's folder; the bad learning rate is
    pruned at its first evaluation, and the worker goes on."""
    run_dir = tmp_path / "search"
    out = launch("cluster=slurm", "search=optuna", "search.trials=4", "search.workers=1", "search.seed=6",
                 "search.pruner=median", '+search.space.optimizer.lr="choice(0.05, 0.0000001)"', "trainer.eval_every=5",
                 *FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    job = WorkerState.read(run_dir / "workers" / "0").job_id
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True,
                                        text=True).stdout.strip(), 300, "the worker's job to end")
    trials = study_of(run_dir).get_trials()
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(trials) == 4 and pruned and all(t.params["optimizer.lr"] == 1e-7 for t in pruned), trials
    rec = record(run_dir / "trials" / str(pruned[0].number))
    assert (rec["status"], rec["pruned_at_step"], rec["launch_mode"]) == ("pruned", 5, "slurm")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 4 - len(pruned)


def test_a_lock_left_by_a_killed_process_does_not_block_the_study(tmp_path):
    """Optuna #5921: a process SIGKILLed while it holds the journal's lock leaves the lock file; the next writer
    takes it over once it has not been renewed for search.lock_grace_s."""
    journal = tmp_path / "study.journal"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import os, signal
from optuna.storages.journal import JournalFileSymlinkLock
lock = JournalFileSymlinkLock({str(journal)!r})
lock.acquire()
os.kill(os.getpid(), signal.SIGKILL)
"""])
    assert holder.wait(30) == -signal.SIGKILL
    assert os.path.lexists(f"{journal}.lock")  # left behind (a link to the journal), as a killed worker leaves it
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(journal), grace_period=3)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal), lock_obj=lock))
    start = time.time()
    optuna.create_study(study_name="s", storage=storage).ask()
    assert time.time() - start < 30
