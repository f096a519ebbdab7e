"""Each tracker's client behind one interface (`Tracker`): `open` creates the point's run or continues the one
tracking.json names, `present` says which (figure, step) pairs the tracker already holds, `log` sends figures
against the training step, `end` leaves the run in the record's state with its final figures and files.

One tracked run per point, across every restart: its identity is the point's run id (point.json), which a requeue,
`status --resubmit-failed` and a relaunch that resumes all keep. MLflow gives its run ids itself: the first start
creates the run, tagged `pipeline/run_id`, and tracking.json keeps its id (a lost file is found again by the tag).
W&B takes the id it is given: the point's run id.

A restart from a checkpoint at step k trains steps after k again. A tracker is sent each (figure, step) once: what it
holds already (`present`) is not sent again, so its curve has each step once. With exact resume the steps trained
again give the same losses; metrics.jsonl keeps both segments' lines.

W&B's own step counts its log calls, and must only increase (a resumed run drops lower ones; every offline
segment starts again at 0): figures go against `trainer/step`, a defined x-axis metric, which the training step is.
That also lets `sync` send a step a killed process never sent, below the last one W&B has.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.checks import ConfigError
from pipeline.config import TrackingConfig
from pipeline.result import Result
from pipeline.rundir import TRACKING_LOCK, WANDB_DIR, Point, TrackedRun, TrackedRuns
from pipeline.runlock import exclusive

log = logging.getLogger(__name__)
STEP_KEY = "trainer/step"  # W&B's x-axis for every figure
MODULES = {"mlflow": "mlflow", "wandb": "wandb"}  # the module each tracker needs; its extra is pipeline[<name>]
# how a record's status ends a run: MLflow's run states; W&B's exit code (0: finished, else failed)
MLFLOW_STATES = {"completed": "FINISHED", "pruned": "FINISHED", "diverged": "FAILED", "failed": "FAILED",
                 "incomplete": "FAILED", "preempted": "KILLED", "interrupted": "KILLED"}
PARAM_CHUNK, METRIC_CHUNK, MLFLOW_VALUE_MAX = 100, 1000, 6000  # MLflow's limits per log_batch, and a param's value


def check_tracking(tracking: TrackingConfig) -> None:
    """At launch: each tracker asked for is installed, and W&B's folder, where given, can be written."""
    for name in tracking.names:
        try:
            found = importlib.util.find_spec(MODULES[name]) is not None
        except (ImportError, ValueError):  # a finder that refuses it
            found = False
        if not found:
            raise ConfigError(f"tracking=[{name}] needs the {name} package, which is not installed here: "
                              f"pip install 'pipeline[{name}]' (or remove {name} from tracking)")
    folder = tracking.wandb.dir if tracking.wandb is not None else None
    if folder is not None:
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            writable = os.access(path, os.W_OK | os.X_OK)
        except OSError as e:
            raise ConfigError(f"tracking.wandb.dir={folder} cannot be made: {e.strerror or e}") from None
        if not writable or not path.is_dir():
            raise ConfigError(f"tracking.wandb.dir={folder} cannot be written: choose a folder this user can write "
                              "(null: each point's own folder)")


