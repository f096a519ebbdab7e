"""The typed run configuration: the schemas Hydra composes into, and the checks on them.

`parse_run_config` is the one boundary between untyped config (Hydra's composed DictConfig at launch, the
frozen point.json a rank reads) and the dataclasses the rest of the code takes. It imports no torch: it runs on
login nodes.

The model, the dataset, the optimizer, the learning-rate schedule and the loss are Hydra `_target_`s. The
built-in ones have schemas beside them, in pipeline/workloads/ (their registry: pipeline.workloads.registry); any
other `_target_` (the user's own class, in their package or on PYTHONPATH) is kept as given, its module looked up
at launch without being imported (pipeline.sources reads its definition from its source: the attribute, the
keywords it takes, what it makes). The rest of the run's keys (trainer, loader, cluster, parallel,
health, ...) have their schemas here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from pipeline.checks import ConfigError, check_at_least, check_at_most, check_choice, check_positive
from pipeline.containers import check_container
from pipeline.rundir import CHECKSUMS_NAME, POINT_NAME, SHARDED_CHECKPOINT_NAME, Point, non_finite
from pipeline.slurm import check_slurm_values
from pipeline.sources import Passes, check_definition, check_target, check_target_node, module_part
from pipeline.typed import SchemaError, decoder, dotted
from pipeline.workloads.losses import IO_OUTPUT_HELP
from pipeline.workloads.registry import schema_name, schemas

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Hydra and OmegaConf are imported where they are used (composition, registration): every rank parses its frozen
# config, as plain data, before its first step, and importing Hydra would add a tenth of a second to that.
MISSING = "???"  # OmegaConf's mark of a required value
LOSS_ON = ("logits", "output")
# what the pipeline gives a target besides its config (pipeline.sources.Passes): a model, the dataset's values
# its constructor asks for by name; a dataset, its split and the rank's share; a schedule, the optimizer and the
# run's length by the name its constructor takes (pipeline.workloads.schedules)
MODEL_GETS = ("input_shape", "num_classes", "vocab_size")
DATASET_GETS = ("split", "train", "rank", "world_size")
LENGTH_NAMES = ("T_max", "total_steps", "total_iters", "num_training_steps")
PASSES = {
    "model": Passes(keywords=MODEL_GETS, makes="model", standard_library=False),
    "dataset": Passes(keywords=DATASET_GETS, makes="value", standard_library=False),
    "optimizer": Passes(positional=1, standard_library=False),  # the parameters, or their groups
    "scheduler": Passes(positional=1, keywords=LENGTH_NAMES, standard_library=False),
    "loss": Passes(makes="value", standard_library=False),
    "loader.collate_fn": Passes(positional=1, makes="value", object_called=True),  # the batch's items
    "param_groups.function": Passes(positional=1, makes="value"),  # the model
}


# --------------------------------------------------------------------------------------------- cluster
@dataclass
class ContainerConfig:
    """The container image the ranks run in (docs/containers.md; pipeline.containers): no image, no container.
    The sweep folder and the dataset roots are bound in at their own paths; `python` is the image's."""

    image: Optional[str] = None  # a directory or SquashFS (Charliecloud), a SIF or sandbox (Apptainer), a
    # registry reference or .sqsh file (pyxis: docker://..., nvcr.io#nvidia/pytorch:24.01-py3)
    runtime: Optional[str] = None  # charliecloud | apptainer | pyxis
    python: str = "python3"  # the image's Python, as a command or an absolute path inside it
    mounts: List[str] = field(default_factory=list)  # further HOST_PATH[:CONTAINER_PATH] binds, absolute
    workdir: Optional[str] = None  # the ranks' working directory inside the image (null: the runtime's default)
    env: Dict[str, str] = field(default_factory=dict)  # variables set inside the container
    options: List[str] = field(default_factory=list)  # the runtime's own further options (--writable-tmpfs, ...)

    def __post_init__(self) -> None:
        check_container(self)


@dataclass
class LocalClusterConfig:
    """Local debug mode: `nodes` simulated nodes x `tasks_per_node` processes on this machine."""

    kind: str = "local"
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    # seconds a rank waits for the others at rendezvous and in each collective before failing
    timeout_s: int = 300
    # local debug mode: a rank stopped this long (SIGSTOP, a debugger, Ctrl-Z) is named, while the others still wait
    stopped_s: float = 10.0
    # every launch mode: a rank whose heartbeat stands still this long (stopped, hung holding the interpreter, its
    # node gone) is named, with its state, by the rank watching it, which ends the run (pipeline.job.heartbeat);
    # above timeout_s, the collectives' timeout comes first
    silent_s: float = 30.0
    container: ContainerConfig = field(default_factory=ContainerConfig)


# torch's store and gloo count the timeout in milliseconds, in places as a 32-bit int: 2**31 - 1 ms is ~24.8 days
# (a larger one overflows there, or in datetime.timedelta, on every rank; 2147483 s is tested to work)
MAX_TIMEOUT_S = (2**31 - 1) // 1000


@dataclass
class SlurmClusterConfig(LocalClusterConfig):
    """What Slurm users set for an allocation; every point of a sweep becomes its own job."""

    kind: str = "slurm"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: int = 60  # minutes
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # e.g. "16G"
    constraint: Optional[str] = None
    exclusive: bool = False
    setup: List[str] = field(default_factory=list)  # raw shell lines run before the job's tasks start
    sbatch_extra: Dict[str, Any] = field(default_factory=dict)  # further #SBATCH --key=value pairs
    array_parallelism: Optional[int] = None  # at most this many tasks of a sweep's job array run at once
    # nodes the jobs must not run on (sbatch --exclude), besides those on the sweep's bad-node list
    exclude: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_slurm_values(self)


# --------------------------------------------------------------------------------------------- trainer
SCALING_MODES = ("weak", "strong")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
LOADERS = ("auto", "memory", "dataloader")


