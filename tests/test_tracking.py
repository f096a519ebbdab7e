"""Experiment trackers (tracking=[mlflow], [wandb]; pipeline/tracking/, pipeline/job/tracking.py): runs logged to a real
MLflow server the tests start (SQLite backend, local artifact root) and read back through MlflowClient; W&B in
offline mode read back with W&B's own reader of its run files; `pipeline.track sync` and `collect --track`; bad
input refused at launch. A point preempted on the real local Slurm is tests/test_slurm.py's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.rundir import Point, TrackedRuns, read_metrics
from pipeline.tracking.trackers import history
from tests.conftest import MlflowServer, launch, rank_pid, start_launch, wait_for_step

FAST = ["trainer.log_every=10", "dataset.train_size=2048", "dataset.test_size=256", "health.enabled=false"]


def track(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.track", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def runs_of(server: MlflowServer, sweep: str) -> dict[str, object]:
    """The sweep's MLflow runs by their pipeline/point tag ("sweep" for the parent)."""
    client = server.client()
    experiment = client.get_experiment_by_name("pipeline")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`pipeline/sweep` = '{sweep}'")
    return {r.data.tags.get("pipeline/point", r.data.tags.get("pipeline/role")): r for r in runs}


def point_runs(server: MlflowServer, sweep: str) -> dict[str, tuple[str, list[int]]]:
    """Each point's MLflow run id and its loss curve's steps."""
    return {k: (r.info.run_id, steps(server, r.info.run_id)) for k, r in runs_of(server, sweep).items() if k != "sweep"}


