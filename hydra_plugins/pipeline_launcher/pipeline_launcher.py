"""The sweeper and launcher that `-m` sweeps run through (conf/config.yaml: `override hydra/sweeper: pipeline`,
`override hydra/launcher: pipeline`). The sweeper is Hydra's basic sweeper, but without composing every point to
validate it (the launcher composes and checks each point anyway, before starting any); the launcher hands them to
`pipeline.launcher.sweep`, numbered from the batch's `initial_job_idx`. For any other sweeper (Hydra's Optuna,
Nevergrad or Ax sweeper, which choose the next points from these) it returns one JobReturn per point, in order:
the point's objective (the config's `objective`, read from its record), or a failed JobReturn saying why there is
none, which those sweepers record as a failed trial. This module only registers
them with Hydra, which imports every plugin module at the start of any Hydra app, so it imports nothing of the
pipeline until a sweep is launched."""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class PipelineLauncherConf:
    _target_: str = "hydra_plugins.pipeline_launcher.pipeline_launcher.PipelineLauncher"


@dataclass
class PipelineSweeperConf:
    _target_: str = "hydra_plugins.pipeline_launcher.pipeline_launcher.PipelineSweeper"
    max_batch_size: Optional[int] = None  # BasicSweeper's own options
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/launcher", name="pipeline", node=PipelineLauncherConf)
ConfigStore.instance().store(group="hydra/sweeper", name="pipeline", node=PipelineSweeperConf)


class PipelineSweeper(BasicSweeper):
    """Hydra's basic sweeper (the cartesian product of `a=1,2 b=x,y`, `hydra.sweeper.params` included), less its
    check that composes every point before launching: the launcher composes and checks each point itself, once,
    before it starts any."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        pass


class PipelineLauncher(Launcher):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # the task function (pipeline.launch.main) is the single-point path; a sweep starts its points itself
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from pipeline.launcher.sweep import launch_sweep

        basic = self.config.hydra.sweeper._target_ == PipelineSweeperConf._target_  # it reads no outcome
        outcomes = launch_sweep(self.hydra_context, self.config, job_overrides, initial_job_idx, outcomes=not basic)
        return [job_return(o) for o in outcomes]


def job_return(outcome) -> JobReturn:
    """A failed point's return value is the launch's RunFailed: where the sweeper gives up on failures
    (hydra.sweeper.max_failure_rate), the launch ends with its message, exit 1."""
    from pipeline.launcher.local import RunFailed

    ret = JobReturn(overrides=outcome.overrides, working_dir=str(outcome.point_dir), task_name="pipeline")
    if outcome.values is None:
        ret.status, ret._return_value = JobStatus.FAILED, RunFailed(outcome.failure)
    else:
        ret.status = JobStatus.COMPLETED
        ret._return_value = outcome.values[0] if len(outcome.values) == 1 else outcome.values
    return ret
