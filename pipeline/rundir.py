"""The run folder: every file the three programs exchange, its name and its type, in one place.

    launcher -> ranks       POINT_DIR/point.json     Point     the resolved config, frozen at launch, and its provenance
    rank 0   -> launcher    POINT_DIR/progress.json  Progress  latest step, samples/s and ETA (status, progress bar)
    rank 0   -> collector   POINT_DIR/result.json    Result    the result record, with a RankResult per rank
    launcher -> status      SWEEP_DIR/manifest.json  Manifest  each point's folder and its Slurm jobs
    holder   -> launches    POINT_DIR/.run.lock      LockHolder  who runs the point now (the file is flocked)
    rank 0   -> launcher    SWEEP_DIR/bad-nodes.json BadNodes  nodes a health check found bad (health.on_bad=exclude)
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
import json
import logging
import math
import os
import stat
import tempfile
import time
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import orjson

from pipeline.typed import SCHEMA_VERSION, SchemaError, decoder, dotted, encode, flat


POINT_NAME = "point.json"
PROGRESS_NAME = "progress.json"
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
RUN_LOCK_NAME = ".run.lock"  # held (flock) by whoever runs the folder's point: one run per folder
SUBMITIT_DIR = "submitit"  # cluster=slurm: submitit's script, pickles and the batch step's log
SBATCH_NAME = "job.sbatch"  # dry run: the script that would be submitted
# one log per rank, named alike in local debug mode and on Slurm: N the node's index in the job, R the global rank
LOG_DIR = "logs"
SRUN_LOG_PATTERN = "node%n-rank%t.log"  # srun's spelling of rank_log_path's name
# in every local-mode rank's environment: the launcher whose death the rank follows (pipeline.job.lifeline)
LAUNCHER_PID_VAR = "PIPELINE_LAUNCHER_PID"
# torchrun without a launch: rank 0 tells the others, through the rendezvous store, where it froze the point (or
# the configuration error it found, after ERROR_PREFIX)
POINT_STORE_KEY = "pipeline/point_dir"
ERROR_PREFIX = "error:"


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
        except ValueError:
            data = None
        found = non_finite(data)
        if found is None:
            raise
        path, value = found
        raise SchemaError(f"{json.dumps(value)} is not a finite number, which every number in a run file is",
                          path) from None


RECORD_STATUSES = ("completed", "diverged")


def record_status(data: Any) -> str:
    """A record's `status`, read from its raw JSON before it is typed (a diverged run's record may lack figures
    a completed one has): "completed" or "diverged"; records from before the field existed are completed ones."""
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
    cudnn_benchmark: bool = False  # added since schema 1 began
    prefetch: bool = False  # the next batch copied to the GPU on a side stream while this one trains


@dataclass(frozen=True, kw_only=True)
class LoaderInfo:
    kind: str  # "memory": the split held in memory, batched by indexing | "dataloader": torch's DataLoader
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: Optional[int]


@dataclass(frozen=True, kw_only=True)
class ProbePoint:
    bytes: int  # the message, nccl-tests' size (an all-gather's output, a reduce-scatter's input)
    time_s: float  # the slowest rank's median over the timed iterations
    algbw_gb_s: float  # bytes / time
    busbw_gb_s: float  # algbw x 2(n-1)/n for an all-reduce, x (n-1)/n for the others: nccl-tests' bus bandwidth


@dataclass(frozen=True, kw_only=True)
class CollectiveProbe:
    """One of FSDP's collectives, measured before training on the group FSDP issues it on (pipeline.job.probe);
    its points' busbw = algbw x (n-1)/n for an all-gather or a reduce-scatter (nccl-tests'), 2(n-1)/n for an
    all-reduce."""

    op: str  # "all_gather" | "reduce_scatter" | "all_reduce"
    group: str  # "shard" | "replicate"
    ranks: int
    points: list[ProbePoint]
    latency_us: Optional[float]  # fitted: per ring step
    bandwidth_gb_s: Optional[float]  # fitted: the bus bandwidth


@dataclass(frozen=True, kw_only=True)
class Fabric:
    """The job's own all-reduce, measured before training (pipeline.job.probe), and a sharded job's collectives."""

    backend: str
    world_size: int
    points: list[ProbePoint]
    seconds: float  # what the probe cost
    latency_us: Optional[float]  # fitted: per ring step
    bandwidth_gb_s: Optional[float]  # fitted: the bus bandwidth (None: no bandwidth term could be fitted)
    transport: Optional[str]  # NCCL's choice (nvlink, p2p, shm, infiniband, sockets), tcp for gloo
    collectives: list[CollectiveProbe] = field(default_factory=list)  # parallel=fsdp|hsdp (added since schema 1)
    # the network interface(s) between nodes: NCCL's choice from its INFO log (`mlx5_0:1`, `eth0`), or for gloo
    # GLOO_SOCKET_IFNAME where set; None where it cannot be told (added since schema 1 began)
    interface: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """The trained model on the held-out split: the mean loss, and the metric that suits the task."""

    split: str
    samples: int
    loss: float  # the configured loss, averaged over target elements (tokens, for a language model)
    metric: str  # "accuracy" (a classifier), "perplexity" (a language model: exp(loss)) or "loss"
    value: float


@dataclass(frozen=True, kw_only=True)
class ModelIOInfo:
    """How batches met the model (pipeline.job.model_io), in words."""

    batch: str  # "(input, target) pairs", or the keys of mapping items
    logits: Optional[str]  # where the logits were read from the model's output (None: it gave none)
    loss: str  # the configured loss on the logits, or the model's own and how it was given the targets


@dataclass(frozen=True, kw_only=True)
class ParamGroupInfo:
    parameters: int
    tensors: int
    lr: float
    weight_decay: float


@dataclass(frozen=True, kw_only=True)
class OptimizerInfo:
    name: str  # the optimizer's class
    groups: list[ParamGroupInfo]


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
class HostShare:
    """A rank's share of its host (pipeline.job.placement)."""

    hostname: str
    processes_on_host: int  # the job's ranks on this machine (counted by the kernel's boot id)
    host_cores: int
    threads: int
    oversubscribed: bool
    # added since schema 1 began: what explains a slow rank (pipeline.job.placement)
    machine: Optional[str] = None  # the kernel's boot id, shortened: Slurm nodes that share one share a machine
    cpus: Optional[str] = None  # the CPUs the rank may run on (its affinity), as a list such as 0-3,8-11
    cpu_numa_nodes: Optional[list[int]] = None  # the NUMA nodes of those CPUs
    gpu_numa_node: Optional[int] = None  # the NUMA node of the rank's GPU (None: no GPU, or not readable)
    binding: Optional[str] = None  # what is wrong with the rank's binding, if anything (a CPU on another NUMA node)