@dataclass
class TrainerConfig:
    epochs: int = 1
    max_steps: int = 0  # > 0 stops after this many optimizer steps, whatever `epochs` says
    # weak scaling: `batch_size` samples per rank per step, so the global batch grows with the ranks;
    # strong scaling: `global_batch_size` samples per step in all, split evenly over the ranks
    scaling: str = "weak"
    batch_size: int = 64
    global_batch_size: int = 256
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    device: str = "auto"
    # the GPU fast path; null means on with CUDA, off without
    data_on_device: Optional[bool] = None  # hold an in-memory dataset on the device and batch it there
    channels_last: Optional[bool] = None  # NHWC memory format (null: with CUDA, for convolutional models)
    compile: bool = False  # torch.compile the model
    cudnn_benchmark: Optional[bool] = None  # cuDNN times its algorithms per shape (null: with CUDA, for convolutions)
    prefetch: Optional[bool] = None  # the next batch's copy on a side stream (null: with CUDA, data on the host)
    seed: int = 0
    warmup_steps: int = 5  # the first steps, excluded from every timing figure
    log_every: int = 50
    checkpoint_every: int = 0  # > 0: rank 0 also checkpoints every N steps (always on the preemption signal)
    eval_samples: int = 0  # evaluate on at most this many held-out samples; 0: all of them
    # > 0: also evaluate every this many steps during training (the record's `evaluations`; a search's pruner
    # judges a trial by them), the step timer stopped meanwhile; 0: at the end only
    eval_every: int = 0
    tensorboard: bool = True  # rank 0 writes scalars when the tensorboard package is installed
    # every this many steps the ranks agree whether any loss was not finite (NaN, inf): the run then stops as
    # diverged; a sharded run's ranks agree then too whether any caught the stop signal, and checkpoint together.
    # Each check waits for the GPU (one small all-reduce): more often costs more.
    finite_check_every: int = 10
    # micro-batches per optimizer step, the gradients of all but the last kept local (DDP's no_sync, FSDP's
    # gradient-sync switch); the loss of each is scaled by 1 / grad_accum_steps. Weak scaling: batch_size is the
    # micro-batch; strong scaling: global_batch_size = micro-batch x grad_accum_steps x ranks (it must divide).
    # 0 (strong scaling only): the fewest micro-batches whose size is at most batch_size, picked per node count
    grad_accum_steps: int = 1
    activation_checkpointing: bool = False  # recompute each block's activations in backward (parallel.block_classes)
    # a checkpoint of an earlier run to start from (its weights, optimizer and schedule state and step): a DCP folder
    # (checkpoint.dcp, any parallel mode, any world size) or a checkpoint.pt (parallel=ddp)
    resume_from: Optional[str] = None

    def __post_init__(self) -> None:
        check_at_least("trainer.epochs", self.epochs, 1)
        check_at_least("trainer.max_steps", self.max_steps, 0)
        check_choice("trainer.scaling", self.scaling, SCALING_MODES)
        check_at_least("trainer.batch_size", self.batch_size, 1)
        check_at_least("trainer.global_batch_size", self.global_batch_size, 1)
        check_choice("trainer.precision", self.precision, PRECISIONS)
        check_choice("trainer.device", self.device, DEVICES)
        check_at_least("trainer.warmup_steps", self.warmup_steps, 0)
        check_at_least("trainer.seed", self.seed, 0)
        check_at_least("trainer.log_every", self.log_every, 1)
        check_at_least("trainer.checkpoint_every", self.checkpoint_every, 0)
        check_at_least("trainer.eval_samples", self.eval_samples, 0)
        check_at_least("trainer.eval_every", self.eval_every, 0)
        check_at_least("trainer.finite_check_every", self.finite_check_every, 1)
        check_at_least("trainer.grad_accum_steps", self.grad_accum_steps, 0)
        if self.grad_accum_steps == 0 and self.scaling != "strong":
            raise ConfigError("trainer.grad_accum_steps=0 (picked per node count) needs trainer.scaling=strong, where "
                              "the global batch is fixed; in weak scaling give the micro-batches per step (>= 1)")


@dataclass
class LoaderConfig:
    """How batches are made. `memory`: a dataset that offers its arrays (`arrays()`; the built-in ones do) is
    held in memory and batched by indexing (on the GPU when it fits, see trainer.data_on_device); `dataloader`:
    torch's DataLoader with a DistributedSampler, for any map-style dataset; `auto`: memory when the dataset
    offers its arrays, else the DataLoader. A stream (an IterableDataset) always goes through torchdata's
    StatefulDataLoader (pipeline.job.stream). The other keys are DataLoader's."""

    kind: str = "auto"
    num_workers: int = 0
    pin_memory: Optional[bool] = None  # null: on when training on a GPU
    persistent_workers: bool = False
    prefetch_factor: Optional[int] = None  # batches each worker loads ahead; null: torch's default (2 with workers)
    # a `_target_` that builds DataLoader's collate_fn (a function with `_partial_: true`, or a callable object);
    # null: torch's default_collate
    collate_fn: Optional[Any] = None
    # a stream's epoch: this many samples, all ranks together (each rank's share ending sooner is an error); null:
    # an epoch ends where the first rank's share of the stream ends. Only for a stream (an IterableDataset)
    epoch_samples: Optional[int] = None

    def __post_init__(self) -> None:
        check_choice("loader.kind", self.kind, LOADERS)
        if self.epoch_samples is not None:
            check_at_least("loader.epoch_samples", self.epoch_samples, 1)
        check_at_least("loader.num_workers", self.num_workers, 0)
        if self.num_workers == 0 and (self.persistent_workers or self.prefetch_factor is not None):
            raise ConfigError("loader.persistent_workers and loader.prefetch_factor need loader.num_workers > 0 "
                              f"(got loader.num_workers=0, persistent_workers={self.persistent_workers}, "
                              f"prefetch_factor={self.prefetch_factor})")
        if self.prefetch_factor is not None:
            check_at_least("loader.prefetch_factor", self.prefetch_factor, 1)
        if self.collate_fn is not None:
            check_target_node("loader.collate_fn", self.collate_fn, PASSES["loader.collate_fn"])


@dataclass
class DDPConfig:
    """DistributedDataParallel's knobs (defaults are torch's); small models are latency-bound in DDP."""

    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    broadcast_buffers: bool = True
    # parameters that get no gradient in some steps (unused by the loss): DDP must look for them every step
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if not self.bucket_cap_mb > 0:
            raise ConfigError(f"ddp.bucket_cap_mb={self.bucket_cap_mb!r} is not allowed; it must be > 0")


@dataclass
class ProfilerConfig:
    """torch.profiler over `steps` steps right after the warm-up, on the listed ranks (null: every rank, one trace
    each in POINT_DIR/profile, as Holistic Trace Analysis reads them); `nvtx` adds NVTX ranges (for Nsight
    Systems) around the same phases."""

    enabled: bool = False
    ranks: Optional[List[int]] = None
    steps: int = 5
    nvtx: bool = False

    def __post_init__(self) -> None:
        check_at_least("profiler.steps", self.steps, 1)
        for r in self.ranks or []:
            check_at_least("profiler.ranks", r, 0)


