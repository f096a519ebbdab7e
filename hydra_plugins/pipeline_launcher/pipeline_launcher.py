"""The launcher that `-m` sweeps run through (conf/config.yaml: `override hydra/launcher: pipeline`): it composes
and checks every point before starting any, then starts each from its first-pass config. The logic is in
`pipeline.launcher.sweep`; this module only registers it with Hydra, which imports every plugin module at the
start of any Hydra app, so it imports nothing of the pipeline until a sweep is launched."""

from dataclasses import dataclass
from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class PipelineLauncherConf:
    _target_: str = "hydra_plugins.pipeline_launcher.pipeline_launcher.PipelineLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="pipeline", node=PipelineLauncherConf)


class PipelineLauncher(Launcher):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # the task function (pipeline.launch.main) is the single-point path; a sweep starts its points itself
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from pipeline.launcher.sweep import launch_sweep

        return launch_sweep(self.hydra_context, self.config, job_overrides, initial_job_idx)