@dataclass(frozen=True, kw_only=True)
class RankTiming:
    """One rank's step timings over its timed steps (pipeline.job.timing); None when no step was timed."""

    step_times_s: list[float]  # every timed step
    step_time_median_s: Optional[float]
    busy_time_median_s: Optional[float]
    data_mean_s: Optional[float]
    compute_mean_s: Optional[float]
    comm_mean_s: Optional[float]


@dataclass(frozen=True, kw_only=True)
class Memory:
    """What one rank holds (pipeline.job.memory). The state is counted from the tensors' local shards (exact):
    parameters, their gradients and the optimizer's state, each tensor once (a tied weight is one)."""

    parameter_bytes: int
    gradient_bytes: int  # at the end of training, the last step's gradients (as the optimizer stepped on them)
    optimizer_bytes: int
    state_bytes: int  # the three together
    sharded_bytes: int  # the part of the state split over the shard group (FSDP's DTensor shards; DDP: 0)
    peak_bytes: Optional[int]  # CUDA: peak allocated; CPU: the process's peak resident set (RSS)
    peak_reserved_bytes: Optional[int]  # CUDA: peak reserved by the caching allocator; None on a CPU
    baseline_bytes: Optional[int]  # CPU: the resident set before the model was built (imports, data); None on CUDA
    device_bytes: Optional[int]  # CUDA: the device's memory; CPU: the host's memory / the ranks on the host
    peak_kind: str  # "cuda_allocated" | "cpu_rss"


