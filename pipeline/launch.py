"""Launch a run or a sweep:  python -m pipeline.launch [-m] [overrides...]

Hydra composes the config of each sweep point; the point is checked, frozen into its own folder
(point.json: the resolved config and its provenance) and run: in local debug mode as simulated nodes on this
machine, one point after another. With -m, every point of the sweep is checked before any of them runs
(hydra_plugins/pipeline_launcher). This module imports no torch: it runs on login nodes.
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
from pipeline.record import POINT_NAME, RECORD_NAME, point_file, write_json_atomic

log = logging.getLogger("pipeline.launch")
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
        raise ConfigError("cluster=slurm: submitting to Slurm is not implemented yet; use cluster=local")
    return run


def exit_on_config_error(error: ConfigError) -> None:
    """Bad input ends the launch with the message alone (no traceback) and exit code 2."""
    print(f"pipeline.launch: configuration error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    try:
        run = prepare_run(cfg)
    except ConfigError as e:
        exit_on_config_error(e)
    hc = HydraConfig.get()
    point_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_id = Path(hc.sweep.dir).name if multirun else point_dir.name
    point = point_file(run_id=uuid.uuid4().hex, sweep_id=sweep_id, point=int(hc.job.num) if multirun else 0,
                       overrides=list(hc.overrides.task), config=to_plain(run), kind=run.cluster.kind)
    write_json_atomic(point_dir / POINT_NAME, point)
    cores = os.cpu_count() or 1
    if run.world_size > cores:
        log.warning("%d processes on %d cores: this point is oversubscribed; its record says so, and its timings "
                    "do not measure scaling", run.world_size, cores)
    log.info("point %s: %d node(s) x %d task(s) in local debug mode, folder %s",
             point["point"], run.nodes, run.cluster.tasks_per_node, point_dir)
    run_local(point_dir, run, job_id=f"local-{point['run_id'][:8]}")
    record = point_dir / RECORD_NAME
    log.info("record: %s", record)
    return str(record)


if __name__ == "__main__":
    main()
