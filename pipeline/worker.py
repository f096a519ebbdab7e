"""The worker: what every rank runs, in local debug mode, under submitit and under a plain `srun`.

    python -m pipeline.worker POINT_DIR

reads the frozen config `launch` wrote to POINT_DIR/point.json, joins the process group, trains, and rank 0
writes POINT_DIR/result.json.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate

from pipeline.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from pipeline.config import parse_run_config
from pipeline.distributed import DistEnv
from pipeline.flops import flops_per_sample, utilisation
from pipeline.record import (RECORD_NAME, SCHEMA_VERSION, WEIGHTS_NAME, package_versions, read_point, utc_now,
                             write_json_atomic)
from pipeline.timing import COMM_MEASUREMENT, DEFINITIONS, rank_timing, summarize
from pipeline.trainer import Interrupted, Trainer

log = logging.getLogger("pipeline.worker")
EXIT_REQUEUED = 75  # EX_TEMPFAIL: stopped on purpose, to be continued by the requeued job


def gpu_index(choice: str, slot: int, sharing: int, gpus: int, same_gpus_for_all: bool) -> int | None:
    """The CUDA device this rank trains on, or None for the CPU.

    `slot` is the rank's place among the `sharing` ranks on its machine, `gpus` how many devices it sees. NCCL
    needs a GPU per rank. In local debug mode every rank sees the same devices (`same_gpus_for_all`), so more
    ranks than GPUs means sharing; trainer.device=auto then trains on the CPU. On a cluster a rank that sees a
    single GPU may have been bound to its own (srun --gpus-per-task, --gpu-bind), so that one is taken.
    """
    if choice == "cpu" or (choice == "auto" and gpus == 0):
        return None
    if gpus == 0:
        raise RuntimeError("trainer.device=cuda but this node has no CUDA device; use trainer.device=cpu or auto")
    if sharing <= gpus or (gpus == 1 and not same_gpus_for_all):
        return slot % gpus
    where = (f"local debug mode runs all {sharing} ranks (nodes x cluster.tasks_per_node) on this machine"
             if same_gpus_for_all else f"{sharing} ranks (cluster.tasks_per_node) run on this node")
    if choice == "auto" and same_gpus_for_all:
        log.warning("%s, which has %d GPU(s): NCCL needs one per rank, so this point trains on the CPU with gloo "
                    "(trainer.device=auto)", where, gpus)
        return None
    raise RuntimeError(f"{where}, which has {gpus} GPU(s), and NCCL needs one GPU per rank. Use at most {gpus} "
                       f"ranks per machine, or trainer.device=cpu.")


def pick_device(choice: str, env: DistEnv, local_mode: bool) -> torch.device:
    slot, sharing = (env.rank, env.world_size) if local_mode else (env.local_rank, env.local_world_size)
    index = gpu_index(choice, slot, sharing, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                      same_gpus_for_all=local_mode)
    if index is None:
        return torch.device("cpu")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def place_threads(env: DistEnv) -> dict:
    """Give each process its share of the host's cores, so N x M local processes do not oversubscribe it.

    Ranks sharing a host are counted from every rank's hostname, which also covers simulated nodes and several
    Slurm nodes on one machine. Slurm's --cpus-per-task, when set, is the share the allocation grants.
    """
    hostnames = [None] * env.world_size
    dist.all_gather_object(hostnames, socket.gethostname())
    on_host = hostnames.count(socket.gethostname())
    cores = os.cpu_count() or 1
    granted = os.environ.get("SLURM_CPUS_PER_TASK")
    threads = int(granted) if granted else max(1, cores // on_host)
    torch.set_num_threads(threads)
    return {"hostname": socket.gethostname(), "processes_on_host": on_host, "host_cores": cores,
            "threads": threads, "oversubscribed": on_host > cores}


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            (os.uname().machine + " CPU")}
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        # torch's defaults let cuDNN convolutions, not matmuls, run fp32 math as TF32
        info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    return info


def parameters_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all ranks when DDP kept them in sync."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def warmup_of(run, outcome) -> int:
    """Warm-up steps excluded from this segment's timing (a resumed run warms up again)."""
    return min(run.trainer.warmup_steps, outcome.steps - outcome.start_step)