@dataclass
class IOConfig:
    """How batches meet the model (pipeline.job.model_io): where the logits are in its output (auto: a tensor, a
    `logits` attribute or key, a tuple's first tensor), whether the loss gets them or the whole output (a loss of
    your own that reads more of it, e.g. an auxiliary loss), and which keys of a mapping item hold the input and
    the target (the other keys go to the model as keywords)."""

    output: str = "auto"
    loss_on: str = "logits"  # what loss._target_ is given: the logits, or the model's whole output as it returned it
    input_key: str = "input_ids"
    target_key: str = "labels"
    # the other keys of a mapping item that go to the model as keywords; null: all of them (an attention mask); a
    # list: only these, the rest (an id, a text column) left out
    model_keys: Optional[List[str]] = None

    def __post_init__(self) -> None:
        check_choice("io.loss_on", self.loss_on, LOSS_ON)
        if not self.output.strip():
            raise ConfigError(f"io.output={self.output!r} is not allowed; give {IO_OUTPUT_HELP}")
        for key, value in (("io.input_key", self.input_key), ("io.target_key", self.target_key)):
            if not value.strip():
                raise ConfigError(f"{key}={value!r} is not allowed; give the mapping key that holds it")
        if self.input_key == self.target_key:
            raise ConfigError(f"io.input_key and io.target_key are both {self.input_key!r}; give two keys")


@dataclass
class EvaluationConfig:
    """Where the held-out evaluation's samples come from (pipeline.targets.build_datasets). A dataset whose
    constructor takes `split` (or `train`) is built again with `split` (train=False) for it; `holdout` > 0 instead
    holds that fraction of the training set out, the same rows on every rank and every restart, never trained on.
    A held-out set that is the training data (the same object, or the same rows) is refused at launch, as is data
    with no such split, unless one of these is chosen, or `enabled=false`."""

    enabled: bool = True
    split: str = "test"  # the held-out split's name, for a constructor that takes `split`
    holdout: float = 0.0  # > 0: this fraction of the training set, held out instead of a split

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"evaluate.holdout={self.holdout!r} is not allowed; it must be in [0, 1): the "
                              "fraction of the training set held out (0: the dataset's own held-out split)")
        if not self.split.strip():
            raise ConfigError("evaluate.split='' is not allowed; name the held-out split (e.g. test, validation)")


@dataclass
class ParamGroupsConfig:
    """The optimizer's parameter groups. `no_decay`: biases, normalisation layers' weights and embeddings get
    weight_decay 0 (what nanoGPT's configure_optimizers and Hugging Face's Trainer do); `method`: a method of the
    model that returns the groups, or a whole optimizer (nanoGPT's configure_optimizers), called with what it
    asks for by name (weight_decay, learning_rate or lr, betas, device_type); `function`: a `_target_` called
    with the model that returns the groups. At most one."""

    no_decay: bool = False
    method: Optional[str] = None
    function: Optional[Any] = None

    def __post_init__(self) -> None:
        chosen = [k for k, v in (("no_decay", self.no_decay), ("method", self.method), ("function", self.function))
                  if v]
        if len(chosen) > 1:
            raise ConfigError(f"param_groups.{chosen[0]} and param_groups.{chosen[1]} are both set; choose one way "
                              "to make the parameter groups")
        if self.method is not None and not self.method.isidentifier():
            raise ConfigError(f"param_groups.method={self.method!r} is not allowed; give the name of a method of the "
                              "model, e.g. configure_optimizers")
        if self.function is not None:
            check_target_node("param_groups.function", self.function, PASSES["param_groups.function"])


@dataclass
class ProbeConfig:
    """Every multi-rank job measures its allocation's all-reduce before training (pipeline.job.probe): a few
    seconds at most."""

    enabled: bool = True


# ------------------------------------------------------------------------------------------- parallelism
PARAM_DTYPES = ("auto", "fp32", "bf16")
REDUCE_DTYPES = ("fp32", "bf16")


@dataclass
class ParallelConfig:
    """How the model is spread over the ranks (pipeline.job.parallel). `block_classes`: the model's repeated
    blocks, by class name (`Block`) or dotted path, for FSDP's per-block sharding and for
    trainer.activation_checkpointing; null: found automatically (a Hugging Face model's _no_split_modules, else
    the repeated class that holds the most parameters)."""

    kind: str = "ddp"
    block_classes: Optional[List[str]] = None

    def __post_init__(self) -> None:
        for name in self.block_classes or []:
            if not all(part.isidentifier() for part in name.split(".")):
                raise ConfigError(f"parallel.block_classes: {name!r} is not allowed; give class names (Block) or "
                                  "dotted paths (mypkg.models.Block)")


@dataclass
class DDPParallelConfig(ParallelConfig):
    """parallel=ddp: every rank holds the whole model, its gradients and its optimizer state
    (DistributedDataParallel, its knobs under ddp.*)."""

    kind: str = "ddp"


@dataclass
class FSDPParallelConfig(ParallelConfig):
    """parallel=fsdp: FSDP2's fully_shard on every block, then on the root (embeddings, head, tied weights),
    torchtitan's order: parameters, gradients and optimizer state sharded over all ranks, each block's parameters
    all-gathered for its forward (and again for its backward, if resharded after forward) and its gradients
    reduce-scattered."""

    kind: str = "fsdp"
    reshard_after_forward: bool = True  # blocks free their gathered parameters after forward (the root never does)
    # the dtype blocks compute in: auto is the trainer's precision (bf16 on CUDA under trainer.precision=auto),
    # through FSDP's MixedPrecisionPolicy, or autocast for models with BatchNorm (whose buffers stay fp32)
    param_dtype: str = "auto"
    reduce_dtype: str = "fp32"  # the dtype gradients are reduced in
    # with trainer.grad_accum_steps > 1: false, only the last micro-batch reduces (fewer collectives, but full-size
    # gradients are held meanwhile, as in DDP); true, every micro-batch reduce-scatters (gradients stay sharded;
    # HSDP then all-reduces across replicas on the last only)
    reduce_every_micro_batch: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("parallel.param_dtype", self.param_dtype, PARAM_DTYPES)
        check_choice("parallel.reduce_dtype", self.reduce_dtype, REDUCE_DTYPES)


@dataclass
class HSDPParallelConfig(FSDPParallelConfig):
    """parallel=hsdp: FSDP on a 2-D mesh, sharded within each replica group and replicated across them: the
    gradients are reduce-scattered within a replica and all-reduced across the replicas."""

    kind: str = "hsdp"
    replicate: Optional[int] = None  # replicas; null: one per node (shard within a node, replicate across nodes)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.replicate is not None:
            check_at_least("parallel.replicate", self.replicate, 1)


# ---------------------------------------------------------------------------------------- health check
HEALTH_POLICIES = ("warn", "exclude", "fail")


