"""What every rank runs, in local debug mode, under submitit, under a plain `srun` and under torchrun: read the point's
frozen config, join the process group, check the nodes, build the workload and the trainer, probe the fabric,
train, and (rank 0) write the record; each a named step of `run_point`.

Entry: `python -m pipeline.worker POINT_DIR` (pipeline/worker.py), or `TrainingJob` under submitit.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
import weakref
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
# torch.optim and DDP import torch._dynamo on first use (most of a second): imported here, it counts as an import
# in the start-up breakdown, and local mode's warm worker pays it before its point arrives
import torch._dynamo  # noqa: F401
import torch.distributed as dist

from pipeline.config import ConfigError, LocalClusterConfig, parse_run_config
from pipeline.job.build import build_workload
from pipeline.job.checkpoint import Checkpoints, save
from pipeline.job.context import Job
from pipeline.job.env import DistEnv
from pipeline.job.health import BadNodesFound, JobReporter, RankFacts, check_health
from pipeline.job.heartbeat import silent_ranks, start_heartbeat
from pipeline.job.observe import Reporter, hparams_of, tensorboard_dir
from pipeline.job.parallel import Parallel, gradient_bytes
from pipeline.job.placement import pick_device, place_threads
from pipeline.job.preemption import Interrupted, StopSignal
from pipeline.job.probe import describe, fell_back_to_sockets, nccl_interface, probe_sharded, route_interface, run_probe
from pipeline.job.record import Finals, JobFacts, build_record, rank_result
from pipeline.job.trainer import Judge, Trainer, TrainOutcome
from pipeline.result import Fabric, Health, HostShare, Result
from pipeline.tracking.trackers import summary_figures
from pipeline.rundir import (LOG_DIR, RECORD_NAME, TRIAL_NAME, WEIGHTS_NAME, Failure, Point, TrialRef, failure_path,
                             utc_now, write_failure)

log = logging.getLogger("pipeline.worker")
# torchrun without a launch: rank 0 tells the others, through the rendezvous store, where it froze the point (or
# the configuration error it found, after ERROR_PREFIX)
POINT_STORE_KEY = "pipeline/point_dir"
ERROR_PREFIX = "error:"


class Stopwatch:
    """Seconds from this process's start (the kernel's record of it, so the interpreter's start and the imports
    count) to named moments of the rank's start-up: what docs/performance.md's start-up breakdown shows."""

    def __init__(self):
        self.origin = process_start()
        self.marks = {"ready": time.time() - self.origin}

    def mark(self, name: str) -> None:
        self.marks[name] = time.time() - self.origin


def process_start() -> float:
    """This process's start as unix time (Linux: /proc); now, where that cannot be read."""
    try:  # its age: the system's uptime now less its start in clock ticks after boot (both to 10 ms)
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return time.time()  # where rank 0 tells the others which folder it froze the config into


def run_from_overrides(overrides: list[str]) -> Path:
    """Train with no prior launch (torchrun, or one process): rank 0 composes the config from the overrides,
    checks it and freezes it into its folder (one folder, one composition, shared through the rendezvous store);
    then every rank trains that point."""
    from pipeline.point import freeze_from_overrides  # torch-free, as the launch composes a point

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
            store.set(POINT_STORE_KEY, f"{ERROR_PREFIX}{e}")
            raise SystemExit(f"pipeline.worker: configuration error: {e}") from None
        store.set(POINT_STORE_KEY, str(point_dir))
    else:
        answer = store.get(POINT_STORE_KEY).decode()
        if answer.startswith(ERROR_PREFIX):
            raise SystemExit(f"pipeline.worker: rank 0 found a configuration error: {answer[len(ERROR_PREFIX):]}")
        point_dir = Path(answer)
    return run_point(point_dir, store)


