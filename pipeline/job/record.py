"""The result record rank 0 writes at the end of a run (`pipeline.result.Result`), assembled here, in one place, from
typed parts: how the trainer was set up (`TrainingSetup`), what training produced (`TrainOutcome`, and every rank's
`RankResult`), what the job measured around training (`JobFacts`: its start-up, its fabric, its nodes' health) and
what rank 0 made of the trained model afterwards (`Finals`: the weights, the FLOPs, what could not be made)."""

from __future__ import annotations

import platform
from dataclasses import dataclass, replace
from importlib import metadata

from pipeline.config import target_name
from pipeline.definitions import COMM_MEASUREMENT, FSDP_COMM_MEASUREMENT, FSDP_COMM_UNMEASURED, RECORD
from pipeline.job.context import Job
from pipeline.job.flops import utilisation
from pipeline.job.memory import host_share
from pipeline.job.placement import device_info
from pipeline.job.timing import rank_timing, summarize
from pipeline.job.trainer import TrainingSetup, TrainOutcome
from pipeline.result import Fabric, Health, HostShare, Provenance, RankResult, Result, SlurmInfo
from pipeline.rundir import utc_now

PACKAGES = ("torch", "hydra-core", "omegaconf", "submitit", "numpy")


@dataclass(frozen=True)
class JobFacts:
    """What the job measured besides training (pipeline.job.run)."""

    backend: str
    started_at: str
    wall_s: float
    startup: dict[str, float]  # seconds from the process's start to each named moment of its start-up
    model_label: str
    fabric: Fabric | None
    health: Health | None  # rank 0's check of a multi-node job's nodes


@dataclass(frozen=True)
class Finals:
    """What rank 0 made of the trained model after training; a part that could not be made is in `missing`, with
    why. Weights that could not be written make the run incomplete (`unwritten`); nothing else fails it."""

    weights: str | None  # the weights' file in the run folder
    flops_per_sample: float | None
    missing: dict[str, str]
    unwritten: str | None = None  # a file the run could not write ("model.pt: No space left on device"): incomplete


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def warmup_of(job: Job, outcome: TrainOutcome) -> int:
    """Warm-up steps excluded from this segment's timing (a resumed run warms up again)."""
    return min(job.run.trainer.warmup_steps, outcome.steps - outcome.start_step)


def rank_result(job: Job, host: HostShare, outcome: TrainOutcome) -> RankResult:
    """This rank's entry in the record: where it ran, its final parameters' digest, its step timings."""
    env, memory = job.env, outcome.memory
    if memory is not None and memory.device_bytes is None:  # a CPU's: the rank's share of its host
        memory = replace(memory, device_bytes=host_share(host.processes_on_host))
    return RankResult(rank=env.rank, local_rank=env.local_rank, node_rank=env.node_rank, node_name=env.node_name,
                      device=str(job.device), host=host, parameters_sha256=outcome.parameters_sha256,
                      timing=rank_timing(outcome.phases, warmup_of(job, outcome)), memory=memory)


def provenance(job: Job, outcome: TrainOutcome, ranks: list[RankResult], started_at: str) -> Provenance:
    env, point, slurm = job.env, job.point, None
    if env.source == "slurm":  # in local debug mode these are the simulated job's values
        slurm = SlurmInfo(job_id=env.job_id, nodelist=env.nodelist, simulated=job.local_mode)
    return Provenance(git=point.git, hostnames=sorted({r.host.hostname for r in ranks}), versions=package_versions(),
                      slurm=slurm, launched_at=point.launched_at, started_at=started_at,
                      first_step_at_unix=outcome.first_step_at, ended_at=utc_now())


def build_record(job: Job, setup: TrainingSetup, outcome: TrainOutcome, ranks: list[RankResult], facts: JobFacts,
                 finals: Finals) -> Result:
    point, run, env, ev = job.point, job.run, job.env, outcome.evaluation
    device = device_info(job.device)
    timing = summarize([r.timing for r in ranks], run.global_batch)
    return Result(
        run_id=point.run_id, sweep_id=point.sweep_id, point=point.point, overrides=point.overrides,
        config=point.config, launch_mode=point.launch_mode,
        model=target_name(run.model), dataset=target_name(run.dataset), model_label=facts.model_label,
        nodes=env.num_nodes, tasks_per_node=env.local_world_size, world_size=env.world_size,
        model_parameters=setup.model_parameters, gradient_bytes=setup.gradient_bytes,
        device=device, backend=facts.backend, precision=setup.precision, fast_path=setup.fast_path,
        scaling=run.trainer.scaling, per_rank_batch=run.per_rank_batch, global_batch=run.global_batch,
        steps=outcome.steps, steps_per_epoch=setup.steps_per_epoch, warmup_steps=warmup_of(job, outcome),
        resumed_from_step=outcome.start_step, restart_count=env.restart_count, earlier_segments=outcome.segments,
        timing=timing,
        utilisation=utilisation(finals.flops_per_sample, timing.throughput_samples_per_s, env.world_size,
                                device.name, setup.precision),
        comm_measurement=comm_measurement(job), final_train_loss=outcome.final_train_loss,
        test_accuracy=ev.value if ev is not None and ev.metric == "accuracy" else None, evaluation=ev,
        loader=setup.loader, tokens_per_sample=setup.tokens_per_sample, wall_time_s=facts.wall_s,
        oversubscribed=any(r.host.oversubscribed for r in ranks), weights=finals.weights, ranks=ranks,
        provenance=provenance(job, outcome, ranks, facts.started_at), definitions=RECORD,
        fabric=facts.fabric, health=facts.health, startup=facts.startup, io=setup.io, optimizer=setup.optimizer,
        status="diverged" if outcome.diverged_at_step is not None else
        "pruned" if outcome.pruned_at_step is not None else "incomplete" if finals.unwritten else "completed",
        diverged_at_step=outcome.diverged_at_step, pruned_at_step=outcome.pruned_at_step,
        evaluations=outcome.evaluations, missing={**outcome.missing, **finals.missing, **unmeasured(job)},
        parallel=outcome.parallel, micro_batch=run.micro_batch, grad_accum_steps=run.accum_steps)


def comm_measurement(job: Job) -> str:
    """How this run's comm phase was measured, in words (pipeline.definitions)."""
    if job.run.parallel.kind == "ddp":
        return COMM_MEASUREMENT
    return FSDP_COMM_MEASUREMENT if not job.cuda else FSDP_COMM_UNMEASURED


def unmeasured(job: Job) -> dict[str, str]:
    """A sharded multi-rank run on CUDA: its comm phase is not measured (the record's missing says so)."""
    if job.run.parallel.kind == "ddp" or not job.cuda or job.world_size == 1:
        return {}
    return {"comm": FSDP_COMM_UNMEASURED}