@dataclass(frozen=True, kw_only=True)
class CollectiveVolume:
    """One kind of collective of a training step, per optimizer step, with nccl-tests' sizes (all-gather: its
    output, reduce-scatter: its input, all-reduce: its buffer)."""

    op: str  # "all_reduce" | "all_gather" | "reduce_scatter"
    group: str  # "world" | "shard" (FSDP's and HSDP's sharding group) | "replicate" (HSDP's across replicas)
    ranks: int  # the group's size
    calls: int
    bytes: int


@dataclass(frozen=True, kw_only=True)
class ParallelInfo:
    """How the model was spread over the ranks (pipeline.job.parallel)."""

    kind: str  # "ddp" | "fsdp" | "hsdp"
    shard_ranks: int  # the ranks a sharded tensor is split over (DDP: 1)
    replicas: int  # copies of each shard (DDP: every rank; FSDP: 1; HSDP: the replica groups)
    blocks: int  # the repeated blocks found (FSDP shards each as a group; activation checkpointing wraps each)
    block_classes: list[str]
    param_dtype: str  # the dtype blocks computed in
    reduce_dtype: str
    reshard_after_forward: Optional[bool]  # None under DDP
    activation_checkpointing: bool
    collectives: list[CollectiveVolume]  # planned from the groups' sizes (the forecast's input)
    # rank 0's collectives as FSDP issued them, per timed step (CPU, where they are timed; None elsewhere)
    measured: Optional[list[CollectiveVolume]] = None


@dataclass(frozen=True, kw_only=True)
class RankResult:
    rank: int
    local_rank: int
    node_rank: int
    node_name: str  # the scheduler's name for the node (SLURMD_NODENAME), else the hostname
    device: str
    host: HostShare = flat()
    parameters_sha256: str  # of the final parameters: equal on every rank when DDP kept them in sync (FSDP: shards)
    timing: RankTiming = flat()
    memory: Optional[Memory] = None  # added since schema 1 began


@dataclass(frozen=True, kw_only=True)
class RunTiming:
    """The job-wide timing figures, from every rank's (pipeline.job.timing); None when no step was timed."""

    timed_steps: int
    timed_wall_s: Optional[float] = None
    throughput_samples_per_s: Optional[float]
    throughput_per_rank_samples_per_s: Optional[float] = None
    step_time_s: Optional[StepTime]
    breakdown_s: Optional[PhaseSplit]
    breakdown_share: Optional[PhaseSplit]


@dataclass(frozen=True, kw_only=True)
class Utilisation:
    """FLOPs and model FLOPs utilisation (pipeline.job.flops)."""

    flops_per_sample: Optional[float]  # None when counting failed (see missing)
    achieved_tflops_per_device: Optional[float]
    peak_tflops_per_device: Optional[float]
    mfu: Optional[float]


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
    timing: RunTiming = flat()
    utilisation: Utilisation = flat()
    comm_measurement: str
    final_train_loss: Optional[float]  # None when it was not finite (status diverged)
    test_accuracy: Optional[float]  # a classifier's; None for other tasks (see evaluation)
    wall_time_s: float
    oversubscribed: bool
    weights: Optional[str]  # the weights' file in the run folder; None when they were not saved (see missing)
    ranks: list[RankResult]
    provenance: Provenance
    definitions: dict[str, str]
    # added since schema 1 began, so absent from the first records
    evaluation: Optional[Evaluation] = None
    loader: Optional[LoaderInfo] = None
    tokens_per_sample: Optional[int] = None  # a language model's tokens per sequence (tokens/s = this x samples/s)
    fabric: Optional[Fabric] = None  # the probe of a multi-rank job
    health: Optional[Health] = None  # the check of a multi-node job's nodes, before training
    # rank 0's start-up: seconds from its process's start to ready (imports done), rendezvous, datasets, model,
    # trainer (DDP and all), probe, first_step
    startup: Optional[dict[str, float]] = None
    status: str = "completed"  # or "diverged": the loss stopped being finite at diverged_at_step
    diverged_at_step: Optional[int] = None
    missing: dict[str, str] = field(default_factory=dict)  # a figure or file not produced, and why
    model_label: Optional[str] = None  # the model as people name it: its class and size (GPT2LMHeadModel 2x64)
    io: Optional[ModelIOInfo] = None
    optimizer: Optional[OptimizerInfo] = None
    # how the model was spread over the ranks (None: records from before, all DDP), and the step's batch: micro-batch
    # x grad_accum_steps = per_rank_batch (None: records from before, one micro-batch per step)
    parallel: Optional[ParallelInfo] = None
    micro_batch: Optional[int] = None
    grad_accum_steps: int = 1


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
                found.append(decoder(Failure)(parse_json(read_small(path))))
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
class WarmStart:
    """Local debug mode's head start: the launcher starts a rank before it has composed the config (the rank imports
    torch meanwhile), then sends it its point and its variables, one JSON line on the rank's stdin."""

    point_dir: str
    env: dict[str, str]

    def send(self, stream: typing.TextIO) -> None:
        stream.write(json.dumps(encode(self)) + "\n")
        stream.close()

    @classmethod
    def receive(cls, stream: typing.TextIO) -> Optional["WarmStart"]:
        """The launcher's message, or None when it closed the stream unsent (it did not need this rank)."""
        line = stream.readline()
        return decoder(cls)(json.loads(line)) if line else None


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


