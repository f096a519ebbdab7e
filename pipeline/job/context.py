"""One rank's place in one run, made once when the rank starts (pipeline.job.run) and handed to every part of the
job: the frozen point and its typed config, where this rank sits in the job, the device it trains on, the folder it
writes into. The parts read what they need of it; none of them threads the config, the environment and the device
through its calls one by one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import RunConfig
from pipeline.job.env import DistEnv
from pipeline.rundir import Point


@dataclass(frozen=True)
class Job:
    point: Point  # the point as launch froze it (its config as plain data, its provenance)
    run: RunConfig  # that config, typed
    env: DistEnv
    device: torch.device
    point_dir: Path

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_rank0(self) -> bool:
        return self.env.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def local_mode(self) -> bool:
        """Local debug mode: the simulated nodes are all this machine, started by the launcher."""
        return self.point.launch_mode == "local"

    @property
    def on_slurm(self) -> bool:
        return self.point.launch_mode == "slurm"
