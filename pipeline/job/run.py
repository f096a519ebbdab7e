"""What every rank runs, in local debug mode, under submitit, under a plain `srun` and under torchrun:
read the point's frozen config, join the process group, train, and (rank 0) write the record.

Entry: `python -m pipeline.worker POINT_DIR` (pipeline/worker.py), or `TrainingJob` under submitit.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate

from pipeline.config import RunConfig, parse_run_config
from pipeline.job.checkpoint import load_checkpoint, save
from pipeline.job.env import DistEnv
from pipeline.job.flops import flops_per_sample
from pipeline.job.placement import HostShare, pick_device, place_threads
from pipeline.job.preemption import Interrupted, StopSignal
from pipeline.job.record import build_record, rank_result
from pipeline.job.trainer import Trainer, TrainOutcome
from pipeline.rundir import CHECKPOINT_NAME, RECORD_NAME, WEIGHTS_NAME, Point, utc_now

log = logging.getLogger("pipeline.worker")


def run_point(point_dir: str | Path) -> Path:
    """Train one sweep point on this rank. Returns the record's path (written by rank 0)."""
    point_dir = Path(point_dir)
    started_at, t0 = utc_now(), time.perf_counter()
    point = Point.read(point_dir)
    run = parse_run_config(point.config)
    env = DistEnv.detect()
    env.check_world(run.nodes, run.cluster.tasks_per_node)
    setup_logging(env)
    device = pick_device(run.trainer.device, env, local_mode=point.launch_mode == "local")
    store = join_process_group(env, device, run.cluster.timeout_s)
    finished = False
    try:
        share = place_threads(env)
        trainer, flops = build_trainer(run, env, device, point_dir)
        outcome = train(trainer, env, on_slurm=point.launch_mode == "slurm")
        write_result(point, run, env, trainer, outcome, share, flops, started_at, t0)
        dist.barrier()  # no rank tears the process group down while another still uses it
        finished = True
        return point_dir / RECORD_NAME
    finally:
        dist.destroy_process_group()
        if finished:
            leave_together(store, env)


def setup_logging(env: DistEnv) -> None:
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {env.rank}/{env.world_size} {env.node_name}] %(message)s")


def join_process_group(env: DistEnv, device: torch.device, timeout_s: int) -> dist.TCPStore:
    """NCCL on GPUs, gloo on CPUs. Returns the rendezvous store, held by the caller so that it outlives the
    process group (see leave_together)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0,
                          timeout=timeout)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=env.rank,
                            world_size=env.world_size, timeout=timeout)
    return store


def build_trainer(run: RunConfig, env: DistEnv, device: torch.device, point_dir: Path) -> tuple[Trainer, float]:
    """The dataset and the model from their `_target_`s, the trainer (resumed from a checkpoint if there is one),
    and the model's FLOPs per sample."""
    torch.manual_seed(run.trainer.seed)  # the same initial weights on every rank
    dataset = instantiate(run.dataset, _convert_="all")
    model = instantiate(run.model, _convert_="all", input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    trainer = Trainer(run, env, device, model, dataset, point_dir, resume=load_checkpoint(point_dir / CHECKPOINT_NAME))
    flops = flops_per_sample(model, dataset.input_shape, dataset.num_classes, device, trainer.autocast)
    return trainer, flops


def train(trainer: Trainer, env: DistEnv, on_slurm: bool) -> TrainOutcome:
    """Fit; on the preemption / time-limit signal rank 0 checkpoints at a step boundary and the job is requeued."""
    stop = StopSignal(env.rank)
    try:
        return trainer.fit(stop)
    except Interrupted as e:
        trainer.save_checkpoint(e.step)
        log.warning("%s; checkpoint %s", e, trainer.checkpoint_path)
        stop.hand_over(env, on_slurm)  # does not return


def write_result(point: Point, run: RunConfig, env: DistEnv, trainer: Trainer, outcome: TrainOutcome,
                 share: HostShare, flops: float, started_at: str, t0: float) -> None:
    """Every rank's entry goes to rank 0, which saves the weights and writes the record."""
    mine = rank_result(env, trainer, share, run, outcome)
    ranks = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object(mine, ranks, dst=0)
    if env.rank != 0:
        return
    point_dir = trainer.point_dir
    save(trainer.raw_model.state_dict(), point_dir / WEIGHTS_NAME)
    record = build_record(point, run, env, trainer, flops, dist.get_backend(), outcome, ranks, started_at,
                          time.perf_counter() - t0)
    path = record.write(point_dir)
    log.info("test accuracy %.4f, %.0f samples/s; record: %s", outcome.test_accuracy,
             record.throughput_samples_per_s or 0.0, path)


def leave_together(store: dist.TCPStore, env: DistEnv) -> None:
    """Rank 0 hosts the store; it exits only after every rank has torn its process group down. Exiting earlier
    can abort a rank still tearing down ("terminate called without an active exception", seen with gloo)."""
    store.add("left", 1)
    if env.rank == 0:
        deadline = time.monotonic() + 60
        while store.add("left", 0) < env.world_size and time.monotonic() < deadline:
            time.sleep(0.01)
