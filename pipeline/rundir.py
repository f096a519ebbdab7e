"""The run folder: every file the three programs exchange, its name and its type, in one place.

    launcher -> ranks       POINT_DIR/point.json     Point     the resolved config, frozen at launch, and its provenance
    rank 0   -> launcher    POINT_DIR/progress.json  Progress  latest step, samples/s and ETA (status, progress bar)
    rank 0   -> collector   POINT_DIR/result.json    Result    the result record, with a RankResult per rank
    launcher -> status      SWEEP_DIR/manifest.json  Manifest  each point's folder and its Slurm jobs
    holder   -> launches    POINT_DIR/.run.lock      LockHolder  who runs the point now (the file is flocked)
    a rank   -> launcher    POINT_DIR/logs/rank{R}.failed.json  Failure  a rank that raised, and when

Each file is a frozen dataclass with `to_json` (a JSON-ready dict) and `from_json` (which checks every field's
type and names the one it cannot use: `ranks[1].busy_time_median_s: expected a number, got str`). Writers,
readers and the tests' record factory all go through these classes, so a renamed field fails at once. Writes are
atomic (a temporary file renamed into place); durable ones also fsync the file and its folder.

Imports no torch: the launcher and the collector run on login nodes.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import stat
import tempfile
import time
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import orjson

# Version 1 is every record written since the project began; a reader for the old layout stays when it changes.
SCHEMA_VERSION = 1

POINT_NAME = "point.json"
PROGRESS_NAME = "progress.json"
RECORD_NAME = "result.json"
MANIFEST_NAME = "manifest.json"  # in the sweep folder
WEIGHTS_NAME = "model.pt"  # the trained model's state_dict (rank 0)
CHECKPOINT_NAME = "checkpoint.pt"  # on preemption / time limit, and every trainer.checkpoint_every steps
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"  # the one before, kept until the next is whole
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
RUN_LOCK_NAME = ".run.lock"  # held (flock) by whoever runs the folder's point: one run per folder
SUBMITIT_DIR = "submitit"  # cluster=slurm: submitit's script, pickles and the batch step's log
SBATCH_NAME = "job.sbatch"  # dry run: the script that would be submitted
# one log per rank, named alike in local debug mode and on Slurm: N the node's index in the job, R the global rank
LOG_DIR = "logs"
SRUN_LOG_PATTERN = "node%n-rank%t.log"  # srun's spelling of rank_log_path's name


def rank_log_path(point_dir: Path, node: int, rank: int) -> Path:
    return Path(point_dir) / LOG_DIR / f"node{node}-rank{rank}.log"


def failure_path(point_dir: Path, rank: int) -> Path:
    return Path(point_dir) / LOG_DIR / f"rank{rank}.failed.json"


def target_of(node: Any) -> str:
    """A config's `_target_`; `node` is a dict or a schema's dataclass."""
    return node["_target_"] if isinstance(node, dict) else node._target_


def target_name(node: Any) -> str:
    """How records name a model, dataset or optimizer: its `_target_`'s last part, lower case
    (`pipeline.workloads.models.MLP` -> `mlp`)."""
    return target_of(node).rsplit(".", 1)[-1].lower()


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


def remove_stray_temporaries(folder: Path) -> list[Path]:
    """The temporary files of writes that were interrupted (a kill between write_atomic's create and rename: a
    half checkpoint can be gigabytes), in the folder and its logs; called by the folder's new owner (it holds the
    folder's lock, so no write of its own is under way). Returns what it removed."""
    found = [p for d in (Path(folder), Path(folder) / LOG_DIR) for p in d.glob(".*.tmp") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def write_json(path: Path, data: Any, durable: bool = True) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=1).encode()), durable)


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


def _check_regular(st: os.stat_result, path: Path, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"not a regular file but {_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')}",
                      str(path))
    if st.st_size > limit:
        raise OSError(errno.EFBIG, f"{st.st_size} bytes, larger than the {limit} a reader takes", str(path))


class SchemaError(ValueError):
    """A file that does not match its dataclass; the message names the field."""

    def __init__(self, problem: str, path: list | None = None):
        self.problem, self.path = problem, path or []
        super().__init__(problem)

    def __str__(self) -> str:
        where = dotted(self.path)
        return f"{where}: {self.problem}" if where else self.problem


