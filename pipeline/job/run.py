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

from pipeline.config import ConfigError, LocalClusterConfig, RunConfig, parse_run_config
from pipeline.job.build import build_datasets, build_loss, build_model, target_of
from pipeline.job.checkpoint import Checkpoints, save
from pipeline.job.data import check_datasets, check_workers
from pipeline.job.env import DistEnv
from pipeline.job.flops import flops_per_sample
from pipeline.job.placement import HostShare, pick_device, place_threads
from pipeline.job.preemption import Interrupted, StopSignal
from pipeline.job.record import build_record, rank_result
from pipeline.job.trainer import Trainer, TrainOutcome
from pipeline.rundir import RECORD_NAME, WEIGHTS_NAME, Failure, Point, failure_path, utc_now

log = logging.getLogger("pipeline.worker")


POINT_KEY = "pipeline/point_dir"  # where rank 0 tells the others which folder it froze the config into


def run_from_overrides(overrides: list[str]) -> Path:
    """Train with no prior launch (torchrun, or one process): rank 0 composes the config from the overrides,
    checks it and freezes it into its folder (one folder, one composition, shared through the rendezvous store);
    then every rank trains that point."""
    from pipeline.launcher.points import freeze_from_overrides  # torch-free: the launch side's own steps

    env = DistEnv.detect()
    store = rendezvous_store(env, timedelta(seconds=LocalClusterConfig.timeout_s))
    if env.rank == 0:
        # the world is torchrun's, unless the overrides say otherwise (then check_world says which differs)
        given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        world = [f"{key}={value}" for key, value in (("nodes", env.num_nodes),
                                                     ("cluster.tasks_per_node", env.local_world_size))
                 if key not in given]
        try:
            point_dir = freeze_from_overrides([*world, *overrides], launch_mode=env.source)
        except ConfigError as e:
            store.set(POINT_KEY, f"error:{e}")
            raise SystemExit(f"pipeline.worker: configuration error: {e}") from None
        store.set(POINT_KEY, str(point_dir))
    else:
        answer = store.get(POINT_KEY).decode()
        if answer.startswith("error:"):
            raise SystemExit(f"pipeline.worker: rank 0 found a configuration error: {answer[6:]}")
        point_dir = Path(answer)
    return run_point(point_dir, store)


def run_point(point_dir: str | Path, store: dist.TCPStore | None = None) -> Path:
    """Train one sweep point on this rank. Returns the record's path (written by rank 0)."""
    point_dir = Path(point_dir)
    started_at, t0 = utc_now(), time.perf_counter()
    point = Point.read(point_dir)
    run = parse_run_config(point.config)
    env = DistEnv.detect()
    failure_path(point_dir, env.rank).unlink(missing_ok=True)  # an earlier attempt's
    finished = False
    try:
        env.check_world(run.nodes, run.cluster.tasks_per_node)
        setup_logging(env)
        device = pick_device(run.trainer.device, env, local_mode=point.launch_mode == "local")
        timeout = timedelta(seconds=run.cluster.timeout_s)
        store = store or rendezvous_store(env, timeout)
        join_process_group(env, device, store, timeout)
        share = place_threads(env)
        trainer, flops = build_trainer(run, env, device, point_dir, Checkpoints(point_dir, point.run_id, point.config))
        if trainer.loader_info.kind == "dataloader":
            check_workers(run.loader, share.threads, env)
        outcome = train(trainer, env, on_slurm=point.launch_mode == "slurm")
        write_result(point, run, env, trainer, outcome, share, flops, started_at, t0)
        dist.barrier()  # no rank tears the process group down while another still uses it
        finished = True
        return point_dir / RECORD_NAME
    except Exception as e:
        # written down before the teardown below, which makes the other ranks fail too: the launcher and status
        # tell the rank that failed first by it
        Failure(rank=env.rank, node_rank=env.node_rank, at_unix=time.time(),
                error=f"{type(e).__name__}: {e}"[:2000]).write(point_dir)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if finished:
            leave_together(store, env)


def setup_logging(env: DistEnv) -> None:
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {env.rank}/{env.world_size} {env.node_name}] %(message)s")


def rendezvous_store(env: DistEnv, timeout: timedelta) -> dist.TCPStore:
    """The key-value store the ranks meet at: torchrun's agent's, where it hosts one (every rank a client, as
    torch's env:// does), else one that rank 0 hosts. Held by the caller, so that it outlives the process group
    (see leave_together)."""
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                         is_master=env.rank == 0 and not env.agent_store, timeout=timeout)


def join_process_group(env: DistEnv, device: torch.device, store: dist.TCPStore, timeout: timedelta) -> None:
    """NCCL on GPUs, gloo on CPUs."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=env.rank,
                            world_size=env.world_size, timeout=timeout)


def build_trainer(run: RunConfig, env: DistEnv, device: torch.device, point_dir: Path,
                  checkpoints: Checkpoints) -> tuple[Trainer, float]:
    """The datasets, the model and the loss from their `_target_`s, the trainer (resumed from a checkpoint if
    there is one), and the model's FLOPs per sample, counted on two training samples: the first time the model
    meets the data and the loss, so a misfit is reported here, naming them."""
    torch.manual_seed(run.trainer.seed)  # the same initial weights on every rank
    train_set, test_set = build_datasets(run, env.rank)
    check_datasets(train_set, test_set, target_of(run.dataset), env.rank)
    model = build_model(run, train_set, env.rank)
    trainer = Trainer(run, env, device, model, train_set, test_set, build_loss(run, env.rank), point_dir, checkpoints)
    x, y = trainer.sample_batch(2)
    try:
        flops = flops_per_sample(trainer.raw_model, x, y, trainer.loss_fn, trainer.autocast)
    except Exception as e:
        raise RuntimeError(f"rank {env.rank}: model._target_={target_of(run.model)} and loss._target_="
                           f"{target_of(run.loss)} could not train on a batch of dataset._target_="
                           f"{target_of(run.dataset)} (inputs {tuple(x.shape)} {x.dtype}, targets {tuple(y.shape)} "
                           f"{y.dtype}): {type(e).__name__}: {e}") from e
    return trainer, flops


def train(trainer: Trainer, env: DistEnv, on_slurm: bool) -> TrainOutcome:
    """Fit; on the preemption / time-limit signal rank 0 checkpoints at a step boundary and the job is requeued."""
    stop = StopSignal(env.rank)
    try:
        return trainer.fit(stop)
    except Interrupted as e:
        trainer.save_checkpoint(e.step)
        log.warning("%s; checkpoint %s", e, trainer.checkpoints.path)
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
    ev = outcome.evaluation
    log.info("%s%.0f samples/s; record: %s", f"test {ev.metric} {ev.value:.4f}, " if ev else "",
             record.throughput_samples_per_s or 0.0, path)


def leave_together(store: dist.TCPStore, env: DistEnv) -> None:
    """When rank 0 hosts the store, it exits only after every rank has torn its process group down. Exiting
    earlier can abort a rank still tearing down ("terminate called without an active exception", seen with
    gloo). torchrun's agent outlives its ranks, and so does its store."""
    if env.agent_store:
        return
    store.add("left", 1)
    if env.rank == 0:
        deadline = time.monotonic() + 60
        while store.add("left", 0) < env.world_size and time.monotonic() < deadline:
            time.sleep(0.01)
