"""Hand-made result records (schema 1) with chosen figures, for the collector's tests and benchmark."""

import json
import uuid
from pathlib import Path


def make_record(*, nodes: int, throughput: float, breakdown=(0.001, 0.006, 0.003), tasks_per_node: int = 1,
                busy=None, node_names=None, scaling: str = "weak", per_rank_batch: int = 64, global_batch=None,
                model: str = "mlp", precision: str = "fp32", oversubscribed: bool = False, sha: str = "a" * 40,
                gradient_bytes: int = 407_080, steps: int = 50, run_id: str | None = None) -> dict:
    world = nodes * tasks_per_node
    global_batch = global_batch or per_rank_batch * world
    per_rank_batch = global_batch // world if scaling == "strong" else per_rank_batch
    busy = busy or [breakdown[0] + breakdown[1]] * world
    names = node_names or [f"node{r // tasks_per_node + 1}" for r in range(world)]
    step = sum(breakdown)
    return {
        "schema_version": 1, "run_id": run_id or uuid.uuid4().hex, "sweep_id": "s", "point": 0, "overrides": [],
        "config": {"model": {"_target_": f"pipeline.models.{model.upper()}", "hidden": 128},
                   "dataset": {"_target_": "pipeline.data.Synthetic", "root": "/x"},
                   "trainer": {"optimizer": "sgd"}, "nodes": nodes},
        "launch_mode": "slurm", "model": model, "dataset": "synthetic", "nodes": nodes,
        "tasks_per_node": tasks_per_node, "world_size": world, "model_parameters": gradient_bytes // 4,
        "gradient_bytes": gradient_bytes, "device": {"type": "cpu", "name": "x86_64 CPU"}, "backend": "gloo",
        "precision": precision, "scaling": scaling, "per_rank_batch": per_rank_batch, "global_batch": global_batch,
        "steps": steps + 5, "warmup_steps": 5, "timed_steps": steps, "throughput_samples_per_s": throughput,
        "breakdown_s": dict(zip(("data", "compute", "comm"), breakdown)),
        "breakdown_share": {k: v / step for k, v in zip(("data", "compute", "comm"), breakdown)},
        "oversubscribed": oversubscribed,
        "ranks": [{"rank": r, "node_name": names[r], "hostname": "h", "step_time_median_s": step,
                   "busy_time_median_s": busy[r], "step_times_s": [step] * steps} for r in range(world)],
        "provenance": {"git": {"sha": sha, "dirty": False}},
    }


def write_record(folder: Path, record: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "result.json"
    path.write_text(json.dumps(record))
    return path
