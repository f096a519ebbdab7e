"""One sweep point on the launch side, in named steps: type and check its config (`prepare_run`), ask Slurm
whether it would take the allocation (`check_allocation`), then freeze it into its folder and run it in local
debug mode or submit it (`start_point`). `python -m pipeline.launch` takes these steps for a single point, the
sweep launcher (`pipeline.launcher.sweep`) for every point of a sweep.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import uuid
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from pipeline.config import ConfigError, RunConfig, abspath_dataset_root, parse_run_config, register_configs, to_plain
from pipeline.launcher.local import run_local
from pipeline.launcher.manifest import record_point
from pipeline.launcher.slurm import check_slurm_values, preflight, render_sbatch, submit
from pipeline.rundir import RECORD_NAME, SBATCH_NAME, GitInfo, Point, utc_now

log = logging.getLogger("pipeline.launch")


def prepare_run(cfg: DictConfig) -> RunConfig:
    """Type and check one point's config, the built-in datasets' files included (a user's `_target_`s have had
    their modules found, without being imported). Raises ConfigError naming the key."""
    run = parse_run_config(cfg)
    abspath_dataset_root(run)
    if not isinstance(run.dataset, dict):  # a built-in dataset: constructing it checks its files, importing no torch
        try:
            instantiate(run.dataset, _convert_="all", split="train")
        except InstantiationException as e:
            if isinstance(e.__cause__, ConfigError):
                raise e.__cause__ from None
            raise
    if run.cluster.kind == "slurm":
        check_slurm_values(run)
    return run


def check_allocation(run: RunConfig) -> str | None:
    """Would Slurm accept this point? The reason if not. A dry run submits nothing, so it is not asked (it also
    works where no cluster is reachable; `sbatch --test-only POINT_DIR/job.sbatch` asks later)."""
    if run.cluster.kind != "slurm" or run.dry_run:
        return None
    return preflight(run, job_name="pipeline-preflight")


def exit_on_config_error(error: ConfigError) -> NoReturn:
    """Bad input ends the launch with the message alone (no traceback) and exit code 2."""
    print(f"pipeline.launch: configuration error: {error}", file=sys.stderr)
    sys.exit(2)


def git_info(path: Path = Path(__file__).resolve().parent) -> GitInfo:
    """The commit the pipeline's code is at, and whether its work tree has changes (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return GitInfo(sha=sha, dirty=bool(status) if status is not None else None)


def freeze_point(run: RunConfig, point_dir: Path, sweep_id: str, index: int, overrides: list[str],
                 launch_mode: str) -> Point:
    """POINT_DIR/point.json: the resolved config and where it came from, which every rank reads."""
    point = Point(run_id=uuid.uuid4().hex, sweep_id=sweep_id, point=index, overrides=overrides,
                  launch_mode=launch_mode, launched_at=utc_now(), launch_host=platform.node(), launch_argv=sys.argv,
                  git=git_info(), config=to_plain(run))
    point.write(point_dir)
    return point


def start_point(run: RunConfig, position: str) -> Path:
    """Freeze the point into the folder Hydra made for it, then run it here or submit it. `position` ("point 2
    of 3") is for the progress bar. Returns the point's folder."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    point_dir = Path(hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir) if multirun else point_dir
    point = freeze_point(run, point_dir, sweep_dir.name, int(hc.job.num) if multirun else 0, list(hc.overrides.task),
                         launch_mode=run.cluster.kind)
    if run.cluster.kind == "slurm":
        submit_point(run, point, point_dir, sweep_dir)
    else:
        run_point_here(run, point, point_dir, position)
    return point_dir


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
    point_dir = Path(cfg.hydra.run.dir).absolute()
    point_dir.mkdir(parents=True, exist_ok=True)
    freeze_point(run, point_dir, point_dir.name, 0, overrides, launch_mode=launch_mode)
    return point_dir


def submit_point(run: RunConfig, point: Point, point_dir: Path, sweep_dir: Path) -> None:
    """Submit the point as its own Slurm job and add it to the sweep's manifest (a dry run writes the script)."""
    job_name = f"pipeline-{point.sweep_id}-{point.point}"
    if run.dry_run:
        script = point_dir / SBATCH_NAME
        script.write_text(render_sbatch(run, point_dir, job_name))
        log.info("point %s: dry run, nothing submitted; the sbatch script: %s", point.point, script)
        return
    job_id = submit(run, point_dir, job_name)
    record_point(sweep_dir, point=point.point, point_dir=point_dir, overrides=point.overrides, nodes=run.nodes,
                 job_id=job_id)
    log.info("point %s: submitted as Slurm job %s (%d node(s) x %d task(s)), folder %s", point.point, job_id,
             run.nodes, run.cluster.tasks_per_node, point_dir)


def run_point_here(run: RunConfig, point: Point, point_dir: Path, position: str) -> None:
    """Local debug mode: the point's ranks as processes on this machine; returns when they have ended."""
    cores = os.cpu_count() or 1
    if run.world_size > cores:
        log.warning("%d processes on %d cores: this point is oversubscribed; its record says so, and its timings "
                    "do not measure scaling", run.world_size, cores)
    log.info("point %s: %d node(s) x %d task(s) in local debug mode, folder %s",
             point.point, run.nodes, run.cluster.tasks_per_node, point_dir)
    run_local(point_dir, run, job_id=f"local-{point.run_id[:8]}", position=position)
    log.info("record: %s", point_dir / RECORD_NAME)