@dataclass(frozen=True)
class RunFacts:
    """What a tracked run is told of its point: made by rank 0 from its job, or by `sync` from the folder."""

    point_dir: Path
    point: Point
    starting: bool  # a training starts (rank 0), not a sync
    slurm: dict[str, str]  # the Slurm job's ids, as Slurm's variables say them

    @property
    def sweep_dir(self) -> Path:
        return Path(self.point.sweep_dir or self.point_dir)

    @property
    def in_sweep(self) -> bool:
        return self.sweep_dir.resolve() != self.point_dir.resolve()

    @property
    def name(self) -> str:
        changed = [o for o in self.point.overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/", "tracking"))]
        return f"{self.point.sweep_id}/{self.point.point}" + (f" {','.join(changed)}"[:200] if changed else "")

    def params(self) -> dict[str, str]:
        """The frozen config, flattened to dotted keys (`optimizer.lr`)."""
        out: dict[str, str] = {}

        def walk(node, prefix: str) -> None:
            if isinstance(node, dict) and node:
                for key, value in node.items():
                    walk(value, f"{prefix}{key}.")
            else:
                text = node if isinstance(node, str) else json.dumps(node)
                out[prefix[:-1]] = text if len(text) <= MLFLOW_VALUE_MAX else text[:MLFLOW_VALUE_MAX - 1] + "…"

        walk(self.point.config, "")
        return out

    def tags(self, restarts: int) -> dict[str, str]:
        cfg = self.point.config
        nodes, per_node = cfg.get("nodes", 1), cfg.get("cluster", {}).get("tasks_per_node", 1)
        parallel = cfg.get("parallel", {"kind": "ddp"})
        layout = parallel.get("kind", "ddp") + (f" replicate={parallel['replicate']}"
                                                 if parallel.get("replicate") is not None else "")
        git = self.point.git
        return {"pipeline/run_id": self.point.run_id, "pipeline/sweep": self.point.sweep_id,
                "pipeline/sweep_dir": str(self.sweep_dir.resolve()), "pipeline/point": str(self.point.point),
                "pipeline/point_dir": str(self.point_dir.resolve()), "pipeline/restarts": str(restarts),
                "nodes": str(nodes), "world_size": str(nodes * per_node), "parallel": layout,
                "launch_mode": self.point.launch_mode, "git.commit": git.sha or "unknown",
                "git.dirty": "unknown" if git.dirty is None else str(git.dirty).lower(), **self.slurm}


def summary_figures(record: Result) -> dict[str, float]:
    """A record's headline figures (each defined in docs/run-folder.md, "The record"), as a tracker's run ends with
    them, and TensorBoard's HParams view beside the overrides."""
    t, ev, loss = record.timing, record.evaluation, record.final_train_loss
    figures = {"final/samples_per_s": t.throughput_samples_per_s,
               "final/samples_per_s_per_rank": t.throughput_per_rank_samples_per_s,
               "final/step_time_median_s": t.step_time_s.median if t.step_time_s else None,
               "final/train_loss": loss, "final/mfu": record.utilisation.mfu,
               **({f"final/test_{ev.metric}": ev.value, "final/test_loss": ev.loss} if ev else {}),
               **({f"final/share_{phase}": getattr(t.breakdown_share, phase) for phase in ("data", "compute", "comm")}
                  if t.breakdown_share else {})}
    return {k: float(v) for k, v in figures.items() if v is not None}


def slurm_ids(environ=os.environ) -> dict[str, str]:
    names = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
             "SLURM_ARRAY_TASK_ID": "slurm.array_task_id"}
    return {tag: environ[var] for var, tag in names.items() if environ.get(var)}


def known_run(facts: RunFacts, tracker: str) -> tuple[Optional[TrackedRun], int]:
    """The tracker's run of the point that tracking.json names (None before the first start), and how many
    trainings will have logged to it once this one (`facts.starting`) has."""
    known = TrackedRuns.of(facts.point_dir).runs.get(tracker)
    return known, (known.starts if known else 0) + facts.starting


def remember(point_dir: Path, tracker: str, run: TrackedRun) -> None:
    """tracking.json gets this tracker's run (its two trackers' threads, or a sync, one at a time)."""
    with exclusive(point_dir / TRACKING_LOCK):
        runs = TrackedRuns.of(point_dir)
        if runs.runs.get(tracker) != run:
            TrackedRuns(runs={**runs.runs, tracker: run}).write(point_dir)