@dataclass
class HealthConfig:
    """Every multi-node job checks its nodes before training (pipeline.job.health): each node's compute (a fixed
    GEMM on the device it trains on), its memory bandwidth, and the point-to-point links between the nodes. A node
    or link below `threshold` x the job's median is flagged, and so is a node whose check failed (an error, a
    non-finite result, no answer). `on_bad` says what a flag does: `warn` (the log and the record say so, training
    goes on), `fail` (the job stops before training, naming the node) or `exclude` (it stops, the node goes on the
    sweep's bad-node list, and the launcher or `status` resubmits the point without it, at most `max_resubmits`
    times; local debug mode, whose nodes are all this machine, runs the point again instead)."""

    enabled: bool = True
    on_bad: str = "warn"
    threshold: float = 0.5
    max_resubmits: int = 2
    # a 2-node job has one link and no median to name an end by: flag the link below this (GB/s; null: never)
    min_link_gb_s: Optional[float] = None
    # a node that has not answered a step of the check this long after it was due is named as not answering
    answer_s: float = 20.0

    def __post_init__(self) -> None:
        check_choice("health.on_bad", self.on_bad, HEALTH_POLICIES)
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"health.threshold={self.threshold!r} is not allowed; it must be in (0, 1): a node is "
                              "flagged below this fraction of the job's median")
        check_at_least("health.max_resubmits", self.max_resubmits, 0)
        if self.min_link_gb_s is not None:
            check_positive("health.min_link_gb_s", self.min_link_gb_s)
        # below a second the store's round trips and a busy node's scheduling decide, not the node's health: every
        # node would be named as not answering (1e-6 was taken, and no check could meet it)
        check_at_least("health.answer_s", self.answer_s, 1.0)


# ------------------------------------------------------------------------------------------------ tracking
TRACKERS = ("mlflow", "wandb")
WANDB_MODES = ("online", "offline")
# what MLflow's client takes as a tracking URI (mlflow.tracking._tracking_service.utils): its server, its database
# stores, its file store, Databricks; or a plain folder (a file store)
MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


@dataclass
class MlflowTrackingConfig:
    """tracking=[mlflow]: one MLflow run per point, nested in a parent run per sweep (pipeline/tracking/)."""

    uri: Optional[str] = None  # the tracking server or store; null: MLFLOW_TRACKING_URI, else MLflow's default
    experiment: str = "pipeline"

    def __post_init__(self) -> None:
        check_tracking_uri("tracking.mlflow.uri", self.uri)
        if not self.experiment.strip():
            raise ConfigError("tracking.mlflow.experiment='' is not allowed; name the MLflow experiment")


@dataclass
class WandbTrackingConfig:
    """tracking=[wandb]: one W&B run per point (its id the point's run id), grouped by the sweep."""

    project: str = "pipeline"
    entity: Optional[str] = None  # null: the API key's default entity
    mode: str = "online"  # offline: the run is written under `dir` and pushed later (pipeline.track sync, wandb sync)
    group: Optional[str] = None  # null: the sweep's folder name
    dir: Optional[str] = None  # where W&B writes its run files (offline runs too); null: the point's folder

    def __post_init__(self) -> None:
        check_choice("tracking.wandb.mode", self.mode, WANDB_MODES)
        if not self.project.strip() or "/" in self.project:
            raise ConfigError(f"tracking.wandb.project={self.project!r} is not allowed; give a project name "
                              "(no '/': the entity is tracking.wandb.entity)")


@dataclass
class TrackingConfig:
    """The experiment trackers a run also logs to (tracking=[mlflow], [wandb], both or none; a launch option: it
    changes what is told, not what is trained). Rank 0 sends through a bounded queue to a background thread, so a
    slow or unreachable tracker never waits the training; what it missed, `pipeline.track sync` sends later."""

    mlflow: Optional[MlflowTrackingConfig] = None
    wandb: Optional[WandbTrackingConfig] = None
    queue: int = 1000  # reports held for a slow tracker; more are dropped (the record's missing.tracking) for sync
    close_s: float = 30.0  # at the end, how long rank 0 waits for a tracker to take the rest

    def __post_init__(self) -> None:
        check_at_least("tracking.queue", self.queue, 1)
        check_positive("tracking.close_s", self.close_s)

    @property
    def names(self) -> list[str]:
        return [name for name in TRACKERS if getattr(self, name) is not None]


def check_tracking_uri(key: str, uri: Optional[str]) -> None:
    """A tracking URI MLflow's client can use: a known scheme, a host for a server's, a port that is one."""
    if uri is None:
        return
    from urllib.parse import urlsplit

    allowed = "give e.g. http://host:5000, sqlite:////abs/path/mlflow.db, file:///abs/path or a folder"
    if not uri.strip() or any(c.isspace() or ord(c) < 32 for c in uri):
        raise ConfigError(f"{key}={uri!r} is not allowed; {allowed}")
    try:
        parts = urlsplit(uri)
        port = parts.port if parts.scheme in ("http", "https") else None
    except ValueError as e:
        raise ConfigError(f"{key}={uri!r} is not a URI MLflow can use ({e}); {allowed}") from None
    if "://" not in uri and ":" not in uri.split("/")[0]:
        return  # a folder: MLflow's file store
    if parts.scheme not in MLFLOW_SCHEMES:
        raise ConfigError(f"{key}={uri!r}: the scheme {parts.scheme!r} is not one MLflow's client knows; choose one "
                          f"of: {', '.join(MLFLOW_SCHEMES)} ({allowed})")
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise ConfigError(f"{key}={uri!r} names no host; {allowed}")
    if port == 0:
        raise ConfigError(f"{key}={uri!r}: port 0 is not a server's port; {allowed}")


# --------------------------------------------------------------------------------------------- search
SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc", "nsgaii", "grid")
PRUNERS = ("none", "median", "percentile", "hyperband", "successive_halving")


@dataclass
class OptunaSearchConfig:
    """search=optuna: an asynchronous search (pipeline/search/): `workers` jobs, each with the point's allocation,
    each asking Optuna for a trial, training it as a point of its own, telling its objective, and asking again,
    until `trials` have ended. `space`: a parameter per dotted key, in the syntax of Hydra's Optuna sweeper
    (interval(0.001, 0.1), tag(log, interval(...)), int(interval(1, 8)), range(1, 5), choice(a, b))."""

    kind: str = "optuna"
    trials: int = 20
    workers: int = 2
    space: Dict[str, Any] = field(default_factory=dict)
    # the objectives' directions: auto (accuracy up, perplexity down, cost down), minimize or maximize, one for
    # each of `objective`'s figures
    direction: Any = "auto"
    sampler: str = "tpe"
    seed: Optional[int] = None  # the sampler's
    pruner: str = "none"
    storage: Optional[str] = None  # a database URL; null: Optuna's journal file in the search's folder
    study: Optional[str] = None  # the study's name; null: the folder's
    max_retries: int = 2  # times a trial whose worker died is tried again with its parameters
    heartbeat_s: float = 30.0  # a worker's sign of life, in its folder
    # a trial whose worker gave no sign of life this long, and whose Slurm job is gone, failed
    stale_after_s: float = 300.0
    lock_grace_s: int = 30  # the journal's lock, not renewed this long, was left by a killed worker: taken

    def __post_init__(self) -> None:
        check_at_least("search.trials", self.trials, 1)
        check_at_least("search.workers", self.workers, 1)
        check_choice("search.sampler", self.sampler, SAMPLERS)
        check_choice("search.pruner", self.pruner, PRUNERS)
        check_at_least("search.max_retries", self.max_retries, 0)
        check_positive("search.heartbeat_s", self.heartbeat_s)
        check_at_least("search.lock_grace_s", self.lock_grace_s, 3)
        if self.stale_after_s < 3 * self.heartbeat_s:
            raise ConfigError(f"search.stale_after_s={self.stale_after_s} is not allowed; it must be at least three "
                              f"heartbeats (3 x search.heartbeat_s = {3 * self.heartbeat_s})")


