"""A sweep (`python -m pipeline.launch -m ...`), run by the Hydra launcher plugin in hydra_plugins/.

Every point is composed once, typed and checked (its config, its dataset files and, on Slurm, whether Slurm
would accept its allocation) before any point runs or is submitted. When a point cannot run, nothing is launched,
unless that point's own `allow_partial=true`, which skips it. Then each point is started from the config of that
first pass: Slurm points are submitted (the launch returns once they all are, or waits with `wait=true`), local
points run here one after another. Launch options are read from each point's own config, so
`-m cluster=local,slurm` does what it says.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.config import ConfigError, RunConfig
from pipeline.launcher.manifest import record_point
from pipeline.launcher.points import check_allocation, exit_on_config_error, prepare_run, start_point
from pipeline.launcher.status import wait_for_sweep

log = logging.getLogger(__name__)


@dataclass
class SweepPoint:
    index: int  # Hydra's job number: the point's folder and its number in the manifest
    overrides: list[str]
    cfg: DictConfig  # composed once; Hydra's run_job makes the point's folder and its .hydra/ from it
    run: RunConfig | None  # None when the config could not be typed
    problem: str | None  # why the point cannot run, if it cannot

    @property
    def label(self) -> str:
        return f"point #{self.index} ({' '.join(filter_overrides(self.overrides))})"

    @property
    def allow_partial(self) -> bool:
        return (self.run.allow_partial if self.run is not None else
                OmegaConf.select(self.cfg, "allow_partial", default=False) is True)


def launch_sweep(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int) -> list[JobReturn]:
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    points = [compose_and_check(hydra_context, config, idx, list(overrides))
              for idx, overrides in enumerate(job_overrides, start=initial_job_idx)]
    sweep_dir = Path(str(config.hydra.sweep.dir))
    runnable = refuse_or_skip(points, sweep_dir)
    # Slurm points first: their jobs can start on the cluster while local points run here
    runnable.sort(key=lambda p: p.run.cluster.kind != "slurm")
    runs = []
    for n, p in enumerate(runnable, start=1):
        position = f"point {n} of {len(runnable)}"
        log.info("\t#%d (%s): %s", p.index, position, " ".join(filter_overrides(p.overrides)))
        runs.append(run_job(hydra_context=hydra_context, task_function=functools.partial(_start, p.run, position),
                            config=p.cfg, job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)  # run_job set up the point's logging
    submitted = [p for p in runnable if p.run.cluster.kind == "slurm" and not p.run.dry_run]
    if submitted:
        log.info("%d job(s) submitted; sweep folder %s; follow with: python -m pipeline.status %s",
                 len(submitted), sweep_dir, sweep_dir)
        if any(p.run.wait for p in submitted):
            wait_for_sweep(sweep_dir)
    return runs


def compose_and_check(hydra_context: HydraContext, config: DictConfig, idx: int, overrides: list[str]) -> SweepPoint:
    """The point's config, composed (the one time it is), typed and checked."""
    cfg = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(cfg):
        cfg.hydra.job.id = idx
        cfg.hydra.job.num = idx
    run, problem = None, None
    try:
        run = prepare_run(cfg)
        problem = check_allocation(run)
    except ConfigError as e:
        problem = str(e)
    return SweepPoint(idx, overrides, cfg, run, problem)


def refuse_or_skip(points: list[SweepPoint], sweep_dir: Path) -> list[SweepPoint]:
    """The points that can run. If some cannot, nothing is launched (exit 2, listing them), unless each of them
    says allow_partial=true and some other point can run; those are then skipped and listed in the manifest."""
    bad = [p for p in points if p.problem]
    if bad and (not all(p.allow_partial for p in bad) or len(bad) == len(points)):
        exit_on_config_error(ConfigError(f"{len(bad)} of {len(points)} sweep points cannot run, nothing was launched:"
                                         "\n" + "\n".join(f"{p.label}: {p.problem}" for p in bad)))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for p in bad:
        log.warning("allow_partial=true, skipping %s: %s", p.label, p.problem)
        record_point(sweep_dir, point=p.index, point_dir=None, overrides=p.overrides, nodes=None,
                     skipped=f"{p.label}: {p.problem}")
    return [p for p in points if not p.problem]


def _start(run: RunConfig, position: str, task_cfg: DictConfig) -> Path:
    """run_job's task function: start the point from its typed config (run_job's copy of the config is unused)."""
    return start_point(run, position)
