"""Launch a run or a sweep:  python -m pipeline.launch [-m] [overrides...]

Hydra composes the config. A single point is typed and checked, frozen into its folder (point.json: the resolved
config and its provenance) and then run in local debug mode (simulated nodes on this machine) or submitted to
Slurm as its own job (cluster=slurm), after which the launch returns (or waits, with wait=true). With -m, the
sweep (pipeline/launcher/sweep.py) checks every point before starting any, with the same steps, and submits the
points whose allocations are identical as one job array. Imports no torch: it runs on login nodes.
"""

from __future__ import annotations

import sys

from pipeline.launcher import signals
from pipeline.launcher.local import prestart

if __name__ == "__main__":  # a single local run's ranks import torch while this process imports Hydra and composes
    signals.install()
    prestart(sys.argv[1:])

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.config import ConfigError, register_configs  # noqa: E402
from pipeline.launcher.errors import reported, run_reporting  # noqa: E402
from pipeline.launcher.points import (check_allocations, plan_from_hydra, resubmit_without_bad_nodes,  # noqa: E402
                                      start)
from pipeline.point import prepare_run  # noqa: E402
from pipeline.search.launch import launch_search  # noqa: E402
from pipeline.launcher.status import check_completed, wait_for_sweep  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://pipeline.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with reported():
        point, folder = plan_from_hydra(prepare_run(cfg))
        if point.run.search is not None:  # its workers ask for trials and train them
            return launch_search(point, folder)
        problem = check_allocations([point], folder).get(point.index)
        if problem:
            raise ConfigError(f"Slurm would reject this job: {problem}")
        start([point], folder)  # a single point's folder is its own sweep folder, with the manifest
    if point.run.cluster.kind == "slurm" and point.run.wait and not point.run.dry_run:
        check_completed(folder, wait_for_sweep(folder, resubmit_without_bad_nodes))


def mode_from_the_command_line(argv: list[str]) -> None:
    """A sweep asked for on the command line (-m, --multirun) is one whatever the config's hydra.mode says (Hydra's
    _run_app makes it one), yet Hydra composes the whole config a first time only to read that key (Hydra.get_mode:
    a fifth of a 3-point launch). Asked for with -m, the key is not read; without, Hydra reads it as it does.
    Hydra's internals: hydra-core is pinned to 1.3 (pyproject.toml), and tests/test_pins.py fails if they change."""
    if "-m" in argv or "--multirun" in argv:
        from hydra._internal.hydra import Hydra

        Hydra.get_mode = lambda self, config_name, overrides: None


def cli() -> None:
    """The `pipeline-launch` command: the same, its ranks started once this module is imported."""
    signals.install()
    prestart(sys.argv[1:])
    mode_from_the_command_line(sys.argv[1:])
    run_reporting(main)


if __name__ == "__main__":
    mode_from_the_command_line(sys.argv[1:])
    run_reporting(main)