def run_point(point_dir: str | Path, store: dist.TCPStore | None = None) -> Path:
    """Train one sweep point on this rank. Returns the record's path (written by rank 0)."""
    point_dir = Path(point_dir)
    started_at, t0, clock = utc_now(), time.perf_counter(), Stopwatch()
    point = Point.read(point_dir)
    run = parse_run_config(point.config)
    env = DistEnv.detect()
    failure_path(point_dir, env.rank).unlink(missing_ok=True)  # an earlier attempt's
    finished, trainer, reporter = False, None, None
    try:
        env.check_world(run.nodes, run.cluster.tasks_per_node)
        setup_logging(env)
        device = pick_device(run.trainer.device, env, local_mode=point.launch_mode == "local")
        job = Job(point=point, run=run, env=env, device=device, point_dir=point_dir)
        timeout = timedelta(seconds=run.cluster.timeout_s)
        store = store or rendezvous_store(env, timeout)
        join_process_group(job, store, timeout)
        start_heartbeat(store, env.rank, env.world_size, run.cluster.silent_s, end_for_silence(job))
        clock.mark("rendezvous")
        host, roster = place_threads(env, device, clock.marks["ready"])
        health = check_nodes(job, store, roster)
        clock.mark("health")
        workload = build_workload(run, env.rank, clock.mark, env.world_size)
        reporter = Reporter(job, tensorboard_dir(point, point_dir))
        trainer = Trainer(job, workload, Checkpoints(point_dir, point.run_id, point.config), reporter)
        clock.mark("trainer")
        trainer.check_on_samples()
        fabric = probe_fabric(job, trainer.parallel)
        clock.mark("probe")
        outcome = train(trainer, job)
        if outcome.first_step_at is not None:
            clock.marks["first_step"] = outcome.first_step_at - clock.origin
        facts = JobFacts(backend=dist.get_backend(), started_at=started_at, wall_s=time.perf_counter() - t0,
                         startup=clock.marks, model_label=workload.label, fabric=fabric, health=health)
        unwritten = write_result(job, trainer, outcome, host, facts, reporter)
        trainer.close()
        dist.barrier()  # no rank tears the process group down while another still uses it
        finished = True
        if unwritten:  # after the others have left together: the record says incomplete, the exit status too
            raise OutputNotWritten(f"the run trained to the end, but {unwritten}; its record says incomplete")
        return point_dir / RECORD_NAME
    except Exception as e:
        # written down before the teardown below, which makes the other ranks fail too: the launcher and status
        # tell the rank that failed first by it. A folder that cannot be written (read-only, full) fails these
        # too: said in the log, and the run's own error is the one raised, not the writer's
        try:
            Failure.of(e, rank=env.rank, node_rank=env.node_rank, silent=silent_ranks(store, env, e)).write(point_dir)
            if reporter is not None:
                reporter.end("failed", {}, [point_dir / LOG_DIR])
        except OSError as unwritten:
            log.error("rank %d: its failure record could not be written either (%s: %s); the failure: %s: %s",
                      env.rank, type(unwritten).__name__, unwritten, type(e).__name__, e)
        raise
    finally:
        held, trainer = weakref.ref(trainer) if trainer else None, None
        release_process_group(held)
        if finished:
            leave_together(store, env)


def end_for_silence(job: Job) -> Callable[[str], None]:
    """What the heartbeat's watcher does when a rank has been silent for cluster.silent_s: say so in its log and
    its failure record (which the launcher and `status` show as the rank that failed first), and end this process,
    which ends the run (srun --kill-on-bad-exit, or the local launcher) long before the collectives time out."""
    c = job.run.cluster

    def end(said: str) -> None:
        message = (f"{said}; no heartbeat for cluster.silent_s={c.silent_s:g} s: rank {job.rank} ends the run now, "
                   f"rather than when the others' collectives time out (cluster.timeout_s={c.timeout_s} s)")
        log.error("%s", message)
        Failure(rank=job.rank, node_rank=job.env.node_rank, at_unix=time.time(), error=message[:2000]).write(
            job.point_dir)
        logging.shutdown()
        os._exit(1)
    return end


class OutputNotWritten(RuntimeError):
    """A run's file (its weights) could not be written after training."""


def setup_logging(env: DistEnv) -> None:
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {env.rank}/{env.world_size} {env.node_name}] %(message)s")


def rendezvous_store(env: DistEnv, timeout: timedelta) -> dist.TCPStore:
    """The key-value store the ranks meet at: torchrun's agent's, where it hosts one (every rank a client, as
    torch's env:// does), else one that rank 0 hosts. Held by the caller, so that it outlives the process group
    (see leave_together)."""
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                         is_master=env.rank == 0 and not env.agent_store, timeout=timeout)


