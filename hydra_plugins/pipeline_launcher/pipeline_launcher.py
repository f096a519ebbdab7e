"""The sweeper and launcher that `-m` sweeps run through (conf/config.yaml: `override hydra/sweeper: pipeline`,
`override hydra/launcher: pipeline`). The sweeper expands the sweep's overrides into points, as Hydra's basic
sweeper does, but without composing every point to validate it (the launcher composes and checks each point
anyway, before starting any); the launcher hands them to `pipeline.launcher.sweep`. This module only registers
them with Hydra, which imports every plugin module at the start of any Hydra app, so it imports nothing of the
pipeline until a sweep is launched."""

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


@dataclass
class PipelineLauncherConf:
    _target_: str = "hydra_plugins.pipeline_launcher.pipeline_launcher.PipelineLauncher"


@dataclass
class PipelineSweeperConf:
    _target_: str = "hydra_plugins.pipeline_launcher.pipeline_launcher.PipelineSweeper"


ConfigStore.instance().store(group="hydra/launcher", name="pipeline", node=PipelineLauncherConf)
ConfigStore.instance().store(group="hydra/sweeper", name="pipeline", node=PipelineSweeperConf)


class PipelineSweeper(Sweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        """Every combination of the sweep's values, one point each (the cartesian product of `a=1,2 b=x,y`)."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        choices = []
        for override in parser.parse_overrides(arguments):
            key = override.get_key_element()
            if not override.is_sweep_override():
                choices.append([f"{key}={override.get_value_element_as_str()}"])
            elif override.is_discrete_sweep():
                choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
            else:
                raise HydraException(f"{override.input_line}: interval sweeps need an optimizing sweeper; give values")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        return self.launcher.launch([list(point) for point in itertools.product(*choices)], initial_job_idx=0)


class PipelineLauncher(Launcher):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # the task function (pipeline.launch.main) is the single-point path; a sweep starts its points itself
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from pipeline.launcher.sweep import launch_sweep

        launch_sweep(self.hydra_context, self.config, job_overrides)
        return []
