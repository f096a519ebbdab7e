"""One sweep point, torch-free, for every program that makes one: the launcher (pipeline.launch, the sweep,
`status --resubmit-failed`) and the worker started without a launch (torchrun), whose rank 0 composes the point
from Hydra overrides. Typing and checking its config (`prepare_run`), the folder's name (`check_folder`), git
provenance (`git_info`) and freezing it into POINT_DIR/point.json (`freeze_point`); `freeze_from_overrides` takes
these steps after composing, as the launch does.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import platform
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from hydra.errors import HydraException
from omegaconf import DictConfig

from pipeline import containers
from pipeline.config import (ConfigError, RunConfig, check_resume_from, parse_run_config, pin_paths, target_of,
                             register_configs, to_plain)
from pipeline.rundir import GitInfo, Point, utc_now
from pipeline.runlock import claim, keep_until_exit
from pipeline.slurm import check_script_text, mem_bytes
from pipeline.sources import module_part
from pipeline.targets import BuildError, build_datasets, built_at_launch, check_model_sizes, dataset_facts
from pipeline.tracking.trackers import check_tracking

log = logging.getLogger(__name__)


@dataclass
class PlannedPoint:
    """A point whose config is typed and checked, with its place in the sweep and its folder."""

    index: int  # its number in the sweep (Hydra's job number): its folder's name by default, its manifest key
    overrides: list[str]
    run: RunConfig
    point_dir: Path

    @functools.cached_property
    def config(self) -> dict:
        """The run's config as plain data (to_plain): what point.json holds and what claiming the folder compares
        with an earlier run's; made once (0.2 to 0.5 ms, dataclasses.asdict), not for each."""
        return to_plain(self.run)