def join_process_group(job: Job, store: dist.TCPStore, timeout: timedelta) -> None:
    """NCCL on GPUs, gloo on CPUs. NCCL's INFO log (its choice of transport, and from the GRAPH lines whether the
    GPUs of a node are joined by NVLink, which the fabric probe reports) goes to POINT_DIR/logs/nccl-<host>-<pid>.log,
    unless the user set NCCL_DEBUG."""
    logs = job.point_dir / LOG_DIR
    if job.cuda and "NCCL_DEBUG" not in os.environ:
        logs.mkdir(parents=True, exist_ok=True)
        os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET,GRAPH",
                          NCCL_DEBUG_FILE=str(logs / "nccl-%h-%p.log"))
    dist.init_process_group("nccl" if job.cuda else "gloo", store=store, rank=job.rank, world_size=job.world_size,
                            timeout=timeout)


def check_nodes(job: Job, store: dist.TCPStore, roster: list[RankFacts]) -> Health | None:
    """A multi-node job's health check, before anything is built (health.enabled): rank 0's figures of every node
    for the record, or BadNodesFound on every rank when the policy stops the job."""
    if job.env.num_nodes == 1 or not job.run.health.enabled:
        return None
    health, verdict = check_health(job.run.health, store, job.device, roster, job.rank, JobReporter(job))
    if verdict.stop:
        raise BadNodesFound(verdict.message)
    return health


def probe_fabric(job: Job, parallel: Parallel) -> Fabric | None:
    """A multi-rank job's all-reduce (and a sharded job's collectives, on FSDP's groups), timed before training up
    to the model's gradient (probe.enabled); a multi-node NCCL job on TCP sockets is warned about in the log."""
    if job.world_size == 1 or not job.run.probe.enabled:
        return None
    logs = sorted((job.point_dir / LOG_DIR).glob("nccl-*.log"))
    nbytes, start = gradient_bytes(parallel.raw), time.perf_counter()
    fabric = run_probe(nbytes, job.device, dist.get_backend(), job.world_size, logs)
    fabric = replace(fabric, collectives=probe_sharded(nbytes, job.device, parallel.probe_groups()),
                     interface=nccl_interface(logs) if fabric.backend == "nccl" else
                     os.environ.get("GLOO_SOCKET_IFNAME") or route_interface(job.env.master_addr),
                     seconds=time.perf_counter() - start)
    if job.is_rank0:
        for line in describe(fabric):
            log.info(line)
        if fell_back_to_sockets(fabric, job.env.num_nodes):
            log.warning("NCCL uses TCP sockets between the nodes: no InfiniBand (or it is disabled, NCCL_IB_DISABLE); "
                        "expect multi-node steps to be slow")
    return fabric


def train(trainer: Trainer, job: Job) -> TrainOutcome:
    """Fit; on the preemption / time-limit signal rank 0 checkpoints at a step boundary and the job is requeued."""
    stop = StopSignal(job.rank)
    try:
        return trainer.fit(stop, trial_judge(job))
    except Interrupted as e:
        log.warning("%s; checkpoint %s", e, trainer.save_checkpoint(e.step))
        trainer.reporter.end("preempted", {}, [job.point_dir / LOG_DIR])  # the requeued job continues its runs
        stop.hand_over(job)  # does not return


def trial_judge(job: Job) -> Judge | None:
    """A search's trial (its folder holds trial.json): rank 0 reports each evaluation during training to the study,
    whose pruner judges it (pipeline.search.study.TrialJudge)."""
    if not job.is_rank0 or not (job.point_dir / TRIAL_NAME).exists():
        return None
    from pipeline.search.study import TrialJudge  # Optuna: only a search's trials need it

    return TrialJudge(TrialRef.read(job.point_dir))


