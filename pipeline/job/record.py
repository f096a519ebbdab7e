"""The result record rank 0 writes at the end of a run (`pipeline.result.Result`), built from its parts."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import torch

from pipeline.config import RunConfig, target_name
from pipeline.definitions import COMM_MEASUREMENT, FSDP_COMM_MEASUREMENT, FSDP_COMM_UNMEASURED, RECORD
from pipeline.job.env import DistEnv
from pipeline.job.flops import utilisation
from pipeline.job.memory import host_share
from pipeline.job.placement import device_info
from pipeline.job.timing import rank_timing, summarize
from pipeline.job.trainer import TrainOutcome
from pipeline.result import Fabric, Health, HostShare, Provenance, RankResult, Result, SlurmInfo
from pipeline.rundir import Point, utc_now

PACKAGES = ("torch", "hydra-core", "omegaconf", "submitit", "numpy")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def warmup_of(run: RunConfig, outcome: TrainOutcome) -> int:
    """Warm-up steps excluded from this segment's timing (a resumed run warms up again)."""
    return min(run.trainer.warmup_steps, outcome.steps - outcome.start_step)


def rank_result(env: DistEnv, device: torch.device, host: HostShare, run: RunConfig,
                outcome: TrainOutcome) -> RankResult:
    """This rank's entry in the record: where it ran, its final parameters' digest, its step timings."""
    memory = outcome.memory
    if memory is not None and memory.device_bytes is None:  # a CPU's: the rank's share of its host
        memory = replace(memory, device_bytes=host_share(host.processes_on_host))
    return RankResult(rank=env.rank, local_rank=env.local_rank, node_rank=env.node_rank, node_name=env.node_name,
                      device=str(device), host=host, parameters_sha256=outcome.parameters_sha256,
                      timing=rank_timing(outcome.phases, warmup_of(run, outcome)), memory=memory)


@dataclass
class JobFacts:
    """What the job knows beyond the training's outcome, gathered as it goes (pipeline.job.run)."""

    point_dir: Path
    backend: str
    device: torch.device
    started_at: str
    wall_s: float
    startup: dict[str, float]
    model_label: str
    host: HostShare  # this rank's share of its host
    fabric: Fabric | None = None
    health: Health | None = None  # rank 0's health check of a multi-node job
    flops_per_sample: float | None = None
    weights: str | None = None  # the weights' file, once saved
    missing: dict[str, str] = field(default_factory=dict)  # what could not be produced after training, and why


def provenance(point: Point, env: DistEnv, outcome: TrainOutcome, ranks: list[RankResult],
               started_at: str) -> Provenance:
    slurm = None
    if env.source == "slurm":  # in local debug mode these are the simulated job's values
        slurm = SlurmInfo(job_id=env.job_id, nodelist=env.nodelist, simulated=point.launch_mode == "local")
    return Provenance(git=point.git, hostnames=sorted({r.host.hostname for r in ranks}), versions=package_versions(),
                      slurm=slurm, launched_at=point.launched_at, started_at=started_at,
                      first_step_at_unix=outcome.first_step_at, ended_at=utc_now())


def build_record(point: Point, run: RunConfig, env: DistEnv, outcome: TrainOutcome, ranks: list[RankResult],
                 job: JobFacts) -> Result:
    device, ev = device_info(job.device), outcome.evaluation
    timing = summarize([r.timing for r in ranks], run.global_batch)
    return Result(
        run_id=point.run_id, sweep_id=point.sweep_id, point=point.point, overrides=point.overrides,
        config=point.config, launch_mode=point.launch_mode,
        model=target_name(run.model), dataset=target_name(run.dataset), model_label=job.model_label,
        nodes=env.num_nodes, tasks_per_node=env.local_world_size, world_size=env.world_size,
        model_parameters=outcome.model_parameters, gradient_bytes=outcome.gradient_bytes,
        device=device, backend=job.backend, precision=outcome.precision, fast_path=outcome.fast_path,
        scaling=run.trainer.scaling, per_rank_batch=run.per_rank_batch, global_batch=run.global_batch,
        steps=outcome.steps, steps_per_epoch=outcome.steps_per_epoch, warmup_steps=warmup_of(run, outcome),
        resumed_from_step=outcome.start_step, restart_count=env.restart_count, earlier_segments=outcome.segments,
        timing=timing,
        utilisation=utilisation(job.flops_per_sample, timing.throughput_samples_per_s, env.world_size, device.name,
                                outcome.precision),
        comm_measurement=comm_measurement(run, job.device), final_train_loss=outcome.final_train_loss,
        test_accuracy=ev.value if ev is not None and ev.metric == "accuracy" else None, evaluation=ev,
        loader=outcome.loader, tokens_per_sample=outcome.tokens_per_sample, wall_time_s=job.wall_s,
        oversubscribed=any(r.host.oversubscribed for r in ranks), weights=job.weights, ranks=ranks,
        provenance=provenance(point, env, outcome, ranks, job.started_at), definitions=RECORD,
        fabric=job.fabric, health=job.health, startup=job.startup, io=outcome.io, optimizer=outcome.optimizer,
        status="diverged" if outcome.diverged_at_step is not None else "completed",
        diverged_at_step=outcome.diverged_at_step, missing={**outcome.missing, **job.missing, **unmeasured(run, job)},
        parallel=outcome.parallel, micro_batch=run.micro_batch, grad_accum_steps=run.accum_steps)


def comm_measurement(run: RunConfig, device: torch.device) -> str:
    """How this run's comm phase was measured, in words (pipeline.definitions)."""
    if run.parallel.kind == "ddp":
        return COMM_MEASUREMENT
    return FSDP_COMM_MEASUREMENT if device.type == "cpu" else FSDP_COMM_UNMEASURED


def unmeasured(run: RunConfig, job: JobFacts) -> dict[str, str]:
    """A sharded multi-rank run on CUDA: its comm phase is not measured (the record's missing says so)."""
    if run.parallel.kind == "ddp" or job.device.type == "cpu" or run.world_size == 1:
        return {}
    return {"comm": FSDP_COMM_UNMEASURED}
