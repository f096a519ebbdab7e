"""The run folder: every file the three programs exchange, its name and its type, in one place.

    launcher -> ranks       POINT_DIR/point.json     Point     the resolved config, frozen at launch, and its provenance
    rank 0   -> launcher    POINT_DIR/progress.json  Progress  latest step, samples/s and ETA (status, progress bar)
    rank 0   -> collector   POINT_DIR/result.json    Result    the result record (its types: pipeline.result)
    launcher -> status      SWEEP_DIR/manifest.json  Manifest  each point's folder and its Slurm jobs
    holder   -> launches    POINT_DIR/.run.lock      LockHolder  who runs the point now (the file is flocked)
    rank 0   -> launcher    SWEEP_DIR/bad-nodes.json BadNodes  nodes a health check found bad (health.on_bad=exclude)
    a rank   -> launcher    POINT_DIR/logs/rank{R}.failed.json  Failure  a rank that raised, and when
    launcher -> workers     SEARCH_DIR/search.json   SearchPlan  a search's base config, space and objectives
    worker   -> its restart SEARCH_DIR/workers/{K}/worker.json  WorkerState  its job and the trial it trains

Each file is a frozen dataclass with `to_json` (a JSON-ready dict) and `from_json` (which checks every field's
type and names the one it cannot use: `ranks[1].busy_time_median_s: expected a number, got str`). Writers,
readers and the tests' record factory all go through these classes, so a renamed field fails at once. Writes are
atomic (a temporary file renamed into place); durable ones also fsync the file and its folder.

Imports no torch: the launcher and the collector run on login nodes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import socket
import stat
import tempfile
import time
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import orjson

from pipeline.typed import SCHEMA_VERSION, SchemaError, decoder, dotted, encode


POINT_NAME = "point.json"
PROGRESS_NAME = "progress.json"
METRICS_NAME = "metrics.jsonl"  # rank 0's figures as the run reports them, a line each, appended across restarts
TRACKING_NAME = "tracking.json"  # the experiment trackers' runs of the point, kept across restarts
TRACKING_LOCK = ".tracking.lock"  # in a point's folder and its sweep's: one writer of tracking.json, one parent run
WANDB_DIR = "wandb"  # W&B's own files of the point's runs (tracking.wandb.dir: null)
RECORD_NAME = "result.json"
MANIFEST_NAME = "manifest.json"  # in the sweep folder
WEIGHTS_NAME = "model.pt"  # the trained model's state_dict (rank 0)
CHECKPOINT_NAME = "checkpoint.pt"  # on preemption / time limit, and every trainer.checkpoint_every steps
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"  # the one before, kept until the next is whole
# parallel=fsdp|hsdp: torch.distributed.checkpoint folders (one file per rank, .metadata, and CHECKSUMS_NAME, which
# rank 0 writes last: a folder without it is no checkpoint), renamed into place whole, the one before kept
SHARDED_CHECKPOINT_NAME = "checkpoint.dcp"
PREVIOUS_SHARDED_CHECKPOINT_NAME = "checkpoint.prev.dcp"
CHECKSUMS_NAME = "checksums.json"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
SEARCH_NAME = "search.json"  # a search's folder (search=optuna)
WORKERS_DIR = "workers"  # SEARCH_DIR/workers/<k>: each worker's state and heartbeat
TRIALS_DIR = "trials"  # SEARCH_DIR/trials/<number>: each trial, a point folder
WORKER_NAME = "worker.json"
TRIAL_NAME = "trial.json"  # in a trial's point folder: the search and trial it is, for its pruner
HEARTBEAT_NAME = "heartbeat"  # touched by a live worker: its mtime is its last sign of life
STUDY_JOURNAL_NAME = "study.journal"  # Optuna's journal file, where search.storage is not given
RUN_LOCK_NAME = ".run.lock"  # held (flock) by whoever runs the folder's point: one run per folder
SUBMITIT_DIR = "submitit"  # cluster=slurm: submitit's script, pickles and the batch step's log
SBATCH_NAME = "job.sbatch"  # dry run: the script that would be submitted
# one log per rank, named alike in local debug mode and on Slurm: N the node's index in the job, R the global rank
LOG_DIR = "logs"
SRUN_LOG_PATTERN = "node%n-rank%t.log"  # srun's spelling of rank_log_path's name
# in POINT_DIR/logs: a rank in a container stopped to be continued (it cannot requeue its job: no scontrol in an
# image); the batch script, on the host, requeues the job when it finds this job's and restart's mark
REQUEUE_MARK = ".requeue-{job}-{restart}"
# in every local-mode rank's environment: the launcher whose death the rank follows (pipeline.lifeline)
LAUNCHER_PID_VAR = "PIPELINE_LAUNCHER_PID"


def rank_log_path(point_dir: Path, node: int, rank: int) -> Path:
    return Path(point_dir) / LOG_DIR / f"node{node}-rank{rank}.log"


def failure_path(point_dir: Path, rank: int) -> Path:
    return Path(point_dir) / LOG_DIR / f"rank{rank}.failed.json"


def utc_now() -> str:
    """Timestamps in every file: ISO 8601, UTC, milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ------------------------------------------------------------------------------------------------- writing
