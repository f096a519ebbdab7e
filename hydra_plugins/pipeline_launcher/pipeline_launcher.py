"""The sweeper and launcher that `-m` sweeps run through (conf/config.yaml: `override hydra/sweeper: pipeline`,
`override hydra/launcher: pipeline`). The sweeper is Hydra's basic sweeper, but without composing every point to
validate it (the launcher composes and checks each point anyway, before starting any); the launcher hands them to
`pipeline.launcher.sweep`. This module only registers
them with Hydra, which imports every plugin module at the start of any Hydra app, so it imports nothing of the
pipeline until a sweep is launched."""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
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

        launch_sweep(self.hydra_context, self.config, job_overrides)
        return []
