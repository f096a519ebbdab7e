"""One run per folder. A point's folder is locked (flock on POINT_DIR/.run.lock) by whoever runs its point, for as
long as it runs: in local debug mode the launcher, from before it writes point.json until its ranks have ended
(they die with it: pipeline/launcher/signals.py); on Slurm the launcher while it checks, freezes and submits, then
the job's rank 0 for the job's life (the launch returns at once, so the run's life is the job's). flock is
released by the kernel when its holder dies, so a killed run never leaves a folder locked.

A launch into a folder takes its lock first (refused at once if another process holds it, naming it), then looks
at what the folder holds: a finished run's record is not replaced unless `overwrite=true`; an unfinished run of
the same config is resumed (its run id kept, so its checkpoint is this run's); an unfinished run of another
config that left a checkpoint is not replaced unless `overwrite=true`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, config_hash
from pipeline.rundir import (CHECKPOINT_NAME, LAUNCHER_PID_VAR, LOG_DIR, METRICS_NAME, PREVIOUS_CHECKPOINT_NAME,
                             PREVIOUS_SHARDED_CHECKPOINT_NAME, PROFILE_DIR, PROGRESS_NAME, RECORD_NAME, RUN_LOCK_NAME,
                             SHARDED_CHECKPOINT_NAME, TRACKING_NAME, WANDB_DIR, WEIGHTS_NAME, LockHolder, Point,
                             TrackedRuns, remove_stray_temporaries, utc_now)

log = logging.getLogger(__name__)
JOB_WAIT_S = 60.0  # a Slurm job may start while its launcher still holds the lock, submitting
# what overwrite removes of an earlier run (and its logs and traces)
OUTPUTS = (RECORD_NAME, WEIGHTS_NAME, CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, PROGRESS_NAME, METRICS_NAME,
           TRACKING_NAME)
CHECKPOINTS = (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, SHARDED_CHECKPOINT_NAME, PREVIOUS_SHARDED_CHECKPOINT_NAME)


class FolderInUse(ConfigError):
    """Another process holds the folder's lock: it is running a point there."""