def write_atomic(path: Path, write: Callable[[typing.BinaryIO], None], durable: bool = True,
                 previous: Path | None = None) -> None:
    """Call `write` on a temporary file beside `path`, then rename it into place: readers and the next run never
    see half a file. `durable` also fsyncs the file before the rename and the folder after it, so a crash cannot
    leave an empty or missing file either (progress updates skip that cost). With `previous`, the file being
    replaced is kept there, once the new one is whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def finite(data: Any, path: list | None = None) -> tuple[Any, list[tuple[list, float]]]:
    """`data` with every NaN or infinite float replaced by None (JSON has no such numbers: a reader that follows
    the standard rejects `NaN`), and (where, the value) of each."""
    path = path or []
    if isinstance(data, float):
        return (data, []) if math.isfinite(data) else (None, [(path, data)])
    if isinstance(data, dict):
        pairs = [(k, finite(v, [*path, k])) for k, v in data.items()]
        return {k: v for k, (v, _) in pairs}, [f for _, (_, found) in pairs for f in found]
    if isinstance(data, (list, tuple)):
        items = [finite(v, [*path, i]) for i, v in enumerate(data)]
        return [v for v, _ in items], [f for _, found in items for f in found]
    return data, []


def non_finite(data: Any) -> tuple[list, float] | None:
    """(where, the value) of the first NaN or Infinity in plain data, or None."""
    found = finite(data)[1]
    return found[0] if found else None


def write_json(path: Path, data: Any, durable: bool = True) -> list[str]:
    """Write `data` as strict JSON (no NaN or Infinity: those become null). Returns where any non-finite number was,
    for the writer to say so."""
    data, replaced = finite(data)
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=1, allow_nan=False).encode()), durable)
    return [dotted(where) for where, _ in replaced]


def remove_stray_temporaries(folder: Path) -> list[Path]:
    """The temporary files of writes that were interrupted (a kill between write_atomic's create and rename: a
    half checkpoint can be gigabytes), in the folder and its logs; called by the folder's new owner (it holds the
    folder's lock, so no write of its own is under way). Returns what it removed."""
    found = [p for d in (Path(folder), Path(folder) / LOG_DIR) for p in d.glob(".*.tmp") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


# ------------------------------------------------------------------------------------------------- reading
# The readers (collect, status, the launcher) read whatever anyone left in a run folder: at most this much of a file.
# A record holds every timed step of every rank: 100,000 steps x 64 ranks is about 130 MB.
MAX_FILE_BYTES = 256 * 2**20
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def read_small(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes, at most `limit` of them. Anything else raises OSError saying what it is, without
    reading it: a FIFO would block the reader forever, a device (a link to /dev/zero) or a huge file would fill
    its memory."""
    _check_regular(os.stat(path), path, limit)  # before opening: opening some devices has effects
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # should it have become a FIFO: no wait
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        _check_regular(st, path, limit)
        data = f.read(st.st_size + 1)  # not `limit`: a read allocates what it is asked for
    if len(data) > st.st_size:
        raise OSError(errno.EAGAIN, "it grew while it was read", str(path))
    return data


def special_kind(path: Path) -> str | None:
    """What a path is when it is no regular file (following links): "a FIFO", "a socket", "a character device", ...;
    None for a regular file. Reading a FIFO blocks until someone writes to it."""
    mode = os.stat(path).st_mode
    return None if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "a special file")


def _check_regular(st: os.stat_result, path: Path, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"not a regular file but {_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')}",
                      str(path))
    if st.st_size > limit:
        raise OSError(errno.EFBIG, f"{st.st_size} bytes, larger than the {limit} a reader takes", str(path))


class JsonFile:
    """Base of the files above: `to_json` / `from_json`, and `write` / `read` under the class's FILE name."""

    FILE: ClassVar[str]

    def to_json(self) -> dict:
        return encode(self)

    @classmethod
    def from_json(cls, data: Any):
        """The dataclass, with every field's type checked; SchemaError names a missing or mistyped field."""
        return decoder(cls)(data)

    def write(self, folder: Path, durable: bool = True) -> Path:
        path = Path(folder) / self.FILE
        replaced = write_json(path, self.to_json(), durable)
        if replaced:
            logging.getLogger(__name__).warning("%s: non-finite numbers written as null: %s", path,
                                                ", ".join(replaced[:10]))
        return path

    @classmethod
    def read(cls, folder: Path):
        """Raises OSError when the file is missing or no regular file of a sane size (read_small), ValueError
        (SchemaError among them) when it is not usable."""
        return cls.from_json(parse_json(read_small(Path(folder) / cls.FILE)))


def parse_json(raw: bytes) -> Any:
    """A run file's JSON, finite numbers only: a NaN, an Infinity or a number beyond a double's range raises
    SchemaError naming where it is; other bad JSON, orjson's ValueError. (orjson: ~10x the standard library's
    speed on records' long lists of step times.)"""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            data = json.loads(raw)  # which reads NaN, Infinity and 1e999 (as inf): only to say where they are
        except (ValueError, RecursionError):  # RecursionError: nested deeper than its stack (orjson stops at 1024)
            data = None
        found = non_finite(data)
        if found is None:
            raise
        path, value = found
        raise SchemaError(f"{json.dumps(value)} is not a finite number, which every number in a run file is",
                          path) from None


# The record's status, read from its raw JSON by those that need no more of it (the launcher, status): its types are
# pipeline.result's.
RECORD_STATUSES = ("completed", "diverged", "pruned", "incomplete")


def record_status(data: Any) -> str:
    """A record's `status`, read from its raw JSON before it is typed (a diverged run's record may lack figures
    a completed one has): "completed", "diverged", "pruned" (a search's trial its pruner stopped) or "incomplete"
    (trained to the end, but its weights could not be written); records from before the field existed are
    completed ones."""
    status = data.get("status", "completed") if type(data) is dict else "completed"
    if status not in RECORD_STATUSES:
        raise SchemaError(f"expected one of {', '.join(RECORD_STATUSES)}, got {status!r}", ["status"])
    return status


def diverged_at(point_dir: Path) -> int | None:
    """The step a point's run diverged at, when its record says it did; None otherwise (or without a record)."""
    try:
        data = parse_json(read_small(Path(point_dir) / RECORD_NAME))
        return data.get("diverged_at_step", -1) if record_status(data) == "diverged" else None
    except (OSError, ValueError):
        return None


# -------------------------------------------------------------------------------------------- the files
@dataclass(frozen=True)
class GitInfo:
    sha: Optional[str]  # None outside a git checkout
    dirty: Optional[bool]  # uncommitted changes to tracked files


@dataclass(frozen=True, kw_only=True)
class Point(JsonFile):
    """What `launch` freezes for the ranks of one sweep point: the resolved config and where it came from."""

    FILE: ClassVar[str] = POINT_NAME
    schema_version: int = SCHEMA_VERSION
    run_id: str
    sweep_id: str
    point: int  # the point's index in its sweep (Hydra's job number)
    overrides: list[str]
    launch_mode: str  # "local" | "slurm" | "torchrun"
    launched_at: str
    launch_host: str
    launch_argv: list[str]
    git: GitInfo
    config: dict[str, Any]  # the resolved RunConfig as plain data (pipeline.config.to_plain)
    sweep_dir: Optional[str] = None  # the sweep's folder (a single run's is its own), where TensorBoard runs go


@dataclass(frozen=True, kw_only=True)
class Progress(JsonFile):
    """Rank 0's latest position, rewritten every trainer.log_every steps."""

    FILE: ClassVar[str] = PROGRESS_NAME
    step: int
    total_steps: int
    samples_per_s: float
    eta_s: float
    loss: Optional[float]  # None once the loss is not finite (the run diverged)
    updated_at: str
    updated_unix: float

    @classmethod
    def latest(cls, point_dir: Path) -> Optional["Progress"]:
        """The latest progress, or None before rank 0's first report (or if the file cannot be used)."""
        try:
            return cls.read(point_dir)
        except (OSError, ValueError):
            return None


@dataclass(frozen=True, kw_only=True)
class Failure:
    """Written by a rank the moment it raises, before it tears anything down, so the rank that failed first can
    be told from the ranks that failed because it did (whose errors, and often exits, come later)."""

    rank: int
    node_rank: int
    at_unix: float
    error: str  # the exception's type and message

    @classmethod
    def of(cls, error: BaseException, rank: int, node_rank: int, silent: typing.Sequence[int] = ()) -> "Failure":
        """A rank's failure now. What is behind it is said first: a full disk, which what it raises can hide
        (torch.save's "[enforce fail at inline_container.cc] unexpected pos", with the OSError down its chain);
        the `silent` ranks, which stopped answering while this one waited for them (pipeline.job.heartbeat)."""
        said = f"{type(error).__name__}: {error}"
        reason = write_failure(error)
        if reason is not None:
            said = f"{reason}: {said}"
        if silent:
            said = (f"rank(s) {', '.join(map(str, silent))} stopped answering (no heartbeat): it did not arrive, "
                    f"and this rank timed out waiting: {said}")
        return cls(rank=rank, node_rank=node_rank, at_unix=time.time(), error=said[:2000])

    def write(self, point_dir: Path) -> None:
        path = failure_path(point_dir, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)  # torchrun and plain srun runs have no log folder of ours
        write_json(path, dataclasses.asdict(self), durable=False)

    @staticmethod
    def read_all(point_dir: Path) -> list["Failure"]:
        """The failures of the point's current attempt (each rank clears its own when it starts), earliest first."""
        found = []
        for path in (Path(point_dir) / LOG_DIR).glob("rank*.failed.json"):
            try:
                found.append(decoder(Failure)(parse_json(read_small(path))))
            except (OSError, ValueError):
                continue
        return sorted(found, key=lambda f: f.at_unix)


WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO)


def write_failure(error: BaseException) -> str | None:
    """The OS's reason a write failed, found down an exception's chain ("No space left on device (PATH)", "Read-only
    file system"), which what it raises can hide (torch.save's "[enforce fail at inline_container.cc] unexpected
    pos"); None when no such OSError is behind it."""
    found = next((e for e in causes(error) if isinstance(e, OSError) and e.errno in WRITE_ERRORS), None)
    if found is None:
        return None
    return f"{found.strerror or os.strerror(found.errno)}{f' ({found.filename})' if found.filename else ''}"


def causes(error: BaseException) -> list[BaseException]:
    """An exception and the ones behind it (raised from, or during the handling of), each once."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


@dataclass(frozen=True)
class RankStart:
    """Local debug mode: the launcher asks its fork server (pipeline/launcher/forkserver.py) for one rank of a point,
    with the rank's variables; the write end of the rank's output pipe comes with the message (SCM_RIGHTS). One
    message each way on a SOCK_SEQPACKET socket: this, then the rank's pid (or the error that stopped its fork)."""

    point_dir: str
    env: dict[str, str]
    MAX_BYTES: ClassVar[int] = 1 << 20

    def send(self, sock: socket.socket, output_fd: int) -> None:
        socket.send_fds(sock, [json.dumps(encode(self)).encode()], [output_fd])

    @classmethod
    def receive(cls, sock: socket.socket) -> Optional[tuple["RankStart", int]]:
        """The request and the output pipe's fd, or None once the launcher has closed its end."""
        message, fds, _, _ = socket.recv_fds(sock, cls.MAX_BYTES, 1)
        return (decoder(cls)(json.loads(message)), fds[0]) if message and fds else None


@dataclass(frozen=True)
class Submission:
    job_id: str  # what squeue and sacct call it: "123", or "123_4" for task 4 of job array 123
    submitted_at: str
    array_job_id: Optional[str] = None
    array_task_id: Optional[int] = None
    left_out: list[str] = field(default_factory=list)  # the nodes it was kept off (sbatch --exclude)

    @classmethod
    def of(cls, job_id: str, submitted_at: str, left_out: list[str] | None = None) -> "Submission":
        array, _, task = job_id.partition("_")
        return cls(job_id, submitted_at, array if task else None, int(task) if task else None, left_out or [])


@dataclass(frozen=True)
class ManifestPoint:
    dir: Optional[str]  # relative to the sweep folder; None for a point that was never started
    overrides: list[str]
    nodes: Optional[int]
    jobs: list[Submission]  # every submission, the latest last
    skipped: Optional[str] = None  # why the point was not submitted (allow_partial=true)


@dataclass(frozen=True, kw_only=True)
class Manifest(JsonFile):
    """Which point went where, as which Slurm job, when; written as each point is submitted."""

    FILE: ClassVar[str] = MANIFEST_NAME
    schema_version: int = SCHEMA_VERSION
    points: dict[int, ManifestPoint] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LockHolder(JsonFile):
    """Who holds a point folder's lock (POINT_DIR/.run.lock, flocked by its holder: pipeline/runlock):
    written by the holder into the file it locks, read to say who is in the way."""

    FILE: ClassVar[str] = RUN_LOCK_NAME
    pid: int
    host: str
    since: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"


# ------------------------------------------------------------------------------------------ the bad-node list
BAD_NODES_NAME = "bad-nodes.json"  # in the sweep folder
BAD_NODES_LOCK = ".bad-nodes.lock"


@dataclass(frozen=True, kw_only=True)
class BadNodeEntry:
    """A node a job's health check found bad, on its sweep's list (health.on_bad=exclude)."""

    node: str
    reason: str
    job_id: Optional[str]  # the job that found it (local debug mode: its simulated job)
    run_id: str
    point: int
    at: str
    simulated: bool  # a node of local debug mode: this machine, never given to Slurm's --exclude


@dataclass(frozen=True, kw_only=True)
class BadNodes(JsonFile):
    """SWEEP_DIR/bad-nodes.json: the nodes the sweep's health checks found bad; the launcher and `status` leave
    them out of every later submission into the sweep. Written under SWEEP_DIR/.bad-nodes.lock
    (pipeline.badnodes)."""

    FILE: ClassVar[str] = BAD_NODES_NAME
    schema_version: int = SCHEMA_VERSION
    entries: list[BadNodeEntry] = field(default_factory=list)

    def slurm_nodes(self) -> list[str]:
        """The real Slurm nodes on the list (local debug mode's simulated ones left out), each once."""
        return sorted({e.node for e in self.entries if not e.simulated})

    def of_job(self, job_id: str | None) -> list[BadNodeEntry]:
        return [e for e in self.entries if job_id is not None and e.job_id == job_id]


# ------------------------------------------------------------------------------------------ reported figures
@dataclass(frozen=True, kw_only=True)
class MetricsRow:
    """A line of POINT_DIR/metrics.jsonl: rank 0's figures after `step` steps (the training's, every
    trainer.log_every steps; an evaluation's), as TensorBoard gets them. `segment` names the process that wrote
    it, which began training at `start_step`: a restart trains the steps after its checkpoint again, and its lines
    supersede the earlier ones of those steps (read_metrics)."""

    step: int
    segment: str
    start_step: int
    unix: float
    values: dict[str, Optional[float]]  # null: not finite (a diverging loss)

    def line(self) -> bytes:
        values = {k: v if v is not None and math.isfinite(v) else None for k, v in self.values.items()}
        return orjson.dumps(encode(dataclasses.replace(self, values=values))) + b"\n"


def read_metric_rows(point_dir: Path) -> list[MetricsRow]:
    """The lines that stand, in the order written: a segment's lines drop the earlier segments' lines of the steps
    after its start_step (trained again); a line that does not read (cut short by a kill) is skipped. Empty without
    the file."""
    try:
        raw = read_small(Path(point_dir) / METRICS_NAME)
    except FileNotFoundError:
        return []
    rows: list[MetricsRow] = []
    for line in raw.splitlines():
        try:
            row = decoder(MetricsRow)(parse_json(line))
        except ValueError:
            continue
        if rows and row.segment != rows[-1].segment:
            rows = [r for r in rows if r.step <= row.start_step]
        rows.append(row)
    return rows


def read_metrics(point_dir: Path) -> dict[int, dict[str, Optional[float]]]:
    """Each step's figures once, in step order (read_metric_rows)."""
    steps: dict[int, dict[str, Optional[float]]] = {}
    for row in read_metric_rows(point_dir):
        steps.setdefault(row.step, {}).update(row.values)
    return dict(sorted(steps.items()))


# ------------------------------------------------------------------------------------------------ tracking
@dataclass(frozen=True, kw_only=True)
class TrackedRun:
    """The run a tracker keeps of a point: chosen at the point's first start, continued by every restart."""

    run_id: str  # MLflow's (its server gives it) or W&B's (the point's run id)
    where: str  # MLflow: the tracking URI; W&B: entity/project
    parent_run_id: Optional[str] = None  # MLflow: the sweep's parent run
    starts: int = 1  # the point's trainings that have logged to it: a requeue, a resubmission, a relaunch add one


@dataclass(frozen=True, kw_only=True)
class TrackedRuns(JsonFile):
    """POINT_DIR/tracking.json: the point's run in each tracker (tracking=[mlflow,wandb]), so that a requeue, a
    resubmission and a relaunch that resumes all log to the same one, and `pipeline.track sync` finds it."""

    FILE: ClassVar[str] = TRACKING_NAME
    schema_version: int = SCHEMA_VERSION
    runs: dict[str, TrackedRun] = field(default_factory=dict)  # by tracker: "mlflow", "wandb"

    @classmethod
    def of(cls, point_dir: Path) -> "TrackedRuns":
        """The point's tracked runs; none before its first start. A file that cannot be used raises (OSError,
        ValueError): it is not replaced, for it names runs a new one would fork from."""
        if not (Path(point_dir) / cls.FILE).exists():
            return cls()
        return cls.read(point_dir)


# ------------------------------------------------------------------------------------------------- a search
@dataclass(frozen=True, kw_only=True)
class SearchParam:
    """One parameter of a search's space (pipeline.search.space.Param, as search.json keeps it)."""

    name: str
    type: str  # "float" | "int" | "categorical"
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list[Any]] = None