def write_result(job: Job, trainer: Trainer, outcome: TrainOutcome, host: HostShare, facts: JobFacts,
                 reporter: Reporter) -> str | None:
    """Every rank's entry goes to rank 0, which saves the weights, counts the FLOPs, writes the record, and gives
    TensorBoard the run's overrides and final figures (its HParams view). Once training has finished a step that
    fails is logged, and the record says what is missing and why; only writing the record, or the weights (the
    record then says incomplete), fails the run. Returns the file not written (rank 0), else None."""
    mine = rank_result(job, host, outcome)
    sharded = trainer.parallel.sharded
    if sharded:  # gathering FSDP's shards is a collective: every rank takes part, before rank 0 goes on alone
        finals = make_finals(job, trainer, outcome)
    ranks = [None] * job.world_size if job.is_rank0 else None
    dist.gather_object(mine, ranks, dst=0)
    if not job.is_rank0:
        return
    if not sharded:
        finals = make_finals(job, trainer, outcome)
    record = build_record(job, trainer.setup(), outcome, ranks, facts, finals)
    path = record.write(job.point_dir)
    figures = summary_figures(record)
    end_tracked_runs(job, reporter, record, figures)
    attempt("tensorboard", {}, lambda: reporter.close(hparams_of(job.point), figures))
    ev = outcome.evaluation
    log.info("%s%.0f samples/s; record: %s", f"test {ev.metric} {ev.value:.4f}, " if ev else "",
             record.timing.throughput_samples_per_s or 0.0, path)
    return finals.unwritten


def end_tracked_runs(job: Job, reporter: Reporter, record: Result, figures: dict[str, float]) -> None:
    """The trackers' runs end as the record says, with its figures, the record and the rank logs; a tracker that
    could not take it all is said in the record's missing.tracking (rewritten), for `pipeline.track sync`."""
    reporter.end(record.status, figures, [job.point_dir / RECORD_NAME, job.point_dir / LOG_DIR])
    missed = reporter.metrics.failures().get("tracking")
    if missed is not None and record.missing.get("tracking") != missed:
        replace(record, missing={**record.missing, "tracking": missed}).write(job.point_dir)


def make_finals(job: Job, trainer: Trainer, outcome: TrainOutcome) -> Finals:
    """The trained weights saved (rank 0; not those of a run that diverged) and the FLOPs per sample counted: on
    rank 0 under DDP, on every rank under FSDP (whose state dict and forward gather)."""
    missing, saved, unwritten = {}, None, None
    if outcome.diverged_at_step is None:
        weights = attempt("weights", missing, trainer.parallel.weights)
        if weights is not None and job.is_rank0:
            saved = attempt("weights", missing, lambda: save(weights, job.point_dir / WEIGHTS_NAME) or WEIGHTS_NAME)
            if saved is None:  # a file the run did not write: it did not complete (its record says incomplete)
                unwritten = f"{WEIGHTS_NAME} could not be written: {missing['weights']}"
    else:
        missing["weights"] = f"not saved: the run diverged at step {outcome.diverged_at_step}"
    flops = attempt("flops_per_sample", missing, trainer.count_flops)
    return Finals(weights=saved, flops_per_sample=flops, missing=missing, unwritten=unwritten)


def attempt(name: str, missing: dict[str, str], make):
    """`make()`, or None when it fails after training: logged, and noted in `missing` (the record's), the OS's
    reason first where a write failed ("No space left on device")."""
    try:
        return make()
    except Exception as e:
        reason = write_failure(e)
        said = f"{reason + ': ' if reason else ''}{type(e).__name__}: {e}"[:500]
        log.warning("%s could not be produced after training: %s", name, said)
        missing[name] = said
        return None


def release_process_group(trainer: weakref.ref | None) -> None:
    """Destroy the process group after the trainer (its DDP) is gone. DDP's reducer holds the group: had it
    dropped the last hold, its destructor would join gloo's threads while holding the GIL that one of them, still
    releasing the tensors of the last collective, waits for (a hang seen at a rank's exit). Destroyed here, the
    group joins them without the GIL. A trainer still alive (in a cycle, or in a traceback) is collected first
    where it can be (a tenth of a second)."""
    if trainer is not None and trainer() is not None:
        gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_together(store: dist.TCPStore, env: DistEnv) -> None:
    """When rank 0 hosts the store, it exits only after every rank has torn its process group down. Exiting
    earlier can abort a rank still tearing down ("terminate called without an active exception", seen with
    gloo). torchrun's agent outlives its ranks, and so does its store."""
    if env.agent_store:
        return
    store.set(f"left/{env.rank}", "1")
    if env.rank == 0:
        try:
            store.wait([f"left/{r}" for r in range(env.world_size)], timedelta(seconds=60))
        except Exception:  # a rank that never left (it died): rank 0 has waited long enough
            pass