def steps(server: MlflowServer, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in server.client().get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def tracked_sweep(mlflow_server, tmp_path_factory):
    """A `-m nodes=1,2` sweep logged to MLflow, then collected with --track and synced (twice)."""
    folder = tmp_path_factory.mktemp("tracked")
    sweep = folder / "sweep"
    r = launch("-m", "nodes=1,2", "tracking=[mlflow]", f"tracking.mlflow.uri={mlflow_server.uri}",
               "trainer.epochs=10", "trainer.max_steps=60", *FAST, f"hydra.sweep.dir={sweep}", cwd=folder)
    assert r.returncode == 0, r.stderr
    before = point_runs(mlflow_server, "sweep")
    collected = subprocess.run([sys.executable, "-m", "pipeline.collect", str(sweep), "--out", str(folder / "collect"),
                                "--track", "--no-plots"], cwd=folder, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stderr
    synced = [track("sync", str(sweep), cwd=folder) for _ in range(2)]
    return sweep, before, collected, synced


@pytest.mark.e2e
def test_a_sweep_is_a_parent_run_with_a_run_per_point_and_the_collection(mlflow_server, tracked_sweep):
    sweep, _, collected, _ = tracked_sweep
    runs = runs_of(mlflow_server, "sweep")
    assert sorted(runs) == ["0", "1", "sweep"]
    parent = runs["sweep"]
    for point in ("0", "1"):
        assert runs[point].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert TrackedRuns.read(sweep / point).runs["mlflow"].run_id == runs[point].info.run_id
    # collect --track: the report, tables and forecast on the parent run, which every point having ended finished
    assert parent.info.status == "FINISHED" and "logged to mlflow" in collected.stdout
    files = {a.path for a in mlflow_server.client().list_artifacts(parent.info.run_id, "collect")}
    assert {"collect/report.md", "collect/scaling.csv", "collect/scaling.json"} <= files


@pytest.mark.e2e
def test_a_points_run_holds_its_curves_config_tags_end_and_files(mlflow_server, tracked_sweep):
    sweep, _, _, _ = tracked_sweep
    run = runs_of(mlflow_server, "sweep")["1"]  # nodes=2: two ranks
    point, record = Point.read(sweep / "1"), json.loads((sweep / "1/result.json").read_text())
    run_id, data = run.info.run_id, run.data
    assert run.info.status == "FINISHED" and data.tags["pipeline/status"] == "completed"
    # every trainer.log_every step once, with the step's split; the evaluation; the record's figures
    for key in ("train/loss", "train/lr", "train/samples_per_s", "time/data_ms", "time/compute_ms", "time/comm_ms"):
        assert steps(mlflow_server, run_id, key) == list(range(10, 61, 10)), key
    assert steps(mlflow_server, run_id, "test/accuracy") == [60]
    assert data.metrics["test/accuracy"] == record["evaluation"]["value"]
    assert data.metrics["final/samples_per_s"] == pytest.approx(record["throughput_samples_per_s"])
    by_step = read_metrics(sweep / "1")
    assert [m.value for m in mlflow_server.client().get_metric_history(run_id, "train/loss")] == \
        [by_step[s]["train/loss"] for s in range(10, 61, 10)]
    # the frozen config, flattened; the tags
    assert data.params["optimizer.lr"] == str(point.config["optimizer"]["lr"]) and data.params["nodes"] == "2"
    assert {k: data.tags[k] for k in ("nodes", "world_size", "parallel", "pipeline/restarts", "pipeline/run_id",
                                      "git.commit")} == {
        "nodes": "2", "world_size": "2", "parallel": "ddp", "pipeline/restarts": "0", "pipeline/run_id": point.run_id,
        "git.commit": point.git.sha or "unknown"}
    assert data.tags["git.dirty"] in ("true", "false", "unknown")
    # the record and the rank logs
    files = {a.path for a in mlflow_server.client().list_artifacts(run_id)} | \
        {a.path for a in mlflow_server.client().list_artifacts(run_id, "logs")}
    assert {"result.json", "logs/node0-rank0.log", "logs/node1-rank1.log"} <= files


@pytest.mark.e2e
def test_sync_of_a_tracked_sweep_sends_nothing_twice_and_makes_no_run(mlflow_server, tracked_sweep):
    _, before, _, synced = tracked_sweep
    for r in synced:
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("0 figure(s)") == 2, r.stdout
    assert point_runs(mlflow_server, "sweep") == before


@pytest.mark.e2e
def test_a_tracker_down_mid_run_costs_the_run_nothing_and_sync_fills_the_gap(mlflow_server, tmp_path):
    """The module's server, stopped mid-run and started again on its port and store (a server's start is the
    slow part of this file)."""
    server = mlflow_server
    run_dir = tmp_path / "run"
    args = ["tracking=[mlflow]", f"tracking.mlflow.uri={server.uri}", "trainer.epochs=400", "trainer.max_steps=6000",
            "trainer.log_every=20", *FAST[1:], f"hydra.run.dir={run_dir}"]
    try:
        launcher = start_launch(*args, cwd=tmp_path)
        wait_for_step(run_dir, 600, launcher, ranks=1)
        deadline = time.monotonic() + 60
        while not ((run_dir / "tracking.json").exists() and  # the run is open in MLflow, and has some steps
                   steps(server, TrackedRuns.read(run_dir).runs["mlflow"].run_id)):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.1)
        server.stop()  # killed mid-run, by pid: nothing of it is left
        out, err = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, err
        record = json.loads((run_dir / "result.json").read_text())
        assert record["status"] == "completed" and record["steps"] == 6000
        assert "mlflow" in record["missing"]["tracking"] and "pipeline.track sync" in record["missing"]["tracking"]
        assert "tracking: mlflow:" in (run_dir / "logs/node0-rank0.log").read_text()  # a warning, said once
        server.start()  # back, on the same port and store
        run_id = TrackedRuns.read(run_dir).runs["mlflow"].run_id
        assert steps(server, run_id)[-1] < 6000
        assert server.client().get_run(run_id).info.status == "RUNNING"
        first = track("sync", str(run_dir), cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        again = track("sync", str(run_dir), cwd=tmp_path)
        assert again.returncode == 0 and "0 figure(s)" in again.stdout, again.stdout
        assert steps(server, run_id) == list(range(20, 6001, 20))  # every step once
        assert steps(server, run_id, "test/accuracy") == [6000]
        run = server.client().get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["pipeline/status"] == "completed"
        assert len(runs_of(server, "run")) == 1
    finally:
        if server.proc is None:  # left stopped by a failure above: the module's other tests need it
            server.start()


@pytest.mark.e2e
def test_a_wandb_offline_run_continues_with_the_same_id_and_step_axis_across_a_restart(tmp_path):
    """Preempted (USR2 to its ranks: rank 0 checkpoints and ends the W&B run preempted), then relaunched into its
    folder: it resumes, and logs to the same W&B run id; read back with W&B's reader, every step once."""
    run_dir = tmp_path / "run"
    args = ["nodes=2", "tracking=[wandb]", "tracking.wandb.mode=offline", "trainer.epochs=200",
            "trainer.max_steps=1500", "trainer.log_every=100", "trainer.eval_every=500", "trainer.checkpoint_every=200",
            *FAST[1:], f"hydra.run.dir={run_dir}"]
    launcher = start_launch(*args, cwd=tmp_path)
    wait_for_step(run_dir, 300, launcher, ranks=2)
    for rank in (0, 1):
        os.kill(rank_pid(run_dir, rank), signal.SIGUSR2)
    launcher.communicate(timeout=120)
    assert not (run_dir / "result.json").exists()
    r = launch(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run_id = Point.read(run_dir).run_id
    tracked = TrackedRuns.read(run_dir).runs["wandb"]
    assert tracked.run_id == run_id and tracked.starts == 2
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(segments) == 2
    rows = history(run_dir / "wandb", run_id)
    assert sorted(row["trainer/step"] for row in rows if "train/loss" in row) == list(range(100, 1501, 100))
    assert sorted(row["trainer/step"] for row in rows if "test/accuracy" in row) == [500, 1000, 1500]


BLOCK_MLFLOW = """import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Absent())
"""


@pytest.mark.e2e
def test_bad_tracking_input_is_refused_at_launch_naming_the_key(tmp_path):
    blocked = tmp_path / "no-mlflow"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(BLOCK_MLFLOW)
    (tmp_path / "a-file").write_text("")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "tracking.json").write_bytes(b"\x00\x01 not json")
    cases = [
        (["tracking=[nope]"], {}, "tracking=nope is not an option of tracking; choose one of: mlflow, wandb"),
        (["tracking=[mlflow]", "tracking.mlflow.uri=htp://host:5000"], {}, "tracking.mlflow.uri='htp://host:5000'"),
        (["tracking=[mlflow]", "tracking.mlflow.uri=http://:5000"], {}, "names no host"),
        (["tracking.mlflow.uri=http://host:5000"], {}, "choose it first, e.g. tracking=[mlflow]"),
        (["tracking=[wandb]", f"tracking.wandb.dir={tmp_path / 'a-file' / 'sub'}"], {}, "tracking.wandb.dir="),
        (["tracking=[wandb]", "tracking.wandb.mode=sometimes"], {}, "choose one of: online, offline"),
        (["tracking=[mlflow]"], {"PYTHONPATH": str(blocked)}, "pip install 'pipeline[mlflow]'"),
        (["tracking=[mlflow]", f"hydra.run.dir={garbage}"], {}, "tracking.json cannot be used"),
    ]
    for overrides, env, said in cases:
        proc = start_launch(*overrides, *([] if any("hydra.run.dir" in o for o in overrides) else
                                         [f"hydra.run.dir={tmp_path / 'run'}"]), cwd=tmp_path,
                            env={**os.environ, **env})
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and said in err and "Traceback" not in err, (overrides, err)
    assert not (tmp_path / "run" / "point.json").exists()  # Hydra may have made the folder: nothing of a run
    assert (garbage / "tracking.json").read_bytes() == b"\x00\x01 not json"
