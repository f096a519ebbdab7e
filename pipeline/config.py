"""The typed run configuration: the schemas Hydra composes into, and the checks on them.

`parse_run_config` is the one boundary between untyped config (Hydra's composed DictConfig at launch, the
frozen YAML a rank reads) and the dataclasses the rest of the code takes. It imports no torch: it runs on
login nodes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A user-facing configuration error. The message names the key and what is allowed."""


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def check_at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be >= {minimum}")


# ---------------------------------------------------------------------------------------------- models
@dataclass
class MLPConfig:
    """784 -> hidden ReLU -> dropout -> classes (the input size comes from the dataset)."""

    _target_: str = "pipeline.workloads.models.MLP"
    hidden: int = 128
    dropout: float = 0.2

    def __post_init__(self) -> None:
        check_at_least("model.hidden", self.hidden, 1)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r} is not allowed; it must be in [0, 1)")


@dataclass
class CNNConfig:
    """conv3x3 c0, pool, conv3x3 c1, pool, conv3x3 c2, dense hidden, dense classes."""

    _target_: str = "pipeline.workloads.models.CNN"
    channels: List[int] = field(default_factory=lambda: [32, 64, 64])
    hidden: int = 64

    def __post_init__(self) -> None:
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise ConfigError(f"model.channels={list(self.channels)} is not allowed; give 3 positive ints")
        check_at_least("model.hidden", self.hidden, 1)


# -------------------------------------------------------------------------------------------- datasets
@dataclass
class SyntheticConfig:
    """Smooth class prototypes plus Gaussian noise, generated from `seed`: learnable, no download."""

    _target_: str = "pipeline.workloads.datasets.Synthetic"
    image_shape: List[int] = field(default_factory=lambda: [1, 28, 28])
    num_classes: int = 10
    train_size: int = 8192
    test_size: int = 2048
    separation: float = 6.0  # expected distance between class prototypes, in units of the pixel noise
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ConfigError(
                f"dataset.image_shape={list(self.image_shape)} is not allowed; give [channels, height, width], "
                "e.g. [1,28,28] (MNIST-shaped) or [3,32,32] (CIFAR-shaped)"
            )
        check_at_least("dataset.num_classes", self.num_classes, 2)
        check_at_least("dataset.train_size", self.train_size, 1)
        check_at_least("dataset.test_size", self.test_size, 1)
        check_at_least("dataset.separation", self.separation, 0.0)


@dataclass
class MNISTConfig:
    """torchvision's layout: ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""

    _target_: str = "pipeline.workloads.datasets.MNIST"
    root: str = "data"


@dataclass
class CIFAR10Config:
    """torchvision's layout: ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}."""

    _target_: str = "pipeline.workloads.datasets.CIFAR10"
    root: str = "data"


# --------------------------------------------------------------------------------------------- cluster
@dataclass
class LocalClusterConfig:
    """Local debug mode: `nodes` simulated nodes x `tasks_per_node` processes on this machine."""

    kind: str = "local"
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    # seconds a rank waits for the others at rendezvous and in each collective before failing
    timeout_s: int = 300


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


# --------------------------------------------------------------------------------------------- trainer
SCALING_MODES = ("weak", "strong")
OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainerConfig:
    epochs: int = 1
    max_steps: int = 0  # > 0 stops after this many optimizer steps, whatever `epochs` says
    # weak scaling: `batch_size` samples per rank per step, so the global batch grows with the ranks;
    # strong scaling: `global_batch_size` samples per step in all, split evenly over the ranks
    scaling: str = "weak"
    batch_size: int = 64
    global_batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    device: str = "auto"
    # the GPU fast path; null means on with CUDA, off without
    data_on_device: Optional[bool] = None  # hold the dataset on the device and batch it there
    channels_last: Optional[bool] = None  # NHWC memory format (null: with CUDA, for convolutional models)
    compile: bool = False  # torch.compile the model
    seed: int = 0
    warmup_steps: int = 5  # the first steps, excluded from every timing figure
    log_every: int = 50
    checkpoint_every: int = 0  # > 0: rank 0 also checkpoints every N steps (always on the preemption signal)
    tensorboard: bool = True  # rank 0 writes scalars when the tensorboard package is installed

    def __post_init__(self) -> None:
        check_at_least("trainer.epochs", self.epochs, 1)
        check_at_least("trainer.max_steps", self.max_steps, 0)
        check_choice("trainer.scaling", self.scaling, SCALING_MODES)
        check_at_least("trainer.batch_size", self.batch_size, 1)
        check_at_least("trainer.global_batch_size", self.global_batch_size, 1)
        check_choice("trainer.optimizer", self.optimizer, OPTIMIZERS)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"trainer.lr={self.lr!r} is not allowed; it must be a positive number")
        check_at_least("trainer.momentum", self.momentum, 0.0)
        check_at_least("trainer.weight_decay", self.weight_decay, 0.0)
        check_choice("trainer.precision", self.precision, PRECISIONS)
        check_choice("trainer.device", self.device, DEVICES)
        check_at_least("trainer.warmup_steps", self.warmup_steps, 0)
        check_at_least("trainer.log_every", self.log_every, 1)
        check_at_least("trainer.checkpoint_every", self.checkpoint_every, 0)


@dataclass
class DDPConfig:
    """DistributedDataParallel's knobs (defaults are torch's); small models are latency-bound in DDP."""

    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    broadcast_buffers: bool = True

    def __post_init__(self) -> None:
        if not self.bucket_cap_mb > 0:
            raise ConfigError(f"ddp.bucket_cap_mb={self.bucket_cap_mb!r} is not allowed; it must be > 0")


