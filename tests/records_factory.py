"""Hand-made result records with chosen figures, for the collector's tests and benchmark. They are built as
`pipeline.result.Result` objects, so a field renamed there breaks this factory (and its tests) at once."""

import uuid
from pathlib import Path

from pipeline.result import (BadNode, CollectiveProbe, CollectiveVolume, DeviceInfo, Fabric, FastPath, Health,
                             HostShare, Memory, NodeHealth, ParallelInfo, PhaseSplit, ProbePoint, Provenance,
                             RankResult, RankTiming, Result, RunTiming, SlurmInfo, StepTime, Utilisation)
from pipeline.rundir import GitInfo, write_json

def make_record(*, nodes: int, throughput: float, breakdown=(0.001, 0.006, 0.003), tasks_per_node: int = 1,
                busy=None, node_names=None, scaling: str = "weak", per_rank_batch: int = 64, global_batch=None,
                model: str = "mlp", precision: str = "fp32", oversubscribed: bool = False, sha: str = "a" * 40,
                gradient_bytes: int = 407_080, steps: int = 50, run_id: str | None = None,
                probe: tuple[float, float] | None = None, transport: str = "tcp", backend: str = "gloo",
                steps_per_epoch: int = 100, device: str = "cpu", step_p95: float | None = None, threads: int = 1,
                host_cores: int | None = None, processes_on_host: int | None = None, health: Health | None = None,
                slurm: bool = True, parallel: ParallelInfo | None = None, memory: Memory | None = None) -> Result:
    """`probe`: (latency in s per ring step, bus bandwidth in bytes/s) of a synthetic fabric, which the record's
    fabric probe then measures exactly (a multi-rank run only). `step_p95`: the step time's 95th percentile (the
    median is the step); `processes_on_host` (default: tasks per node) ranks share each host's `host_cores` (default:
    a core per thread). `slurm`: real Slurm nodes (False: local debug mode's simulated ones). The probe measures
    every collective `parallel` plans; `memory`: every rank's."""
    world = nodes * tasks_per_node
    global_batch = global_batch or per_rank_batch * world
    per_rank_batch = global_batch // world if scaling == "strong" else per_rank_batch
    busy = busy or [breakdown[0] + breakdown[1]] * world
    names = node_names or [f"node{r // tasks_per_node + 1}" for r in range(world)]
    step = sum(breakdown)
    on_host = processes_on_host or tasks_per_node
    host = HostShare(hostname="h", processes_on_host=on_host, host_cores=host_cores or on_host * threads,
                     threads=threads, oversubscribed=oversubscribed)
    data, compute, comm = breakdown
    ranks = [RankResult(rank=r, local_rank=r % tasks_per_node, node_rank=r // tasks_per_node, node_name=names[r],
                        device="cpu", host=host, parameters_sha256="0" * 64, memory=memory,
                        timing=RankTiming(step_times_s=[step] * steps, step_time_median_s=step,
                                          busy_time_median_s=busy[r], data_mean_s=data, compute_mean_s=compute,
                                          comm_mean_s=comm)) for r in range(world)]
    return Result(
        run_id=run_id or uuid.uuid4().hex, sweep_id="s", point=0, overrides=[],
        config={"model": {"_target_": f"pipeline.workloads.models.{model.upper()}", "hidden": 128},
                "dataset": {"_target_": "pipeline.workloads.datasets.Synthetic", "root": "/x"},
                "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05}, "nodes": nodes},
        launch_mode="slurm", model=model, dataset="synthetic", nodes=nodes, tasks_per_node=tasks_per_node,
        world_size=world, model_parameters=gradient_bytes // 4, gradient_bytes=gradient_bytes,
        device=DeviceInfo(type=device, name="x86_64 CPU" if device == "cpu" else "NVIDIA H100 80GB HBM3"),
        backend=backend, precision=precision,
        fast_path=FastPath(data_on_device=False, channels_last=False, compile=False, pinned_memory=False),
        scaling=scaling, per_rank_batch=per_rank_batch, global_batch=global_batch, steps=steps + 5,
        steps_per_epoch=steps_per_epoch, warmup_steps=5, resumed_from_step=0, restart_count=0, earlier_segments=[],
        timing=RunTiming(timed_steps=steps, timed_wall_s=step * steps, throughput_samples_per_s=throughput,
                         throughput_per_rank_samples_per_s=throughput / world,
                         step_time_s=StepTime(mean=step, median=step, p95=step_p95 or step),
                         breakdown_s=PhaseSplit(data=data, compute=compute, comm=comm),
                         breakdown_share=PhaseSplit(data=data / step, compute=compute / step, comm=comm / step)),
        utilisation=Utilisation(flops_per_sample=1e6, achieved_tflops_per_device=None, peak_tflops_per_device=None,
                                mfu=None),
        comm_measurement="", final_train_loss=0.1, test_accuracy=0.9, wall_time_s=1.0, oversubscribed=oversubscribed,
        weights="model.pt", ranks=ranks,
        provenance=Provenance(git=GitInfo(sha=sha, dirty=False), hostnames=["h"], versions={},
                              slurm=SlurmInfo(job_id="1", nodelist="node[1-9]", simulated=not slurm),
                              launched_at="", started_at="", first_step_at_unix=None, ended_at=""),
        definitions={}, parallel=parallel,
        fabric=fabric(probe, world, transport, backend, parallel) if probe and world > 1 else None,
        health=health)


def health_of(figures: dict[str, tuple[float, float]], flags: dict[str, str] = ()) -> Health:
    """A health check's record: {node: (GEMM GFLOP/s, best link GB/s)}, and the nodes it flagged, with why."""
    flags = dict(flags)
    nodes = [NodeHealth(node=n, hostname=n, machine="m" + n, ranks=[i], ready_s=1.0, gemm_gflops=g, cpu_share=1.0,
                        gflops_per_cpu_s=g, throttled_periods=0, membw_gb_s=None, link_gb_s=link, latency_us=30.0,
                        flags=[flags[n]] if n in flags else [])
             for i, (n, (g, link)) in enumerate(figures.items())]
    return Health(policy="warn", threshold=0.5, device="cpu", mode="parallel", machines=len(nodes), seconds=1.0,
                  phases={}, nodes=nodes, links=[], bad=[BadNode(node=n, reason=f) for n, f in flags.items()],
                  notes=[])


def curve(probe: tuple[float, float], ranks: int, steps: int) -> list[ProbePoint]:
    latency, bandwidth = probe
    points = []
    for size in (8, 4096, 1 << 20, 1 << 24):
        t = steps * (ranks - 1) * latency + steps * (ranks - 1) / ranks * size / bandwidth
        points.append(ProbePoint(bytes=size, time_s=t, algbw_gb_s=size / t / 1e9,
                                 busbw_gb_s=size / t * steps * (ranks - 1) / ranks / 1e9))
    return points


def fabric(probe: tuple[float, float], world: int, transport: str, backend: str,
           parallel: ParallelInfo | None = None) -> Fabric:
    latency, bandwidth = probe
    probed = [c for c in (parallel.collectives if parallel else []) if c.group != "world" and c.ranks > 1]
    return Fabric(backend=backend, world_size=world, points=curve(probe, world, 2), seconds=0.5,
                  latency_us=latency * 1e6, bandwidth_gb_s=bandwidth / 1e9, transport=transport,
                  collectives=[CollectiveProbe(op=c.op, group=c.group, ranks=c.ranks,
                                               points=curve(probe, c.ranks, 2 if c.op == "all_reduce" else 1),
                                               latency_us=latency * 1e6, bandwidth_gb_s=bandwidth / 1e9)
                               for c in probed])


def sharded(kind: str, ranks: int, calls=(3, 2), nbytes=(3_000_000, 2_000_000), replicas: int = 1) -> ParallelInfo:
    """A sharded run's layout: `calls` all-gathers and reduce-scatters per step of `nbytes` in all, over a shard
    group of `ranks` (HSDP: and an all-reduce of the reduced shard across `replicas`)."""
    volumes = [CollectiveVolume(op=op, group="shard", ranks=ranks, calls=n, bytes=b)
               for op, n, b in zip(("all_gather", "reduce_scatter"), calls, nbytes)]
    if kind == "hsdp":
        volumes.append(CollectiveVolume(op="all_reduce", group="replicate", ranks=replicas, calls=calls[1],
                                        bytes=nbytes[1] // ranks))
    return ParallelInfo(kind=kind, shard_ranks=ranks, replicas=replicas, blocks=2, block_classes=["Block"],
                        param_dtype="fp32", reduce_dtype="fp32", reshard_after_forward=True,
                        activation_checkpointing=False, collectives=volumes)


def memory(state: int, sharded_bytes: int, peak: int | None, device: int | None = None) -> Memory:
    """A rank's memory: `state` bytes (a third each parameters, gradients, optimizer state), `sharded_bytes` of it
    sharded, the `peak`."""
    return Memory(parameter_bytes=state // 3, gradient_bytes=state // 3, optimizer_bytes=state - 2 * (state // 3),
                  state_bytes=state, sharded_bytes=sharded_bytes, peak_bytes=peak, peak_reserved_bytes=None,
                  baseline_bytes=None, device_bytes=device, peak_kind="cpu_rss")


def write_record(folder: Path, record: Result | dict) -> Path:
    """Write a record (or, for the tests of bad records, any JSON) as FOLDER/result.json."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "result.json"
    write_json(path, record.to_json() if isinstance(record, Result) else record, durable=False)
    return path
