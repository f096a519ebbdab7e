"""Hydra's basic launcher (sweep points one after another in this process), but every point of the sweep is
composed and checked before the first one runs: a bad point stops the whole sweep before anything starts."""

from dataclasses import dataclass
from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, filter_overrides


@dataclass
class PipelineLauncherConf:
    _target_: str = "hydra_plugins.pipeline_launcher.pipeline_launcher.PipelineLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="pipeline", node=PipelineLauncherConf)


class PipelineLauncher(BasicLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from pipeline.config import ConfigError
        from pipeline.launch import exit_on_config_error, prepare_run

        errors = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            try:
                prepare_run(cfg)
            except ConfigError as e:
                errors.append(f"point #{idx} ({' '.join(filter_overrides(overrides))}): {e}")
        if errors:
            exit_on_config_error(ConfigError(f"{len(errors)} of {len(job_overrides)} sweep points are invalid, "
                                             "nothing was run:\n" + "\n".join(errors)))
        return super().launch(job_overrides, initial_job_idx)