def host_memory_bytes() -> int | None:
    """This host's memory (MemTotal), or None where /proc/meminfo cannot say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, ValueError, StopIteration):
        return None


def rank_memory(run: RunConfig) -> tuple[int, str] | None:
    """The memory one rank may use, and where that figure comes from: on Slurm, cluster.mem over the node's ranks;
    in local debug mode, this host's over all the ranks it runs; None where unknown (Slurm without cluster.mem)."""
    c = run.cluster
    if c.kind == "slurm":
        if c.mem is None:
            return None
        return mem_bytes(c.mem) // c.tasks_per_node, f"cluster.mem={c.mem} over {c.tasks_per_node} rank(s) a node"
    total = host_memory_bytes()
    return (total // run.world_size, f"this host's {total / 2**30:.1f} GiB over {run.world_size} rank(s)") if total \
        else None


def warn_batch_memory(run: RunConfig, train: Any) -> None:
    """A token model's logits for one micro-batch (micro-batch x seq_len x vocab_size, fp32, and as much again for
    their gradient) against the memory a rank may use: warned about at launch, with the figures (a 50,257-token
    vocabulary at 1,024 positions killed both ranks of a test for memory, with nothing said)."""
    vocab, seq_len, limit = getattr(train, "vocab_size", None), getattr(train, "seq_len", None), rank_memory(run)
    if not (isinstance(vocab, int) and isinstance(seq_len, int) and limit):
        return
    logits = run.micro_batch * seq_len * vocab * 4
    if 2 * logits > limit[0]:
        log.warning("a micro-batch's logits take %.1f GiB (%d samples x %d positions x %d tokens x 4 bytes), and as "
                    "much again their gradient: more than the %.1f GiB a rank may use (%s); lower trainer.batch_size "
                    "(or raise grad_accum_steps), dataset.seq_len, or dataset.vocab_size", logits / 2**30,
                    run.micro_batch, seq_len, vocab, limit[0] / 2**30, limit[1])


def check_device(run: RunConfig) -> None:
    """trainer.device=cuda where the ranks will have none: in local debug mode this machine has no GPU device
    (/dev/nvidia0, ..., or ROCm's /dev/kfd); on Slurm the job asks for no GPU (cluster.gpus_per_node=0), so its
    cgroup gets none."""
    if run.trainer.device != "cuda":
        return
    if run.cluster.kind == "slurm" and run.cluster.gpus_per_node == 0:
        raise ConfigError("trainer.device=cuda with cluster.gpus_per_node=0: the job would ask Slurm for no GPU; set "
                          "cluster.gpus_per_node, or trainer.device=auto or cpu")
    # ROCm's torch calls AMD's GPUs cuda too: /dev/kfd is theirs
    has_gpu = bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")
    if run.cluster.kind == "local" and not has_gpu:
        raise ConfigError("trainer.device=cuda: this machine has no NVIDIA GPU (no /dev/nvidia0), nor an AMD one (no "
                          "/dev/kfd), and local debug mode runs the ranks here; use trainer.device=auto or cpu")


def prepare_run(cfg: DictConfig | dict) -> RunConfig:
    """Type and check one point's config, the built-in datasets' files included (constructing them checks their
    files, importing no torch: the job's own build step, pipeline.targets; so are Hugging Face's `datasets` (their
    splits and held-out rows checked); a user's own `_target_`s have been read from their source, not imported:
    pipeline.sources) and its trackers installed. Raises ConfigError naming the key."""
    run = parse_run_config(cfg)
    check_device(run)
    containers.preflight(run)
    pin_paths(run)
    check_resume_from(run)
    check_tracking(run.tracking)
    if not isinstance(run.dataset, dict) or built_at_launch(run.dataset) and module_part(target_of(run.dataset)):
        try:
            splits = build_datasets(run, rank=None)
        except BuildError as e:  # Hugging Face's: a file that is not there, a format it cannot read
            raise ConfigError(str(e)) from None
        check_model_sizes(run, dataset_facts(splits.train), "at launch")
        warn_batch_memory(run, splits.train)
    return run


def check_folder(key: str, path: Path, given: str | None = None) -> Path:
    """A point's or sweep's folder: no control character (it reaches sbatch scripts and logs), and not empty as given
    (`given`: the config's value, which Hydra would have made the current folder)."""
    if given is not None and not given.strip():
        raise ConfigError(f"{key}={given!r} is not allowed: an empty folder is the one the launch runs in; give a "
                          "folder, or leave the default (a new one per launch, under outputs/ or multirun/)")
    check_script_text(key, str(path))
    return path


def check_job_name(name: str) -> None:
    """hydra.job.name: Hydra names its job log after it, in the run's folder (a `/` would be a folder there)."""
    check_script_text("hydra.job.name", name)
    if "/" in name or name in ("", ".", ".."):
        raise ConfigError(f"hydra.job.name={name!r} is not allowed: Hydra names a file in the run's folder after "
                          "it; give a name without '/'")


@functools.cache
def git_info(path: Path = Path(__file__).resolve().parent) -> GitInfo:
    """The commit the pipeline's code is at, and whether its work tree has changes (None outside git); asked
    once per launch, however many points it has."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return GitInfo(sha=sha, dirty=bool(status) if status is not None else None)


def freeze_point(p: PlannedPoint, sweep_dir: Path, launch_mode: str, run_id: str | None = None) -> Point:
    """POINT_DIR/point.json: the resolved config and where it came from, which every rank reads; the run id is
    new unless this point continues an earlier launch's run (`run_id`)."""
    point = Point(run_id=run_id or uuid.uuid4().hex, sweep_id=sweep_dir.name, point=p.index, overrides=p.overrides,
                  launch_mode=launch_mode, launched_at=utc_now(), launch_host=platform.node(), launch_argv=sys.argv,
                  git=git_info(), config=p.config, sweep_dir=str(sweep_dir))
    point.write(p.point_dir)  # into the folder its claim made
    return point


def freeze_from_overrides(overrides: list[str], launch_mode: str) -> Path:
    """Compose the config from Hydra overrides (Hydra's compose API: no Hydra run, so no folder or log of its
    own), type and check it, and freeze it into the folder `hydra.run.dir` names. What rank 0 does when the
    worker is started without a launch (torchrun). Returns the point's folder; raises ConfigError."""
    register_configs()
    setup_globals()  # Hydra's resolvers, e.g. ${now:...} in hydra.run.dir
    try:
        with initialize_config_module(config_module="pipeline.conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except HydraException as e:  # an unknown key or group option, a wrong type: Hydra names it
        raise ConfigError(str(e)) from None
    HydraConfig.instance().set_config(cfg)
    run = prepare_run(cfg)
    check_job_name(str(cfg.hydra.job.name))
    point_dir = check_folder("hydra.run.dir", Path(cfg.hydra.run.dir).absolute(), str(cfg.hydra.run.dir))
    planned = PlannedPoint(index=0, overrides=overrides, run=run, point_dir=point_dir)
    folder = claim(point_dir, planned.config, run.overwrite, "hydra.run.dir")
    folder.prepare()
    keep_until_exit(folder.lock)  # this process (rank 0) runs the point: the folder is its until it exits
    freeze_point(planned, point_dir, launch_mode=launch_mode, run_id=folder.resumes)
    return point_dir
