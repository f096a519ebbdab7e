"""The result record rank 0 writes at the end of a run (`pipeline.rundir.Result`), built from its parts."""

from __future__ import annotations

import hashlib
import platform
from dataclasses import asdict
from importlib import metadata

import torch

from pipeline.config import RunConfig
from pipeline.job.env import DistEnv
from pipeline.job.flops import utilisation
from pipeline.job.placement import HostShare, device_info
from pipeline.job.timing import COMM_MEASUREMENT, DEFINITIONS, rank_timing, summarize
from pipeline.job.trainer import Trainer, TrainOutcome
from pipeline.rundir import (WEIGHTS_NAME, Fabric, Point, Provenance, RankResult, Result, Segment, SlurmInfo,
                             target_name, utc_now)

PACKAGES = ("torch", "hydra-core", "omegaconf", "submitit", "numpy")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gradient_bytes(model: torch.nn.Module) -> int:
    """What DDP all-reduces every step: one gradient per parameter, in the parameter's dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def parameters_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all ranks when DDP kept them in sync."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def warmup_of(run: RunConfig, outcome: TrainOutcome) -> int:
    """Warm-up steps excluded from this segment's timing (a resumed run warms up again)."""
    return min(run.trainer.warmup_steps, outcome.steps - outcome.start_step)


def rank_result(env: DistEnv, trainer: Trainer, share: HostShare, run: RunConfig, outcome: TrainOutcome) -> RankResult:
    """This rank's entry in the record: where it ran, its final parameters' digest, its step timings."""
    return RankResult(rank=env.rank, local_rank=env.local_rank, node_rank=env.node_rank, node_name=env.node_name,
                      device=str(trainer.device), **asdict(share),
                      parameters_sha256=parameters_digest(trainer.raw_model),
                      **rank_timing(outcome.phases, warmup_of(run, outcome)))


def earlier_segments(segments: list[dict], warmup: int, global_batch: int) -> list[Segment]:
    """Rank 0's throughput in each stretch before a restart (each after its own warm-up)."""
    out = []
    for seg in segments:
        phases = seg["phases"].numpy()
        timed = phases[warmup:, 0]
        out.append(Segment(start_step=seg["start_step"], steps=len(phases), timed_steps=len(timed),
                           throughput_samples_per_s=float(global_batch * len(timed) / timed.sum()) if len(timed)
                           else None))
    return out


def tokens_per_sample(trainer: Trainer) -> int | None:
    """A language model's tokens per training sequence (its dataset has a vocabulary); None otherwise."""
    if getattr(trainer.train_set, "vocab_size", None) is None:
        return None
    return int(torch.as_tensor(trainer.train_set[0][1]).numel())


def provenance(point: Point, env: DistEnv, trainer: Trainer, ranks: list[RankResult], started_at: str) -> Provenance:
    slurm = None
    if env.source == "slurm":  # in local debug mode these are the simulated job's values
        slurm = SlurmInfo(job_id=env.job_id, nodelist=env.nodelist, simulated=point.launch_mode == "local")
    return Provenance(git=point.git, hostnames=sorted({r.hostname for r in ranks}), versions=package_versions(),
                      slurm=slurm, launched_at=point.launched_at, started_at=started_at,
                      first_step_at_unix=trainer.first_step_at, ended_at=utc_now())


def build_record(point: Point, run: RunConfig, env: DistEnv, trainer: Trainer, flops: float, backend: str,
                 outcome: TrainOutcome, ranks: list[RankResult], started_at: str, wall: float,
                 fabric: Fabric | None, startup: dict[str, float]) -> Result:
    model, device, ev = trainer.raw_model, device_info(trainer.device), outcome.evaluation
    timing = summarize(ranks, run.global_batch)
    return Result(
        run_id=point.run_id, sweep_id=point.sweep_id, point=point.point, overrides=point.overrides,
        config=point.config, launch_mode=point.launch_mode,
        model=target_name(run.model), dataset=target_name(run.dataset),
        nodes=env.num_nodes, tasks_per_node=env.local_world_size, world_size=env.world_size,
        model_parameters=sum(p.numel() for p in model.parameters()),
        gradient_bytes=gradient_bytes(model),
        device=device, backend=backend, precision=trainer.precision, fast_path=trainer.fast_path,
        scaling=run.trainer.scaling, per_rank_batch=run.per_rank_batch, global_batch=run.global_batch,
        steps=outcome.steps, steps_per_epoch=outcome.steps_per_epoch, warmup_steps=warmup_of(run, outcome),
        resumed_from_step=outcome.start_step, restart_count=env.restart_count,
        earlier_segments=earlier_segments(trainer.segments, run.trainer.warmup_steps, run.global_batch),
        **timing,
        **utilisation(flops, timing["throughput_samples_per_s"], env.world_size, device.name, trainer.precision),
        comm_measurement=COMM_MEASUREMENT, final_train_loss=outcome.final_train_loss,
        test_accuracy=ev.value if ev is not None and ev.metric == "accuracy" else None, evaluation=ev,
        loader=trainer.loader_info, tokens_per_sample=tokens_per_sample(trainer), wall_time_s=wall,
        oversubscribed=any(r.oversubscribed for r in ranks), weights=WEIGHTS_NAME, ranks=ranks,
        provenance=provenance(point, env, trainer, ranks, started_at), definitions=DEFINITIONS, fabric=fabric,
        startup=startup)