def earlier_segments(segments: list[dict], warmup: int, global_batch: int) -> list[dict]:
    """Rank 0's throughput in each stretch before a restart (each after its own warm-up)."""
    out = []
    for seg in segments:
        phases = seg["phases"].numpy()
        timed = phases[warmup:, 0]
        out.append({"start_step": seg["start_step"], "steps": len(phases), "timed_steps": len(timed),
                    "throughput_samples_per_s": global_batch * len(timed) / timed.sum() if len(timed) else None})
    return out


def build_record(point: dict, run, env: DistEnv, trainer: Trainer, flops: float, backend: str, outcome,
                 ranks: list[dict], started_at: str, wall: float) -> dict:
    t, model, device = run.trainer, trainer.raw_model, device_info(trainer.device)
    timing = summarize(ranks, run.global_batch)
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": point["run_id"],
        "sweep_id": point["sweep_id"],
        "point": point["point"],
        "overrides": point["overrides"],
        "config": point["config"],
        "launch_mode": point["launch_mode"],
        "model": run.model._target_.rsplit(".", 1)[-1].lower(),
        "dataset": run.dataset._target_.rsplit(".", 1)[-1].lower(),
        "nodes": env.num_nodes,
        "tasks_per_node": env.local_world_size,
        "world_size": env.world_size,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        # what DDP all-reduces every step: one fp32 gradient per parameter
        "gradient_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "device": device,
        "backend": backend,
        "precision": trainer.precision,
        "fast_path": trainer.fast_path,
        "scaling": t.scaling,
        "per_rank_batch": run.per_rank_batch,
        "global_batch": run.global_batch,
        "steps": outcome.steps,
        "steps_per_epoch": outcome.steps_per_epoch,
        "warmup_steps": warmup_of(run, outcome),
        "resumed_from_step": outcome.start_step,
        "restart_count": env.restart_count,
        "earlier_segments": earlier_segments(trainer.segments, t.warmup_steps, run.global_batch),
        **timing,
        **utilisation(flops, timing["throughput_samples_per_s"], env.world_size, device["name"], trainer.precision),
        "comm_measurement": COMM_MEASUREMENT,
        "final_train_loss": outcome.final_train_loss,
        "test_accuracy": outcome.test_accuracy,
        "wall_time_s": wall,
        "oversubscribed": any(r["oversubscribed"] for r in ranks),
        "weights": WEIGHTS_NAME,
        "ranks": ranks,
        "provenance": {
            "git": point["git"],
            "hostnames": sorted({r["hostname"] for r in ranks}),
            "versions": package_versions(),
            # in local debug mode these are the simulated job's values
            "slurm": {"job_id": env.job_id, "nodelist": env.nodelist, "simulated": point["launch_mode"] == "local"}
            if env.source == "slurm" else None,
            "launched_at": point["launched_at"],
            "started_at": started_at,
            "first_step_at_unix": trainer.first_step_at,
            "ended_at": utc_now(),
        },
        "definitions": DEFINITIONS,
    }


def on_stop_signal(trainer: Trainer) -> tuple[int, object]:
    """Defer the preemption / time-limit signal to the next step boundary, where rank 0 checkpoints.

    Slurm sends it (`--signal=USR2@90`) to every task; submitit has installed its own handler, which requeues the
    job and exits. That handler runs only after the checkpoint, from `hand_over`. Returns (signal, previous handler).
    """
    signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
    previous = signal.getsignal(signum)

    def request_stop(sig, frame):
        trainer.stop_signal = sig
        if trainer.env.rank != 0:
            log.warning("stop signal received: training on until rank 0 checkpoints and the job is requeued")

    signal.signal(signum, request_stop)
    return signum, previous