# ------------------------------------------------------------------------------------------------- run
CLUSTER_SCHEMAS = {c.kind: c for c in (LocalClusterConfig, SlurmClusterConfig)}
PARALLEL_SCHEMAS = {c.kind: c for c in (DDPParallelConfig, FSDPParallelConfig, HSDPParallelConfig)}
SEARCH_SCHEMAS = {c.kind: c for c in (OptunaSearchConfig,)}
# the groups whose `_target_` may be any importable class; their built-in targets' schemas are the registry's
TARGET_GROUPS = ("model", "dataset", "optimizer", "scheduler", "loss")


@dataclass
class RunConfig:
    # `_target_`s: a schema's dataclass for a built-in target, else the config as given (a dict)
    model: Any = MISSING
    dataset: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None  # optional learning-rate schedule, stepped after every optimizer step
    loss: Any = MISSING
    cluster: Any = MISSING
    parallel: Any = MISSING  # a schema of PARALLEL_SCHEMAS; records and point.json from before it: ddp
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    io: IOConfig = field(default_factory=IOConfig)
    param_groups: ParamGroupsConfig = field(default_factory=ParamGroupsConfig)
    evaluate: EvaluationConfig = field(default_factory=EvaluationConfig)  # the held-out set: docs/your-model.md
    nodes: int = 1
    # launch options (cluster=slurm): write each point's sbatch script instead of submitting; block until every
    # job has ended; submit the points Slurm accepts even when others are rejected
    dry_run: bool = False
    wait: bool = False
    allow_partial: bool = False
    overwrite: bool = False  # replace the run a folder holds (its record, weights, checkpoints, logs)
    # what a search optimises (Hydra's optimisation sweepers, search=...): a record's figure by its dotted name
    # (pipeline/objective.py), or a list of them
    objective: Any = "evaluation.value"
    search: Any = None  # search=optuna: a schema of SEARCH_SCHEMAS
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # tracking=[mlflow,wandb]: docs/tracking.md

    @property
    def world_size(self) -> int:
        return self.nodes * self.cluster.tasks_per_node

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step (trainer.grad_accum_steps, or the one picked for this world size)."""
        t = self.trainer
        if t.grad_accum_steps:
            return t.grad_accum_steps
        per_rank = t.global_batch_size // self.world_size
        return next((a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= t.batch_size),
                    per_rank)

    @property
    def micro_batch(self) -> int:
        """Samples per rank per forward and backward."""
        if self.trainer.scaling == "strong":
            return self.trainer.global_batch_size // self.world_size // self.accum_steps
        return self.trainer.batch_size

    @property
    def per_rank_batch(self) -> int:
        """Samples per rank per optimizer step: micro-batch x accumulation."""
        return self.micro_batch * self.accum_steps

    @property
    def global_batch(self) -> int:
        return self.per_rank_batch * self.world_size

    @property
    def replicas(self) -> int:
        """HSDP's replica groups (FSDP: 1, DDP: every rank is one)."""
        p = self.parallel
        if p.kind == "ddp":
            return self.world_size
        return (p.replicate or self.nodes) if p.kind == "hsdp" else 1

    @property
    def shard_ranks(self) -> int:
        """The ranks a sharded parameter is split over (DDP: 1, nothing is sharded)."""
        return 1 if self.parallel.kind == "ddp" else self.world_size // self.replicas

    def __post_init__(self) -> None:
        check_at_least("nodes", self.nodes, 1)
        from pipeline.objective import objectives  # it reads the record's schema, which imports this module

        self.objective = objectives(self.objective)[0] if isinstance(self.objective, str) else \
            objectives(self.objective)
        check_at_least("cluster.tasks_per_node", self.cluster.tasks_per_node, 1)
        check_at_least("cluster.gpus_per_node", self.cluster.gpus_per_node, 0)
        check_at_least("cluster.timeout_s", self.cluster.timeout_s, 1)
        check_positive("cluster.stopped_s", self.cluster.stopped_s)
        check_positive("cluster.silent_s", self.cluster.silent_s)
        check_at_most("cluster.timeout_s", self.cluster.timeout_s, MAX_TIMEOUT_S,
                      "about 24.8 days, the longest torch's store and gloo can wait")
        if self.search is not None and self.cluster.container.image is not None:
            raise ConfigError(f"search={self.search.kind} with cluster.container.image: a search's trials do not run "
                              "in a container yet; run the search outside it, or sweep the points with -m")
        t, c = self.trainer, self.cluster
        if 0 < c.gpus_per_node < c.tasks_per_node and t.device != "cpu":
            raise ConfigError(
                f"cluster.tasks_per_node={c.tasks_per_node} ranks would share cluster.gpus_per_node={c.gpus_per_node} "
                f"GPU(s), and NCCL needs one GPU per rank; set cluster.tasks_per_node <= cluster.gpus_per_node, or "
                f"trainer.device=cpu"
            )
        if t.compile and self.parallel.kind == "ddp" and self.ddp.bucket_cap_mb < 1:
            # torch.compile splits the graph at DDP's buckets, and refuses buckets smaller than DDP's first (1 MiB)
            raise ConfigError(f"ddp.bucket_cap_mb={self.ddp.bucket_cap_mb} is not allowed with trainer.compile=true; "
                              f"torch.compile needs ddp.bucket_cap_mb >= 1")
        if t.scaling == "strong" and t.global_batch_size % self.world_size:
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size} does not divide over "
                f"nodes({self.nodes}) x cluster.tasks_per_node({self.cluster.tasks_per_node}) = "
                f"{self.world_size} ranks in strong scaling; choose a multiple of {self.world_size}"
            )
        self._check_accumulation()
        self._check_parallel()
        self._check_builtin_pairing()
        self._check_steps()
        self._check_profiled_ranks()

    def _check_accumulation(self) -> None:
        """Strong scaling: the global batch is micro-batch x accumulation x ranks, so the accumulation divides each
        rank's share; picked (trainer.grad_accum_steps=0), some micro-batch must be at most trainer.batch_size."""
        t = self.trainer
        if t.scaling != "strong":
            return
        per_rank = t.global_batch_size // self.world_size
        if t.grad_accum_steps and per_rank % t.grad_accum_steps:
            raise ConfigError(
                f"trainer.grad_accum_steps={t.grad_accum_steps} does not divide the {per_rank} samples each rank takes "
                f"per step (trainer.global_batch_size={t.global_batch_size} over {self.world_size} ranks); choose a "
                f"divisor of {per_rank}, or 0 to pick the fewest micro-batches of at most trainer.batch_size")
        if not t.grad_accum_steps and per_rank // self.accum_steps > t.batch_size:
            raise ConfigError(f"trainer.grad_accum_steps=0 found no micro-batch of at most trainer.batch_size="
                              f"{t.batch_size} that divides the {per_rank} samples per rank")

    def _check_parallel(self) -> None:
        """The mesh fits the world (HSDP: whole shard groups within a node), and FSDP's limits."""
        p, t, c = self.parallel, self.trainer, self.cluster
        if p.kind == "hsdp":
            if self.world_size % self.replicas:
                raise ConfigError(f"parallel.replicate={self.replicas} does not divide the {self.world_size} ranks "
                                  f"(nodes({self.nodes}) x cluster.tasks_per_node({c.tasks_per_node})); choose a "
                                  f"divisor, or null for one replica per node ({self.nodes})")
            if c.tasks_per_node % self.shard_ranks:
                raise ConfigError(
                    f"parallel.replicate={self.replicas} makes shard groups of {self.shard_ranks} ranks, which do not "
                    f"divide cluster.tasks_per_node={c.tasks_per_node}: HSDP shards within a node; choose "
                    f"parallel.replicate so that {self.world_size} / replicate divides {c.tasks_per_node} (null: one "
                    "replica per node), or parallel=fsdp to shard over every rank")
        if p.kind != "ddp" and t.channels_last:
            raise ConfigError(f"trainer.channels_last=true is not allowed with parallel={p.kind}: FSDP shards only "
                              "contiguous parameters; set trainer.channels_last=null (off under FSDP) or parallel=ddp")
        if p.block_classes is None and getattr(self.model, "blockless", False) and t.activation_checkpointing:
            raise ConfigError(f"trainer.activation_checkpointing=true: model._target_={self.model._target_} has no "
                              "repeated blocks to checkpoint; name the modules to checkpoint with "
                              "parallel.block_classes=[ClassName], or use a model with blocks (resnet18, gpt_tiny)")

    def _check_steps(self) -> None:
        """What the launch knows of the run's steps (trainer.max_steps; steps per epoch where a built-in dataset
        says its size: as the trainer's sampler makes them, floor(train_size / ranks) // per-rank batch) leaves a
        batch per rank, and a step to time after the warm-up."""
        t, size = self.trainer, getattr(self.dataset, "train_size", None)
        bounds = {f"trainer.max_steps={t.max_steps}": t.max_steps} if t.max_steps else {}
        if isinstance(size, int):
            per_epoch = size // self.world_size // self.per_rank_batch
            if per_epoch == 0:
                raise ConfigError(
                    f"dataset.train_size={size} gives {size // self.world_size} samples to each of {self.world_size} "
                    f"ranks, fewer than one per-rank batch of {self.per_rank_batch}: lower trainer.batch_size (weak "
                    "scaling) or trainer.global_batch_size (strong scaling), use fewer ranks, or raise "
                    "dataset.train_size")
            bounds[f"trainer.epochs={t.epochs} x {per_epoch} steps per epoch"] = t.epochs * per_epoch
        check_schedule_floors("scheduler", self.scheduler)
        if bounds:
            why, steps = min(bounds.items(), key=lambda kv: kv[1])
            if t.warmup_steps >= steps:
                raise ConfigError(f"trainer.warmup_steps={t.warmup_steps} leaves no step to time: the run takes "
                                  f"{steps} step(s) ({why}); make trainer.warmup_steps < {steps}, or train longer")
            for name in ("warmup_steps", "num_warmup_steps"):  # ours (warmup_cosine), Hugging Face's schedules'
                warmup = self.scheduler.get(name) if isinstance(self.scheduler, dict) else None
                if isinstance(warmup, int) and warmup >= steps:
                    raise ConfigError(f"scheduler.{name}={warmup} is not shorter than the run, which takes {steps} "
                                      f"step(s) ({why}): the learning rate would never leave its warm-up; make "
                                      f"scheduler.{name} < {steps}")

    def _check_profiled_ranks(self) -> None:
        p = self.profiler
        if not p.enabled or p.ranks is None:
            return
        if not p.ranks or max(p.ranks) >= self.world_size:
            raise ConfigError(f"profiler.ranks={list(p.ranks)} is not allowed: this run has ranks 0 to "
                              f"{self.world_size - 1} (nodes({self.nodes}) x cluster.tasks_per_node("
                              f"{self.cluster.tasks_per_node})); give some of those, or null for every rank")

    def _check_builtin_pairing(self) -> None:
        """A built-in model on a built-in dataset: the kinds match, and a language model covers its data."""
        model, data = self.model, self.dataset
        if not (hasattr(model, "needs") and hasattr(data, "provides")):
            return
        if model.needs != data.provides:
            fitting = [n for n, s in schemas("dataset").items() if s.provides == model.needs]
            raise ConfigError(f"model._target_={model._target_} trains on {model.needs}, but dataset._target_="
                              f"{data._target_} holds {data.provides}; choose a dataset among: {', '.join(fitting)}")
        if model.needs != "tokens":
            return
        if model.vocab_size is not None and data_vocab(data) > model.vocab_size:
            raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the dataset's vocabulary "
                              f"({data_vocab(data)}); set model.vocab_size=null to take the dataset's")
        if data.seq_len > model.context_length:
            raise ConfigError(f"dataset.seq_len={data.seq_len} is longer than model.context_length="
                              f"{model.context_length}; make dataset.seq_len <= model.context_length")


