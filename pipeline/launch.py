"""Launch a run or a sweep:  python -m pipeline.launch [-m] [overrides...]

Hydra composes the config of each sweep point; the point is checked, frozen into its own folder (point.json:
the resolved config and its provenance) and then either run in local debug mode (simulated nodes on this
machine, one point after another) or submitted to Slurm as its own job (cluster=slurm), after which the launch
returns. With -m, every point is checked before any is run or submitted (hydra_plugins/pipeline_launcher).
This module imports no torch: it runs on login nodes.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from pipeline.config import ConfigError, RunConfig, abspath_dataset_root, parse_run_config, register_configs, to_plain
from pipeline.local import run_local
from pipeline.manifest import record_point
from pipeline.record import POINT_NAME, RECORD_NAME, point_file, write_json_atomic
from pipeline.slurm import check_slurm_values, preflight, render_sbatch, submit
from pipeline.status import wait_for_sweep

log = logging.getLogger("pipeline.launch")
SWEEP_POSITION_ENV = "PIPELINE_SWEEP_POSITION"  # "point K of N", set by the sweep launcher for the progress bar
register_configs()


def prepare_run(cfg: DictConfig) -> RunConfig:
    """Type and check one point's config, datasets' files included. Raises ConfigError naming the key."""
    run = parse_run_config(cfg)
    abspath_dataset_root(run)
    try:
        instantiate(run.dataset, _convert_="all")  # constructing a dataset checks that its files exist
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise
    if run.cluster.kind == "slurm":
        check_slurm_values(run)
    return run


def check_allocation(run: RunConfig) -> str | None:
    """Would Slurm accept this point? The reason if not. A dry run submits nothing, so it is not asked (it also
    works where no cluster is reachable; `sbatch --test-only POINT_DIR/job.sbatch` asks later)."""
    if run.cluster.kind != "slurm" or run.dry_run:
        return None
    return preflight(run, job_name="pipeline-preflight")


def exit_on_config_error(error: ConfigError) -> None:
    """Bad input ends the launch with the message alone (no traceback) and exit code 2."""
    print(f"pipeline.launch: configuration error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run = prepare_run(cfg)
        problem = None if multirun else check_allocation(run)  # a sweep's points were checked by its launcher
        if problem:
            raise ConfigError(f"Slurm would reject this job: {problem}")
    except ConfigError as e:
        exit_on_config_error(e)
    point_dir = Path(hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir) if multirun else point_dir
    point = point_file(run_id=uuid.uuid4().hex, sweep_id=sweep_dir.name, point=int(hc.job.num) if multirun else 0,
                       overrides=list(hc.overrides.task), config=to_plain(run), kind=run.cluster.kind)
    write_json_atomic(point_dir / POINT_NAME, point)
    if run.cluster.kind == "slurm":
        return submit_point(run, point, point_dir, sweep_dir, wait=run.wait and not multirun)
    cores = os.cpu_count() or 1
    if run.world_size > cores:
        log.warning("%d processes on %d cores: this point is oversubscribed; its record says so, and its timings "
                    "do not measure scaling", run.world_size, cores)
    log.info("point %s: %d node(s) x %d task(s) in local debug mode, folder %s",
             point["point"], run.nodes, run.cluster.tasks_per_node, point_dir)
    position = os.environ.get(SWEEP_POSITION_ENV, "point 1 of 1")
    run_local(point_dir, run, job_id=f"local-{point['run_id'][:8]}", position=position)
    record = point_dir / RECORD_NAME
    log.info("record: %s", record)
    return str(record)


def submit_point(run: RunConfig, point: dict, point_dir: Path, sweep_dir: Path, wait: bool) -> str:
    job_name = f"pipeline-{point['sweep_id']}-{point['point']}"
    if run.dry_run:
        script = point_dir / "job.sbatch"
        script.write_text(render_sbatch(run, point_dir, job_name))
        log.info("point %s: dry run, nothing submitted; the sbatch script: %s", point["point"], script)
        return str(script)
    job_id = submit(run, point_dir, job_name)
    record_point(sweep_dir, point=point["point"], point_dir=point_dir, overrides=point["overrides"],
                 nodes=run.nodes, job_id=job_id)
    log.info("point %s: submitted as Slurm job %s (%d node(s) x %d task(s)), folder %s", point["point"], job_id,
             run.nodes, run.cluster.tasks_per_node, point_dir)
    if wait:
        wait_for_sweep(sweep_dir)
    return job_id


if __name__ == "__main__":
    main()