def hand_over(signum: int, previous, env: DistEnv, on_slurm: bool) -> None:
    """After rank 0's checkpoint: let submitit requeue the job, or requeue it ourselves under a plain sbatch."""
    if callable(previous):
        previous(signum, None)  # submitit: resubmits the callable (it resumes from the checkpoint), exits
    if on_slurm and env.job_id and shutil.which("scontrol"):
        log.warning("checkpoint saved; requeueing job %s", env.job_id)
        subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60)
    sys.exit(EXIT_REQUEUED)


def run_point(point_dir: str | Path) -> Path:
    """Train one sweep point on this rank. Returns the record's path (written by rank 0)."""
    point_dir = Path(point_dir)
    started_at, t0 = utc_now(), time.perf_counter()
    point = read_point(point_dir)
    run = parse_run_config(point["config"])
    env = DistEnv.detect()
    env.check_world(run.nodes, run.cluster.tasks_per_node)
    _setup_logging(env)
    device = pick_device(run.trainer.device, env, local_mode=point["launch_mode"] == "local")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=run.cluster.timeout_s)
    # the rendezvous store, held here so that it outlives the process group (see leave_together)
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0,
                          timeout=timeout)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    finished = False
    try:
        placement = place_threads(env)
        torch.manual_seed(run.trainer.seed)  # the same initial weights on every rank
        dataset = instantiate(run.dataset, _convert_="all")
        model = instantiate(run.model, _convert_="all", input_shape=dataset.input_shape,
                            num_classes=dataset.num_classes)
        trainer = Trainer(run, env, device, model, dataset, point_dir,
                          resume=load_checkpoint(point_dir / CHECKPOINT_NAME))
        flops = flops_per_sample(model, dataset.input_shape, dataset.num_classes, device, trainer.autocast)
        signum, previous = on_stop_signal(trainer)
        try:
            outcome = trainer.fit()
        except Interrupted as stop:
            trainer.save_checkpoint(stop.step)
            log.warning("%s; checkpoint %s", stop, trainer.checkpoint_path)
            hand_over(signum, previous, env, on_slurm=point["launch_mode"] == "slurm")
        mine = {"rank": env.rank, "local_rank": env.local_rank, "node_rank": env.node_rank,
                "node_name": env.node_name, "device": str(device), **placement,
                "parameters_sha256": parameters_digest(trainer.raw_model),
                **rank_timing(outcome.phases, warmup_of(run, outcome))}
        ranks = [None] * env.world_size if env.rank == 0 else None
        dist.gather_object(mine, ranks, dst=0)
        record_path = point_dir / RECORD_NAME
        if env.rank == 0:
            save_atomic(trainer.raw_model.state_dict(), point_dir / WEIGHTS_NAME)
            record = build_record(point, run, env, trainer, flops, backend, outcome, ranks, started_at,
                                  time.perf_counter() - t0)
            write_json_atomic(record_path, record)
            log.info("test accuracy %.4f, %.0f samples/s; record: %s", outcome.test_accuracy,
                     record["throughput_samples_per_s"] or 0.0, record_path)
        dist.barrier()  # no rank tears the process group down while another still uses it
        finished = True
        return record_path
    finally:
        dist.destroy_process_group()
        if finished:
            leave_together(store, env)


def leave_together(store: dist.TCPStore, env: DistEnv) -> None:
    """Rank 0 hosts the store; it exits only after every rank has torn its process group down. Exiting earlier
    can abort a rank still tearing down ("terminate called without an active exception", seen with gloo)."""
    store.add("left", 1)
    if env.rank == 0:
        deadline = time.monotonic() + 60
        while store.add("left", 0) < env.world_size and time.monotonic() < deadline:
            time.sleep(0.01)


def _setup_logging(env: DistEnv) -> None:
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {env.rank}/{env.world_size} {env.node_name}] %(message)s")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pipeline.worker POINT_DIR")
    run_point(sys.argv[1])