class Tracker:
    name: str

    def open(self, facts: RunFacts) -> TrackedRun:
        raise NotImplementedError

    def present(self) -> dict[str, set[int]]:
        """Each figure's steps the tracker holds for this run."""
        raise NotImplementedError

    def log(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        """(step, unix time, figures) rows, in the order they were reported."""
        raise NotImplementedError

    def end(self, status: str, figures: dict[str, float], files: list[Path]) -> None:
        raise NotImplementedError

    def log_collection(self, facts: RunFacts, out: Path) -> str:
        """`collect --track`: every file of the collection in `out`, to the sweep's run; says which."""
        raise NotImplementedError


class MlflowTracker(Tracker):
    """A point's MLflow run, nested (mlflow.parentRunId) in its sweep's parent run."""

    name = "mlflow"

    def __init__(self, config, point_dir: Path):
        # the client's defaults retry a refused request for minutes; this runs beside training, and what it
        # cannot send `sync` sends later: fail within seconds (a user's own settings stand)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the log says the run's id
        from mlflow.tracking import MlflowClient

        self.config, self.point_dir = config, point_dir
        self.uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=self.uri)
        self.where = self.client.tracking_uri
        self.run_id: Optional[str] = None

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.config.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.config.experiment)
        except Exception:  # another point created it first
            found = self.client.get_experiment_by_name(self.config.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _find(self, experiment: str, tags: dict[str, str]) -> Optional[str]:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([experiment], filter_string=query, max_results=1, order_by=["start_time ASC"])
        return runs[0].info.run_id if runs else None

    def parent(self, experiment: str, facts: RunFacts) -> str:
        """The sweep's parent run, made by the first of its points (or sync, or collect --track) to need it."""
        tags = {"pipeline/sweep_dir": str(facts.sweep_dir.resolve()), "pipeline/role": "sweep"}
        with exclusive(facts.sweep_dir / TRACKING_LOCK):
            found = self._find(experiment, tags)
            if found is not None:
                return found
            run = self.client.create_run(experiment, run_name=f"sweep {facts.point.sweep_id}",
                                         tags={**tags, "pipeline/sweep": facts.point.sweep_id})
            return run.info.run_id

    def open(self, facts: RunFacts) -> TrackedRun:
        from mlflow.entities import Param, RunTag

        known, starts = known_run(facts, self.name)
        experiment = self._experiment()
        parent = self.parent(experiment, facts) if facts.in_sweep else None
        run_id = known.run_id if known is not None and known.where == self.where else \
            self._find(experiment, {"pipeline/run_id": facts.point.run_id})
        tags = facts.tags(restarts=max(starts - 1, 0))
        if run_id is None:
            run_id = self.client.create_run(experiment, run_name=facts.name,
                                            tags={**tags, **({"mlflow.parentRunId": parent} if parent else {})}
                                            ).info.run_id
            params = [Param(k, v) for k, v in facts.params().items()]
            for i in range(0, len(params), PARAM_CHUNK):
                self.client.log_batch(run_id, params=params[i:i + PARAM_CHUNK])
        else:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        tracked = TrackedRun(run_id=run_id, where=self.where, parent_run_id=parent, starts=max(starts, 1))
        remember(facts.point_dir, self.name, tracked)
        return tracked

    def present(self) -> dict[str, set[int]]:
        keys = self.client.get_run(self.run_id).data.metrics
        return {key: {m.step for m in self.client.get_metric_history(self.run_id, key)} for key in keys}

    def log(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, int(unix * 1000), step) for step, unix, values in rows
                   for key, value in values.items()]
        for i in range(0, len(metrics), METRIC_CHUNK):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + METRIC_CHUNK])

    def end(self, status: str, figures: dict[str, float], files: list[Path]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in figures.items()],
                              tags=[RunTag("pipeline/status", status)])
        for path in files:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=MLFLOW_STATES[status])

    def log_collection(self, facts: RunFacts, out: Path) -> str:
        experiment = self._experiment()
        run_id = self.parent(experiment, facts) if facts.in_sweep else \
            self._find(experiment, {"pipeline/run_id": facts.point.run_id})
        if run_id is None:
            raise LookupError(f"{facts.point_dir} has no MLflow run yet: python -m pipeline.track sync it first")
        self.client.log_artifacts(run_id, str(out), artifact_path="collect")
        return f"run {run_id}, artifacts collect/"

    def end_sweep(self, facts: RunFacts, done: bool) -> Optional[str]:
        """The sweep's parent run, FINISHED once every point has ended (sync, collect --track)."""
        if not facts.in_sweep:
            return None
        parent = self.parent(self._experiment(), facts)
        self.client.update_run(parent, status="FINISHED" if done else "RUNNING")
        return parent