class RunLock:
    """The exclusive lock on a point's folder; its file says who holds it (pid, host, since when)."""

    def __init__(self, point_dir: Path, wait_s: float = 0.0):
        point_dir.mkdir(parents=True, exist_ok=True)
        self.path = point_dir / RUN_LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_s
        while not self._try_lock():
            if time.monotonic() >= deadline:
                os.close(self._fd)
                raise FolderInUse(f"{point_dir} is in use by {holder(self.path)}: one run per folder; wait for it "
                                  "to end (or stop it), or choose another folder")
            time.sleep(0.2)
        # into the locked file itself (a rename would replace what is locked), so its holder alone writes it
        os.ftruncate(self._fd, 0)
        me = LockHolder(pid=os.getpid(), host=platform.node(), since=utc_now())
        os.pwrite(self._fd, json.dumps(me.to_json()).encode(), 0)

    def _try_lock(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the file releases its flock
            self._fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(lock_file: Path) -> str:
    """Who holds a lock, as its holder wrote it ("pid 123 on host since ..."), or as much as can be said (it may
    be between taking the lock and writing its name)."""
    try:
        return str(LockHolder.read(lock_file.parent))
    except (OSError, ValueError):
        return "another process"


@dataclass
class Claim:
    """A launch's hold on a point's folder: its lock, the run id of the earlier unfinished run of the same config
    that the launch continues (None: a new run), and whether the earlier run is to be replaced (overwrite=true)."""

    lock: RunLock
    resumes: str | None
    replaces: bool

    def prepare(self) -> None:
        """Clear the folder for this launch's run: the replaced run's outputs, the temporary files of writes that
        were interrupted. Done once every point's folder is claimed, so that a refusal destroys nothing."""
        point_dir = self.lock.path.parent
        if self.replaces:
            _remove_outputs(point_dir)
        for path in remove_stray_temporaries(point_dir):
            log.info("removed %s, left by a write that was interrupted", path)


def claim(point_dir: Path, config: dict, overwrite: bool, key: str) -> Claim:
    """Lock a point's folder and decide what this launch may do with what it holds (see the module's docstring).
    Raises ConfigError (FolderInUse) naming `key`; changes nothing in the folder but its lock file."""
    try:
        lock = RunLock(point_dir)
    except FolderInUse as e:
        raise FolderInUse(f"{key}={e}") from None
    except OSError as e:
        raise ConfigError(f"{key}={point_dir} cannot be written: {e.strerror or e}") from None
    try:
        return Claim(lock, *_earlier_run(point_dir, config, overwrite, key))
    except BaseException:
        lock.release()
        raise


def _earlier_run(point_dir: Path, config: dict, overwrite: bool, key: str) -> tuple[str | None, bool]:
    """(the run id to continue or None for a new run, whether the earlier run is replaced); raises ConfigError
    when the folder holds what a new run would destroy, unless `overwrite`."""
    earlier = _read_point(point_dir)
    if overwrite:
        return None, True
    if (point_dir / RECORD_NAME).exists() or (point_dir / RECORD_NAME).is_symlink():
        raise ConfigError(f"{key}={point_dir} holds a finished run's record ({RECORD_NAME}"
                          f"{f', run {earlier.run_id}' if earlier else ''}); a new run would replace it: choose "
                          "another folder, or add overwrite=true to replace that run")
    _check_tracked_runs(point_dir, key)
    if earlier is not None and config_hash(earlier.config) == config_hash(config):
        log.info("%s: the same config as the earlier launch, which left no record: this launch continues its run %s, "
                 "%s", point_dir, earlier.run_id, "from its checkpoint" if _has_checkpoint(point_dir) else
                 "which left no checkpoint: from step 0")
        return earlier.run_id, False
    if _has_checkpoint(point_dir):
        raise ConfigError(f"{key}={point_dir} holds the checkpoint of an unfinished run of another config"
                          f"{f' (overrides: {earlier.overrides})' if earlier else ''}; a new run would discard it: "
                          "relaunch that config to resume it, choose another folder, or add overwrite=true")
    return None, False


def _check_tracked_runs(point_dir: Path, key: str) -> None:
    """The folder's tracking.json, which the run continues, can be read: a damaged one would fork its tracked run."""
    try:
        TrackedRuns.of(point_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={point_dir}: its {TRACKING_NAME} cannot be used ({e}); it names the tracker runs "
                          f"this run continues: restore it, or delete it (pipeline.track finds an MLflow run again by "
                          f"its tag; a W&B run's id is the point's run id)") from None


def _has_checkpoint(point_dir: Path) -> bool:
    return any((point_dir / name).exists() for name in CHECKPOINTS)


def _read_point(point_dir: Path) -> Point | None:
    try:
        return Point.read(point_dir)
    except (OSError, ValueError):  # none, or one that cannot be read: nothing to resume
        return None


def _remove_outputs(point_dir: Path) -> None:
    """What an earlier run left (record, weights, checkpoints, progress, rank logs, traces), so that none of it
    stands beside the new run's point.json."""
    gone = []
    for name in OUTPUTS:
        path = point_dir / name
        if path.exists() or path.is_symlink():
            path.unlink()
            gone.append(name)
    for name in (LOG_DIR, PROFILE_DIR, SHARDED_CHECKPOINT_NAME, PREVIOUS_SHARDED_CHECKPOINT_NAME, WANDB_DIR):
        if (point_dir / name).is_dir():
            shutil.rmtree(point_dir / name)
            gone.append(f"{name}/")
    if gone:
        log.info("overwrite=true: removed the earlier run's %s from %s", ", ".join(gone), point_dir)


_kept: list[RunLock] = []


def keep_until_exit(lock: RunLock) -> None:
    """Hold a lock for the rest of this process's life (the kernel releases it when the process ends)."""
    _kept.append(lock)


def lock_for_job(point_dir: Path, rank: int):
    """The job side's hold on its folder, for the job's life: rank 0 takes the lock, waiting a little for the
    launcher that may still hold it while it submits. In local debug mode the launcher holds it already."""
    if rank != 0 or LAUNCHER_PID_VAR in os.environ:
        return nullcontext()
    try:
        lock = RunLock(Path(point_dir), wait_s=JOB_WAIT_S)
    except FolderInUse as e:
        raise SystemExit(f"pipeline.worker: {e}; this job stops without touching it") from None
    remove_stray_temporaries(Path(point_dir))
    return lock


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on the file `path` (made if missing) for a read-modify-write of what it guards,
    waiting for any holder first: flock, released by the kernel if the holder dies."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