# ------------------------------------------------------------------------------------------ the health check
BAD_NODES_NAME = "bad-nodes.json"  # in the sweep folder
BAD_NODES_LOCK = ".bad-nodes.lock"
# a job that stops before training because its health check found a bad node exits with this code (sacct, srun)
EXIT_BAD_NODE = 3


@dataclass(frozen=True, kw_only=True)
class NodeHealth:
    """One node's figures in a job's health check (pipeline.job.health). Compute and memory figures are the
    node's slowest rank's best window; link figures the node's best pair (a node whose every link is slow is the
    slow one)."""

    node: str  # the scheduler's name (SLURMD_NODENAME)
    hostname: str
    machine: str  # the kernel's boot id, shortened: nodes that share one share a machine
    ranks: list[int]
    ready_s: float  # its slowest rank's seconds from the process's start to the check: a slow node arrives late
    gemm_gflops: Optional[float]  # None: not measured, or failed (error)
    cpu_share: Optional[float]  # CPU time / wall time in that window (CPU devices): well below 1, the CPU was taken
    gflops_per_cpu_s: Optional[float]  # low with a full CPU share: slower hardware (clock, a wrong build)
    throttled_periods: Optional[int]  # CFS periods its cgroup was throttled in that window (None: not readable)
    membw_gb_s: Optional[float]  # bytes read + written per second by a copy (None: not measured: see notes)
    link_gb_s: Optional[float]
    latency_us: Optional[float]
    flags: list[str]  # why it is flagged; empty: healthy
    error: Optional[str] = None  # a failed check: an exception, a non-finite or wrong result, no answer


@dataclass(frozen=True, kw_only=True)
class LinkHealth:
    """A pair of nodes: point-to-point bandwidth (the lower direction's best transfer) and latency (half the best
    round trip)."""

    nodes: list[str]
    gb_s: Optional[float]  # None: the pair did not complete (see error)
    latency_us: Optional[float]
    confirmed: bool = False  # re-measured on its own, all other pairs idle
    flag: Optional[str] = None
    error: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class BadNode:
    node: str
    reason: str


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
class Health:
    """A multi-node job's check of its nodes before training."""

    policy: str  # health.on_bad
    threshold: float
    device: str  # what the compute check ran on ("cpu", "cuda")
    mode: str  # "parallel": every node at once; "serial": node by node (nodes that share a machine)
    machines: int  # distinct boot ids among the nodes
    seconds: float  # what the check cost
    phases: dict[str, float]  # its parts: roll call, compute, memory, links, confirm
    nodes: list[NodeHealth]
    links: list[LinkHealth]
    bad: list[BadNode]  # the nodes flagged, and why
    notes: list[str]  # what it could not tell, and why (2 nodes cannot name a link's end; a cache-sized buffer)
    left_out: list[str] = field(default_factory=list)  # the nodes this job's submission avoided (--exclude)
    earlier: list[BadNodeEntry] = field(default_factory=list)  # this run's earlier jobs stopped for a bad node


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