def check_schedule_floors(key: str, node: Any) -> None:
    """A schedule's floor (`eta_min`, `min_lr`, at any depth: a warm-up's `then`) is a number, not negative: torch
    takes a negative one and the learning rate goes below zero, the optimizer then climbing the loss. A warm-up
    takes a step at least, from a fraction of the rate in (0, 1] (torch's LinearLR refuses others on the ranks)."""
    items = node.items() if isinstance(node, dict) else vars(node).items() if dataclasses.is_dataclass(node) else ()
    for name, value in items:
        if isinstance(value, dict):
            check_schedule_floors(f"{key}.{name}", value)
        elif name in ("eta_min", "min_lr") and not isinstance(value, (int, float)) and value is not None:
            raise ConfigError(f"{key}.{name}={value!r} is not allowed: a learning rate's floor is a number >= 0")
        elif name in ("eta_min", "min_lr") and isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{key}.{name}={value} is not allowed: a learning rate's floor must be >= 0")
        elif name == "start_factor" and isinstance(value, (int, float)) and not 0 < value <= 1:
            raise ConfigError(f"{key}.{name}={value} is not allowed: a warm-up starts at a fraction of the learning "
                              "rate, in (0, 1]")
        elif name in ("warmup_steps", "num_warmup_steps") and isinstance(value, int) and value < 1 and \
                key == "scheduler":
            raise ConfigError(f"{key}.{name}={value} is not allowed: a warm-up takes >= 1 step (for none, choose a "
                              "schedule without one)")