class WandbTracker(Tracker):
    """A point's W&B run: its id the point's run id, grouped by the sweep; its files under tracking.wandb.dir (null:
    the point's folder), online or offline (tracking.wandb.mode)."""

    name = "wandb"

    def __init__(self, config, point_dir: Path):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.wandb, self.config, self.point_dir = wandb, config, point_dir
        self.dir = Path(config.dir) if config.dir else point_dir
        self.run = None
        self.run_id: Optional[str] = None

    def open(self, facts: RunFacts) -> TrackedRun:
        c = self.config
        self.run_id = facts.point.run_id
        _, starts = known_run(facts, self.name)
        tags = facts.tags(restarts=max(starts - 1, 0))
        self.run = self.wandb.init(
            project=c.project, entity=c.entity, id=self.run_id, resume="allow", mode=c.mode, dir=str(self.dir),
            group=c.group or facts.point.sweep_id, job_type="train", name=facts.name, config=facts.params(),
            tags=[f"nodes={tags['nodes']}", f"sweep={facts.point.sweep_id}"],
            settings=self.wandb.Settings(console="off", x_disable_stats=True))
        self.run.summary.update(tags)
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        tracked = TrackedRun(run_id=self.run_id, where=f"{c.entity}/{c.project}" if c.entity else c.project,
                             starts=max(starts, 1))
        remember(facts.point_dir, self.name, tracked)
        return tracked

    def present(self) -> dict[str, set[int]]:
        return present_in_files(self.dir / WANDB_DIR, self.run_id)

    def log(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        for step, _, values in rows:
            self.run.log({STEP_KEY: step, **values})

    def end(self, status: str, figures: dict[str, float], files: list[Path]) -> None:
        self.run.summary.update({**figures, "pipeline/status": status})
        for path in files:
            for file in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]):
                if file.is_file():
                    self.run.save(str(file), base_path=str(self.point_dir), policy="now")
        if status == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if MLFLOW_STATES[status] == "FINISHED" else 1)


    def log_collection(self, facts: RunFacts, out: Path) -> str:
        c = self.config
        run_id = "collect-" + hashlib.sha1(str(facts.sweep_dir.resolve()).encode()).hexdigest()[:16]
        files = sorted(p for p in out.rglob("*") if p.is_file())
        run = self.wandb.init(project=c.project, entity=c.entity, id=run_id, resume="allow", mode=c.mode,
                              dir=str(Path(c.dir) if c.dir else facts.sweep_dir),
                              group=c.group or facts.point.sweep_id, job_type="collect",
                              name=f"collect {facts.point.sweep_id}", settings=self.wandb.Settings(console="off"))
        for file in files:
            run.save(str(file), base_path=str(out), policy="now")
        run.finish()
        return f"run {run_id} (group {c.group or facts.point.sweep_id})"


def history(folder: Path, run_id: str) -> list[dict[str, object]]:
    """Every history row W&B wrote of the run under `folder` (W&B's `wandb/`: each process's run files, online
    or offline), read with W&B's own reader of its transaction log (wandb.sdk.internal.datastore)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    rows = []
    for path in sorted(folder.glob(f"*-{run_id}/run-{run_id}.wandb")) + \
            sorted(folder.glob(f"*-{run_id}-*/run-{run_id}.wandb")):
        store = DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def present_in_files(folder: Path, run_id: str) -> dict[str, set[int]]:
    held: dict[str, set[int]] = {}
    for row in history(folder, run_id):
        if STEP_KEY in row:
            for key in row:
                if not key.startswith("_") and key != STEP_KEY:
                    held.setdefault(key, set()).add(int(row[STEP_KEY]))
    return held


def make_tracker(name: str, tracking: TrackingConfig, point_dir: Path) -> Tracker:
    kinds = {"mlflow": MlflowTracker, "wandb": WandbTracker}
    return kinds[name](getattr(tracking, name), point_dir)
