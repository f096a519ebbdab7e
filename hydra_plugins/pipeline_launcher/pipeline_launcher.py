"""Hydra's basic launcher (sweep points one after another, in this process), except that every point is composed
and checked before the first one is run or submitted: its config, its dataset files and, on Slurm, whether Slurm
would accept its allocation (`sbatch --test-only`). When a point cannot run, nothing is launched, unless
`allow_partial=true`, which launches the others. With cluster=slurm and `wait=true` it then waits for the jobs."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import open_dict

log = logging.getLogger(__name__)


@dataclass
class PipelineLauncherConf:
    _target_: str = "hydra_plugins.pipeline_launcher.pipeline_launcher.PipelineLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="pipeline", node=PipelineLauncherConf)


class PipelineLauncher(BasicLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # imported here: Hydra imports every plugin module at start-up, in any Hydra app
        from pipeline.config import ConfigError
        from pipeline.launch import SWEEP_POSITION_ENV, check_allocation, exit_on_config_error, prepare_run
        from pipeline.manifest import record_point
        from pipeline.status import wait_for_sweep

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        points = list(enumerate(job_overrides, start=initial_job_idx))
        problems = {}
        for idx, overrides in points:
            try:
                problem = check_allocation(prepare_run(self._point_config(idx, overrides)))
            except ConfigError as e:
                problem = str(e)
            if problem:
                problems[idx] = f"point #{idx} ({' '.join(filter_overrides(overrides))}): {problem}"
        if problems and (not self.config.allow_partial or len(problems) == len(points)):
            exit_on_config_error(ConfigError(f"{len(problems)} of {len(points)} sweep points cannot run, "
                                             "nothing was launched:\n" + "\n".join(problems.values())))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        for idx, reason in problems.items():
            log.warning("allow_partial=true, skipping %s", reason)
            record_point(sweep_dir, point=idx, point_dir=None, overrides=list(job_overrides[idx - initial_job_idx]),
                         nodes=None, skipped=reason)
        runs: List[JobReturn] = []
        for idx, overrides in points:
            if idx in problems:
                continue
            position = f"point {len(runs) + 1} of {len(points) - len(problems)}"
            os.environ[SWEEP_POSITION_ENV] = position
            log.info("\t#%d (%s): %s", idx, position, " ".join(filter_overrides(overrides)))
            runs.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                config=self._point_config(idx, overrides), job_dir_key="hydra.sweep.dir",
                                job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if self.config.cluster.kind == "slurm" and not self.config.dry_run:
            log.info("%d job(s) submitted; sweep folder %s; follow with: python -m pipeline.status %s",
                     len(runs), sweep_dir, sweep_dir)
            if self.config.wait:
                wait_for_sweep(sweep_dir)
        return runs

    def _point_config(self, idx: int, overrides: Sequence[str]):
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        return cfg