def check_resume_from(run: RunConfig) -> None:
    """trainer.resume_from names a checkpoint of this project there is: a DCP folder (any parallel mode) or a
    checkpoint.pt (parallel=ddp, whose file holds the whole model and optimizer); of this run's model, where the
    run that saved it left its point.json beside it. Pinned to an absolute path, as the dataset root is, since
    ranks may start elsewhere. (The parameters' names and shapes are compared with the model's on the ranks,
    which build it: pipeline.job.checkpoint.)"""
    if run.trainer.resume_from is None:
        return
    path = run.trainer.resume_from = os.path.abspath(run.trainer.resume_from)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CHECKSUMS_NAME)):
            raise ConfigError(f"trainer.resume_from={path} is a folder without {CHECKSUMS_NAME}: not a whole sharded "
                              f"checkpoint (give a run folder's {SHARDED_CHECKPOINT_NAME} or checkpoint.pt)")
    elif not os.path.isfile(path):
        # a FIFO, socket or device is not opened: reading a FIFO would wait for a writer forever
        what = "is not a regular file (a FIFO, a socket or a device)" if os.path.exists(path) else "does not exist"
        raise ConfigError(f"trainer.resume_from={path} {what}; give a run folder's {SHARDED_CHECKPOINT_NAME} "
                          "(a sharded run's) or checkpoint.pt (a DDP run's)")
    elif run.parallel.kind != "ddp":
        raise ConfigError(f"trainer.resume_from={path} is a DDP checkpoint file, which parallel={run.parallel.kind} "
                          f"cannot load sharded; give a sharded run's {SHARDED_CHECKPOINT_NAME} folder, or "
                          "parallel=ddp")
    else:
        contents = torch_save_contents(path)
        if contents is None:
            raise ConfigError(f"trainer.resume_from={path} is not a file torch.save wrote (a zip archive holding "
                              "data.pkl): damaged, or of another format; give a run folder's checkpoint.pt")
        if not isinstance(contents, dict) or not {"model", "optimizer", "step"} <= set(contents):
            held = f"a dict of {', '.join(map(str, list(contents)[:4]))}, ..." if isinstance(contents, dict) else \
                "no dict"
            raise ConfigError(f"trainer.resume_from={path} is a torch.save file but no checkpoint of this project "
                              f"(it holds {held}; a checkpoint holds the model, the optimizer and the step: "
                              "model.pt is the weights alone); give a run folder's checkpoint.pt")
    _check_same_model(run, path)


def _check_same_model(run: RunConfig, path: str) -> None:
    """The run that saved `path` (its point.json, in the checkpoint's folder) had this run's model config: a
    checkpoint of another model fails to load on every rank. Keys in one of the two configs only (a default added
    since) are not compared."""
    try:
        theirs = Point.read(os.path.dirname(path)).config.get("model")
    except (OSError, ValueError):
        return  # a checkpoint copied without its run's folder: the ranks compare the parameters
    mine = to_plain(run)["model"]
    if not isinstance(theirs, dict) or not isinstance(mine, dict):
        return
    differ = [k for k in mine if k in theirs and mine[k] != theirs[k]]
    if differ:
        said = "; ".join(f"model.{k}={theirs[k]!r} there, {mine[k]!r} here" for k in differ[:3])
        raise ConfigError(f"trainer.resume_from={path} is a checkpoint of another model ({said}; its run's config: "
                          f"{os.path.join(os.path.dirname(path), POINT_NAME)}); resume from a checkpoint of this "
                          "model, or configure the model as that run did")


def torch_save_contents(path: str) -> Any:
    """What a file torch.save wrote holds (a zip archive with ARCHIVE/data.pkl), read torch-free and without
    running anything it names: every class it names is a stand-in (tensors, their storages). None when it is
    not torch.save's format."""
    import pickle
    import zipfile

    class StandIn:
        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

        def __call__(self, *args, **kwargs):
            return StandIn()

    class Mapping(dict):  # an OrderedDict (a state_dict, with its _metadata as state)
        def __setstate__(self, state):
            pass

    class Reader(pickle.Unpickler):
        def find_class(self, module, name):
            return Mapping if (module, name) in (("collections", "OrderedDict"), ("builtins", "dict")) else StandIn

        def persistent_load(self, pid):
            return StandIn()

    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            with archive.open(name) as f:
                return Reader(f).load()
    except (zipfile.BadZipFile, OSError, ValueError, StopIteration, pickle.UnpicklingError, EOFError,
            AttributeError, TypeError, IndexError, KeyError, RecursionError, MemoryError):
        return None


def target_of(node: Any) -> str:
    """A config's `_target_`; `node` is a dict or a schema's dataclass."""
    return node["_target_"] if isinstance(node, dict) else node._target_


def target_name(node: Any) -> str:
    """How records name a model, dataset or optimizer: its `_target_`'s last part, lower case
    (`pipeline.workloads.models.MLP` -> `mlp`)."""
    return target_of(node).rsplit(".", 1)[-1].lower()


def data_vocab(dataset: Any) -> int:
    """The vocabulary of a built-in token dataset (ByteText's bytes: 256)."""
    return getattr(dataset, "vocab_size", 256)


# ---------------------------------------------------------------------------------------------- parsing
def _typed(group: str, node: Any, schemas: dict, key: str, open_targets: bool, here: bool = True) -> Any:
    """One group's node: built as the schema its discriminator names, or, for a `_target_` of the user's own
    (`open_targets`), the node as given once its module is found and its definition read. Not `here` (the ranks
    run in a container), a module this machine lacks is the image's to find: the preflight imports it there."""
    value = node.get(key) if isinstance(node, dict) else None
    if value in schemas:
        return build_typed(schemas[value], node, f"{group}.")
    if not open_targets:
        raise ConfigError(f"{group}.{key}={value!r} is not allowed; choose one of: {', '.join(schemas)}")
    if not isinstance(node, dict):
        raise ConfigError(f"{group}={node!r} is not allowed; give a config with a `_target_` (a class to build)")
    if not here and isinstance(value, str) and re.match(r"^[A-Za-z_][\w.]*\.\w+$", value) and \
            not module_part(value):
        return node  # not installed here: the image's to import (pipeline.containers.preflight does, first)
    check_target(f"{group}.{key}", value)
    check_definition(group, node, PASSES[group])
    return node