@dataclass(frozen=True, kw_only=True)
class SearchPlan(JsonFile):
    """SEARCH_DIR/search.json: what the launch of a search (search=optuna) fixed for its workers."""

    FILE: ClassVar[str] = SEARCH_NAME
    schema_version: int = SCHEMA_VERSION
    config: dict[str, Any]  # every trial's config before its parameters are set (search: the search's own)
    overrides: list[str]
    space: list[SearchParam]
    objectives: list[str]  # the record's figures (pipeline.objective)
    directions: list[str]  # "minimize" | "maximize", one per objective
    storage: str  # Optuna's storage: a database URL, or the journal file's path
    study: str
    launch_mode: str  # "local" | "slurm"


@dataclass(frozen=True, kw_only=True)
class TrialRef(JsonFile):
    """POINT_DIR/trial.json in a search's trial: the search (its search.json names the study) and the trial's
    number, so that the trial's rank 0 reports its evaluations to the study and asks its pruner."""

    FILE: ClassVar[str] = TRIAL_NAME
    search_dir: str
    number: int
    starts: int = 1  # the trial's runs so far, this one included: its restarts are one fewer


@dataclass(frozen=True, kw_only=True)
class WorkerState(JsonFile):
    """SEARCH_DIR/workers/<k>/worker.json: the worker's job, and the trial it trains (null between trials), which
    its requeued job resumes."""

    FILE: ClassVar[str] = WORKER_NAME
    worker: int
    job_id: Optional[str]  # Slurm's (an array task: "123_4"); None in local debug mode
    host: str
    pid: int
    trial: Optional[int] = None
    started_trials: list[int] = field(default_factory=list)
