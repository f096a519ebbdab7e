"""Launch a run or a sweep:  python -m pipeline.launch [-m] [overrides...]

Hydra composes the config. A single point is typed and checked, frozen into its folder (point.json: the resolved
config and its provenance) and then run in local debug mode (simulated nodes on this machine) or submitted to
Slurm as its own job (cluster=slurm), after which the launch returns (or waits, with wait=true). With -m, the
sweep launcher (pipeline/launcher/sweep.py) checks every point before starting any, with the same steps.
Imports no torch: it runs on login nodes.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.config import ConfigError, register_configs
from pipeline.launcher.points import check_allocation, exit_on_config_error, prepare_run, start_point
from pipeline.launcher.status import wait_for_sweep

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://pipeline.conf", config_name="config")
def main(cfg: DictConfig) -> str:
    try:
        run = prepare_run(cfg)
        problem = check_allocation(run)
        if problem:
            raise ConfigError(f"Slurm would reject this job: {problem}")
    except ConfigError as e:
        exit_on_config_error(e)
    point_dir = start_point(run, position="point 1 of 1")
    if run.cluster.kind == "slurm" and run.wait and not run.dry_run:
        wait_for_sweep(point_dir)  # a single point's folder is its own sweep folder, with the manifest
    return str(point_dir)


if __name__ == "__main__":
    main()