def build_typed(cls: type, data: Any, prefix: str = "") -> Any:
    """The dataclass `cls` from plain data (a composed config's container, or point.json) through the one decoder
    (pipeline.typed, strict): every key one of its fields, every value of its field's type, absent keys their
    defaults; the class's __post_init__ then checks the values. A mismatch is a ConfigError naming the key: Hydra
    has typed what it composed, but point.json and the torchrun path reach here as plain data. Fast: a 1,000-point
    sweep takes it 1,000 times."""
    try:
        return decoder(cls, strict=True)(data)
    except SchemaError as e:
        key = f"{prefix}{e.where}"
        if e.expected == "a known key":
            parent = key.rpartition(".")[0] or "the config"
            raise ConfigError(f"{key} is not a key of {parent}; {e.problem.split('; ', 1)[1]}") from None
        if e.expected is None:
            raise ConfigError(f"{key or 'the config'}: {e.problem}") from None
        raise ConfigError(f"{key or 'the config'}={e.value!r} is not allowed; it must be {e.expected}") from None


def parse_run_config(cfg: Union["DictConfig", dict]) -> RunConfig:
    """Resolve, type and validate a composed config (or its plain form, as point.json holds it). Raises
    ConfigError naming the key on bad input."""
    if not isinstance(cfg, dict):
        cfg = plain_config(cfg)
    check_finite(cfg)
    cluster = cfg.get("cluster")
    in_image = isinstance(cluster, dict) and isinstance(cluster.get("container"), dict) and \
        cluster["container"].get("image") is not None
    groups = {group: _typed(group, cfg.get(group), schemas(group), "_target_", open_targets=True, here=not in_image)
              for group in TARGET_GROUPS if group != "scheduler" or cfg.get(group) is not None}
    groups["cluster"] = _typed("cluster", cfg.get("cluster"), CLUSTER_SCHEMAS, "kind", open_targets=False)
    groups["parallel"] = _typed("parallel", cfg.get("parallel", {"kind": "ddp"}), PARALLEL_SCHEMAS, "kind",
                                open_targets=False)
    if cfg.get("search") is not None:
        groups["search"] = _typed("search", cfg["search"], SEARCH_SCHEMAS, "kind", open_targets=False)
    return build_typed(RunConfig, {**{k: v for k, v in cfg.items() if k not in groups}, **groups})


def check_finite(cfg: dict) -> None:
    """Every number of the config is finite, a user's `_target_`'s too. Hydra reads `inf` and `nan` as floats; no
    built-in setting takes one, and the config is frozen into point.json, whose numbers are finite (as every run
    file's)."""
    found = non_finite(cfg)
    if found is not None:
        path, value = found
        raise ConfigError(f"{dotted(path)}={value!r} is not allowed; it must be a finite number")


def plain_config(cfg: "DictConfig") -> dict:
    """A composed config as plain data, interpolations resolved (an unresolvable one names its key); Hydra's
    own node stays behind."""
    from omegaconf import OmegaConf

    try:
        plain = {}
        for key in cfg:
            if key != "hydra":
                value = cfg[key]
                plain[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        return plain
    except Exception as e:  # OmegaConf's: its first line says what, its full_key where (its other lines, how)
        said = (str(e).strip().splitlines() or [type(e).__name__])[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key}: {said}" if key and not said.startswith(f"{key}") else said) from None


# how a point is launched (what a search makes of it, where it is told), not what it trains
LAUNCH_OPTIONS = ("dry_run", "wait", "allow_partial", "overwrite", "objective", "search", "tracking")


def config_hash(config: dict) -> str:
    """What makes two launches one run: the config as plain data, less its launch options. A checkpoint is stamped
    with it, and a launch into a folder whose unfinished run has the same one continues that run."""
    trained = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
    return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()


def to_plain(run: RunConfig) -> dict:
    """The resolved config as plain data (what ranks read and what a record shows)."""
    return dataclasses.asdict(run)


def pin_paths(run: RunConfig) -> None:
    """Ranks may start in another directory (a Slurm job does): pin a relative dataset root, and a search's
    journal file (a storage that is no database URL), to the launch cwd."""
    if getattr(run.dataset, "root", None) is not None:
        run.dataset.root = os.path.abspath(run.dataset.root)
    storage = run.search.storage if run.search is not None else None
    if storage and not re.match(r"^[a-z+]+:", storage):
        run.search.storage = os.path.abspath(storage)


# `${from_dataset:NAME}` in any config node (a model's, a Hugging Face config's, a loss's): the train dataset's
# attribute NAME, known only once the job has built the dataset. At launch the resolver leaves the marker as it is
# (a string in point.json); the job replaces it with the value (pipeline.job.build).
FROM_DATASET = ("input_shape", "num_classes", "vocab_size", "seq_len")
_FROM_DATASET_MARK = re.compile(r"^\$\{from_dataset:(\w+)\}$")


def from_dataset(name: str) -> str:
    check_choice("${from_dataset:NAME}: NAME", name, FROM_DATASET)
    return "${from_dataset:" + name + "}"


def from_dataset_name(value: Any) -> str | None:
    """The NAME of a `${from_dataset:NAME}` marker, or None for any other value."""
    match = _FROM_DATASET_MARK.match(value) if isinstance(value, str) else None
    return match.group(1) if match else None


def known_keys() -> list[str]:
    """Every key the built-in schemas have, dotted (to name the one a mistyped key meant)."""
    keys = set()

    def walk(cls: type, prefix: str) -> None:
        for name, tp in typing.get_type_hints(cls).items():
            if name not in {f.name for f in dataclasses.fields(cls) if f.init}:
                continue
            inner = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
            if dataclasses.is_dataclass(inner):
                walk(inner, f"{prefix}{name}.")
            else:
                keys.add(f"{prefix}{name}")

    walk(RunConfig, "")
    for group, schemas_of_group in group_schemas().items():
        for schema in schemas_of_group.values():
            walk(schema, f"{group}.")
    return sorted(keys)


def group_schemas() -> dict[str, dict[str, type]]:
    """Every config group's schemas: the built-in workloads' (the registry's) and the cluster's and parallel's."""
    return {**{group: schemas(group) for group in TARGET_GROUPS}, "cluster": CLUSTER_SCHEMAS,
            "parallel": PARALLEL_SCHEMAS, "search": SEARCH_SCHEMAS}


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("from_dataset", from_dataset, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, schemas_of_group in group_schemas().items():
        for schema in schemas_of_group.values():
            cs.store(group=group, name=schema_name(schema), node=schema)