@dataclass
class ProfilerConfig:
    """torch.profiler over `steps` steps right after the warm-up, on the listed ranks; `nvtx` adds NVTX ranges
    (for Nsight Systems) around the same phases."""

    enabled: bool = False
    ranks: List[int] = field(default_factory=lambda: [0])
    steps: int = 5
    nvtx: bool = False

    def __post_init__(self) -> None:
        check_at_least("profiler.steps", self.steps, 1)
        for r in self.ranks:
            check_at_least("profiler.ranks", r, 0)


# ------------------------------------------------------------------------------------------------- run
MODEL_SCHEMAS = {c._target_: c for c in (MLPConfig, CNNConfig)}
DATASET_SCHEMAS = {c._target_: c for c in (SyntheticConfig, MNISTConfig, CIFAR10Config)}
CLUSTER_SCHEMAS = {c.kind: c for c in (LocalClusterConfig, SlurmClusterConfig)}


@dataclass
class RunConfig:
    model: Any = MISSING
    dataset: Any = MISSING
    cluster: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    nodes: int = 1
    # launch options (cluster=slurm): write each point's sbatch script instead of submitting; block until every
    # job has ended; submit the points Slurm accepts even when others are rejected
    dry_run: bool = False
    wait: bool = False
    allow_partial: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.cluster.tasks_per_node

    @property
    def per_rank_batch(self) -> int:
        if self.trainer.scaling == "strong":
            return self.trainer.global_batch_size // self.world_size
        return self.trainer.batch_size

    @property
    def global_batch(self) -> int:
        return self.per_rank_batch * self.world_size

    def __post_init__(self) -> None:
        check_at_least("nodes", self.nodes, 1)
        check_at_least("cluster.tasks_per_node", self.cluster.tasks_per_node, 1)
        check_at_least("cluster.gpus_per_node", self.cluster.gpus_per_node, 0)
        check_at_least("cluster.timeout_s", self.cluster.timeout_s, 1)
        t, c = self.trainer, self.cluster
        if 0 < c.gpus_per_node < c.tasks_per_node and t.device != "cpu":
            raise ConfigError(
                f"cluster.tasks_per_node={c.tasks_per_node} ranks would share cluster.gpus_per_node={c.gpus_per_node} "
                f"GPU(s), and NCCL needs one GPU per rank; set cluster.tasks_per_node <= cluster.gpus_per_node, or "
                f"trainer.device=cpu"
            )
        if t.compile and self.ddp.bucket_cap_mb < 1:
            # torch.compile splits the graph at DDP's buckets, and refuses buckets smaller than DDP's first (1 MiB)
            raise ConfigError(f"ddp.bucket_cap_mb={self.ddp.bucket_cap_mb} is not allowed with trainer.compile=true; "
                              f"torch.compile needs ddp.bucket_cap_mb >= 1")
        if t.scaling == "strong" and t.global_batch_size % self.world_size:
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size} does not divide over "
                f"nodes({self.nodes}) x cluster.tasks_per_node({self.cluster.tasks_per_node}) = "
                f"{self.world_size} ranks in strong scaling; choose a multiple of {self.world_size}"
            )


def _typed(group: str, node: Any, schemas: dict, key: str) -> Any:
    """Merge one group's node onto the schema its discriminator names; return the dataclass instance."""
    value = node.get(key) if isinstance(node, (dict, DictConfig)) else None
    if value not in schemas:
        raise ConfigError(f"{group}.{key}={value!r} is not allowed; choose one of: {', '.join(schemas)}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schemas[value]), node))


def parse_run_config(cfg: Union[DictConfig, dict]) -> RunConfig:
    """Resolve, type and validate a composed config. Raises ConfigError naming the key on bad input."""
    try:
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # Hydra's own node stays behind
            cfg = OmegaConf.to_container(cfg, resolve=True)
        groups = {
            "model": _typed("model", cfg.get("model"), MODEL_SCHEMAS, "_target_"),
            "dataset": _typed("dataset", cfg.get("dataset"), DATASET_SCHEMAS, "_target_"),
            "cluster": _typed("cluster", cfg.get("cluster"), CLUSTER_SCHEMAS, "kind"),
        }
        rest = OmegaConf.merge(OmegaConf.structured(RunConfig), {k: v for k, v in cfg.items() if k not in groups})
        values = {f.name: rest[f.name] for f in fields(RunConfig) if f.name not in groups}
        return RunConfig(**{k: OmegaConf.to_object(v) if isinstance(v, DictConfig) else v for k, v in values.items()},
                         **groups)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf's errors name the full key and the type it wanted
        raise ConfigError(str(e).strip()) from None


def to_plain(run: RunConfig) -> dict:
    """The resolved config as plain data (what ranks read and what a record shows)."""
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True)


def abspath_dataset_root(run: RunConfig) -> None:
    """Ranks may start in another directory (a Slurm job does): pin a relative dataset root to the launch cwd."""
    if hasattr(run.dataset, "root"):
        run.dataset.root = os.path.abspath(run.dataset.root)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, schemas in (("model", MODEL_SCHEMAS), ("dataset", DATASET_SCHEMAS), ("cluster", CLUSTER_SCHEMAS)):
        for schema in schemas.values():
            cs.store(group=group, name=f"{schema.__name__.removesuffix('Config').lower()}_schema", node=schema)