def dotted(path: list) -> str:
    """Where a value is, as a key: ["ranks", 1, "step_times_s"] -> ranks[1].step_times_s."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


class JsonFile:
    """Base of the files above: `to_json` / `from_json`, and `write` / `read` under the class's FILE name."""

    FILE: ClassVar[str]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any):
        """The dataclass, with every field's type checked; SchemaError names a missing or mistyped field."""
        return _decoder(cls)(data)

    def write(self, folder: Path, durable: bool = True) -> Path:
        path = Path(folder) / self.FILE
        write_json(path, self.to_json(), durable)
        return path

    @classmethod
    def read(cls, folder: Path):
        """Raises OSError when the file is missing or no regular file of a sane size (read_small), ValueError
        (SchemaError among them) when it is not usable."""
        return cls.from_json(parse_json(read_small(Path(folder) / cls.FILE)))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _exact(tp: type, name: str) -> Callable[[Any], Any]:
    def decode(value):
        if type(value) is not tp:
            raise SchemaError(f"expected {name}, got {_kind(value)}")
        return value
    return decode


def _number(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise SchemaError(f"expected a number, got {_kind(value)}")


def _numbers(value: Any) -> list:
    """A list of numbers, checked in C: records carry thousands of step times, and the collector reads 10,000
    records in under 2 s. fsum raises TypeError on anything that is not a number (bools pass, as 0 and 1)."""
    if type(value) is not list:
        raise SchemaError(f"expected a list of numbers, got {_kind(value)}")
    try:
        math.fsum(value)
    except TypeError:
        bad = next(i for i, v in enumerate(value) if type(v) not in (int, float))
        raise SchemaError(f"expected a number, got {_kind(value[bad])}", [bad]) from None
    return value


def _in_field(path_part: Any, decode: Callable[[Any], Any], value: Any) -> Any:
    try:
        return decode(value)
    except SchemaError as e:
        e.path.insert(0, path_part)
        raise


@functools.cache
def _decoder(tp: Any) -> Callable[[Any], Any]:
    """A function that checks a JSON value against the type `tp` and converts it; built once per type."""
    if tp is Any:
        return lambda value: value
    if tp is float:
        return _number
    if tp in (int, str, bool):
        return _exact(tp, {int: "an integer", str: "a string", bool: "true or false"}[tp])
    if dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        decode_inner = _decoder(inner)
        return lambda value: None if value is None else decode_inner(value)
    if origin is list:
        if args[0] is float:
            return _numbers
        item = _decoder(args[0])

        def decode_list(value):
            if type(value) is not list:
                raise SchemaError(f"expected a list, got {_kind(value)}")
            try:
                return [item(v) for v in value]
            except SchemaError:
                for i, v in enumerate(value):  # again, item by item, to name the one that failed
                    _in_field(i, item, v)
                raise
        return decode_list
    if origin is dict:
        key_type, item = args[0], _decoder(args[1])

        def decode_dict(value):
            if type(value) is not dict:
                raise SchemaError(f"expected an object, got {_kind(value)}")
            try:
                if key_type is int:  # JSON keys are strings; an int-keyed dict is written with str(key)
                    return {int(k): item(v) for k, v in value.items()}
                return {k: item(v) for k, v in value.items()}
            except SchemaError:
                for k, v in value.items():  # again, item by item, to name the one that failed
                    _in_field(k, item, v)
                raise
            except ValueError:  # int(k)
                raise SchemaError(f"expected integer keys, got {list(value)}") from None
        return decode_dict
    raise TypeError(f"no JSON decoder for {tp!r}")


def _dataclass_decoder(cls: type) -> Callable[[Any], Any]:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    decoders = [(f.name, _decoder(hints[f.name])) for f in fields]
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    factories = [(f.name, f.default_factory) for f in fields if f.default_factory is not dataclasses.MISSING]
    versioned = "schema_version" in defaults

    def decode(value):
        if type(value) is not dict:
            raise SchemaError(f"expected an object, got {_kind(value)}")
        if versioned and value.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(f"schema_version {value.get('schema_version')!r}, this reader reads {SCHEMA_VERSION}")
        missing = [name for name in required if name not in value]
        if missing:
            raise SchemaError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        try:
            values = {name: decode_field(value[name]) for name, decode_field in decoders if name in value}
        except SchemaError:
            for name, decode_field in decoders:  # again, field by field, to name the one that failed
                if name in value:
                    _in_field(name, decode_field, value[name])
            raise
        # The fields are checked, and these classes have no __post_init__: fill the instance directly, since a
        # frozen dataclass's __init__ sets each field through object.__setattr__, which is most of the cost of
        # reading 10,000 records.
        obj = object.__new__(cls)
        obj.__dict__.update({**defaults, **{name: make() for name, make in factories}, **values})
        return obj
    return decode


def parse_json(raw: bytes) -> Any:
    """A run file's JSON, finite numbers only: a NaN, an Infinity or a number beyond a double's range raises
    SchemaError naming where it is; other bad JSON, orjson's ValueError. (orjson: ~10x the standard library's
    speed on records' long lists of step times.)"""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            data = json.loads(raw)  # which reads NaN, Infinity and 1e999 (as inf): only to say where they are
        except ValueError:
            data = None
        found = non_finite(data)
        if found is None:
            raise
        path, value = found
        raise SchemaError(f"{json.dumps(value)} is not a finite number, which every number in a run file is",
                          path) from None


def non_finite(value: Any, path: list | None = None) -> tuple[list, float] | None:
    """(where, the value) of the first NaN or Infinity in plain data, or None."""
    path = path or []
    if type(value) is float and not math.isfinite(value):
        return path, value
    items = value.items() if type(value) is dict else enumerate(value) if type(value) is list else ()
    for key, item in items:
        found = non_finite(item, [*path, key])
        if found is not None:
            return found
    return None


RECORD_STATUSES = ("completed", "diverged")


def record_status(data: Any) -> str:
    """A record's `status`, read from its raw JSON before it is typed (a diverged run's record may lack figures
    a completed one has): "completed" or "diverged"; records from before the field existed are completed ones."""
    status = data.get("status", "completed") if type(data) is dict else "completed"
    if status not in RECORD_STATUSES:
        raise SchemaError(f"expected one of {', '.join(RECORD_STATUSES)}, got {status!r}", ["status"])
    return status


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
    launch_mode: str  # "local" | "slurm"
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
    loss: float
    updated_at: str
    updated_unix: float

    @classmethod
    def latest(cls, point_dir: Path) -> Optional["Progress"]:
        """The latest progress, or None before rank 0's first report (or if the file cannot be used)."""
        try:
            return cls.read(point_dir)
        except (OSError, ValueError):
            return None


@dataclass(frozen=True)
class TF32:
    matmul: bool
    cudnn: bool


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    type: str  # "cpu" | "cuda"
    name: str
    cuda: Optional[str] = None  # the CUDA and NCCL versions and TF32 settings, on GPUs only
    nccl: Optional[str] = None
    tf32: Optional[TF32] = None


@dataclass(frozen=True, kw_only=True)
class FastPath:
    data_on_device: bool
    channels_last: bool
    compile: bool
    pinned_memory: bool


@dataclass(frozen=True, kw_only=True)
class LoaderInfo:
    kind: str  # "memory": the split held in memory, batched by indexing | "dataloader": torch's DataLoader
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: Optional[int]


@dataclass(frozen=True, kw_only=True)
class ProbePoint:
    bytes: int  # the all-reduce's message
    time_s: float  # the slowest rank's median over the timed iterations
    algbw_gb_s: float  # bytes / time
    busbw_gb_s: float  # algbw x 2(n-1)/n, nccl-tests' bus bandwidth


@dataclass(frozen=True, kw_only=True)
class Fabric:
    """The job's own all-reduce, measured before training (pipeline.job.probe)."""

    backend: str
    world_size: int
    points: list[ProbePoint]
    seconds: float  # what the probe cost
    latency_us: Optional[float]  # fitted: per ring step
    bandwidth_gb_s: Optional[float]  # fitted: the bus bandwidth (None: no bandwidth term could be fitted)
    transport: Optional[str]  # NCCL's choice (nvlink, p2p, shm, infiniband, sockets), tcp for gloo


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """The trained model on the held-out split: the mean loss, and the metric that suits the task."""

    split: str
    samples: int
    loss: float  # the configured loss, averaged over target elements (tokens, for a language model)
    metric: str  # "accuracy" (a classifier), "perplexity" (a language model: exp(loss)) or "loss"
    value: float


@dataclass(frozen=True, kw_only=True)
class Segment:
    """Rank 0's throughput in a stretch of a run before a restart (after that stretch's own warm-up)."""

    start_step: int
    steps: int
    timed_steps: int
    throughput_samples_per_s: Optional[float]


@dataclass(frozen=True, kw_only=True)
class StepTime:
    mean: float
    median: float
    p95: float


@dataclass(frozen=True, kw_only=True)
class PhaseSplit:
    data: float
    compute: float
    comm: float


@dataclass(frozen=True, kw_only=True)
class RankResult:
    rank: int
    local_rank: int
    node_rank: int
    node_name: str  # the scheduler's name for the node (SLURMD_NODENAME), else the hostname
    device: str
    hostname: str
    processes_on_host: int
    host_cores: int
    threads: int
    oversubscribed: bool
    parameters_sha256: str  # of the final parameters: equal on every rank when DDP kept them in sync
    step_times_s: list[float]  # every timed step
    step_time_median_s: Optional[float]  # the timing figures are None when no step was timed
    busy_time_median_s: Optional[float]
    data_mean_s: Optional[float]
    compute_mean_s: Optional[float]
    comm_mean_s: Optional[float]


@dataclass(frozen=True)
class SlurmInfo:
    job_id: Optional[str]
    nodelist: Optional[str]
    simulated: bool  # local debug mode's made-up job


@dataclass(frozen=True, kw_only=True)
class Provenance:
    git: GitInfo
    hostnames: list[str]
    versions: dict[str, Optional[str]]
    slurm: Optional[SlurmInfo]  # None outside Slurm (torchrun, a single process)
    launched_at: str
    started_at: str
    first_step_at_unix: Optional[float]
    ended_at: str


@dataclass(frozen=True, kw_only=True)
class Result(JsonFile):
    """The result record: one per run, written by rank 0. `definitions` states how every figure is computed."""

    FILE: ClassVar[str] = RECORD_NAME
    schema_version: int = SCHEMA_VERSION
    run_id: str
    sweep_id: str
    point: int
    overrides: list[str]
    config: dict[str, Any]
    launch_mode: str
    model: str
    dataset: str
    nodes: int
    tasks_per_node: int
    world_size: int
    model_parameters: int
    gradient_bytes: int  # what DDP all-reduces every step
    device: DeviceInfo
    backend: str
    precision: str
    fast_path: FastPath
    scaling: str
    per_rank_batch: int
    global_batch: int
    steps: int
    steps_per_epoch: int
    warmup_steps: int
    resumed_from_step: int
    restart_count: int
    earlier_segments: list[Segment]
    timed_steps: int
    # the timing figures are None when no step was timed
    timed_wall_s: Optional[float] = None
    throughput_samples_per_s: Optional[float]
    throughput_per_rank_samples_per_s: Optional[float] = None
    step_time_s: Optional[StepTime]
    breakdown_s: Optional[PhaseSplit]
    breakdown_share: Optional[PhaseSplit]
    flops_per_sample: float
    achieved_tflops_per_device: Optional[float]
    peak_tflops_per_device: Optional[float]
    mfu: Optional[float]
    comm_measurement: str
    final_train_loss: float
    test_accuracy: Optional[float]  # a classifier's; None for other tasks (see evaluation)
    wall_time_s: float
    oversubscribed: bool
    weights: str
    ranks: list[RankResult]
    provenance: Provenance
    definitions: dict[str, str]
    # added since schema 1 began, so absent from the first records
    evaluation: Optional[Evaluation] = None
    loader: Optional[LoaderInfo] = None
    tokens_per_sample: Optional[int] = None  # a language model's tokens per sequence (tokens/s = this x samples/s)
    fabric: Optional[Fabric] = None  # the probe of a multi-rank job
    # rank 0's start-up: seconds from its process's start to ready (imports done), rendezvous, datasets, model,
    # trainer (DDP and all), probe, first_step
    startup: Optional[dict[str, float]] = None


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
        full = next((e for e in causes(error) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
        if full is not None:
            said = f"No space left on device{f' ({full.filename})' if full.filename else ''}: {said}"
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
                found.append(_decoder(Failure)(parse_json(read_small(path))))
            except (OSError, ValueError):
                continue
        return sorted(found, key=lambda f: f.at_unix)


def causes(error: BaseException) -> list[BaseException]:
    """An exception and the ones behind it (raised from, or during the handling of), each once."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


@dataclass(frozen=True)
class Submission:
    job_id: str  # what squeue and sacct call it: "123", or "123_4" for task 4 of job array 123
    submitted_at: str
    array_job_id: Optional[str] = None
    array_task_id: Optional[int] = None

    @classmethod
    def of(cls, job_id: str, submitted_at: str) -> "Submission":
        array, _, task = job_id.partition("_")
        return cls(job_id, submitted_at, array if task else None, int(task) if task else None)


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
    """Who holds a point folder's lock (POINT_DIR/.run.lock, flocked by its holder: pipeline/launcher/rundir_lock):
    written by the holder into the file it locks, read to say who is in the way."""

    FILE: ClassVar[str] = RUN_LOCK_NAME
    pid: int
    host: str
    since: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"
