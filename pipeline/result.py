"""The result record, POINT_DIR/result.json: what rank 0 writes at the end of a run (`Result`) and its typed parts,
one per idea (where the run ran, its timing, its fabric, its nodes' health, its memory, ...). The parts are built
by the job's modules that measure them; the record is assembled from them in one place (pipeline.job.record) and
read by the collector (pipeline.collector.records). Like every file of the run folder it is a frozen dataclass
with `to_json` / `from_json` (pipeline.rundir.JsonFile), so writer, readers and the tests' record factory agree.

Imports no torch: the collector runs on login nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from pipeline.rundir import RECORD_NAME, BadNodeEntry, GitInfo, JsonFile
from pipeline.typed import SCHEMA_VERSION, flat



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
    # "memory": the split held in memory, batched by indexing | "dataloader": torch's DataLoader | "stream": torchdata's
    # StatefulDataLoader over this rank's share of an IterableDataset (pipeline.job.stream)
    kind: str
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
    """The trained model on the held-out samples: the mean loss, and the metric that suits the task."""

    split: str  # where the samples come from (evaluate.*): "the dataset built with split='test'", "holdout: ..."
    samples: int
    loss: float  # the configured loss, averaged over target elements (tokens, for a language model)
    metric: str  # "accuracy" (a classifier), "perplexity" (a language model: exp(loss)) or "loss"
    value: float


@dataclass(frozen=True, kw_only=True)
class StepEvaluation:
    """An evaluation during training (trainer.eval_every), as Evaluation, after `step` steps."""

    step: int
    samples: int
    loss: float
    metric: str
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


# ---------------------------------------------------------------------------------------- the health check
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


# ------------------------------------------------------------------------------------------------ the record
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
    steps_per_epoch: Optional[int]  # None: a stream whose epoch's end the run did not reach (loader.epoch_samples)
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
    # or "diverged": the loss stopped being finite at diverged_at_step; or "pruned": a search's pruner stopped the
    # trial at pruned_at_step, after that step's evaluation (the record's `evaluation`); or "incomplete": trained to
    # the end, but the weights could not be written (missing.weights says why: the OS's reason)
    status: str = "completed"
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
    evaluations: list[StepEvaluation] = field(default_factory=list)  # during training, every trainer.eval_every
    pruned_at_step: Optional[int] = None
