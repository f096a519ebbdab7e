"""The result record: one self-describing JSON file per run, written atomically by rank 0.

Also the provenance that goes into it. Nothing here imports torch: `launch` and `collect` use it too.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = 1
RECORD_NAME = "result.json"
POINT_NAME = "point.json"
PROGRESS_NAME = "progress.json"  # rank 0's latest step, speed and ETA, rewritten every log_every steps
WEIGHTS_NAME = "model.pt"  # the trained model's state_dict, saved by rank 0
PACKAGES = ("torch", "hydra-core", "omegaconf", "submitit", "numpy")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def write_json_atomic(path: Path, obj, durable: bool = True) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file. `durable`
    also fsyncs before the rename (a crash cannot leave an empty file); progress updates skip that cost."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_info(path: Path = Path(__file__).resolve().parent) -> dict:
    """The commit the pipeline's code is at, and whether its work tree has changes (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def point_file(*, run_id: str, sweep_id: str, point: int, overrides: list[str],
               config: dict, kind: str) -> dict:
    """What `launch` freezes for the ranks of one sweep point: the resolved config and where it came from."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "sweep_id": sweep_id,
        "point": point,
        "overrides": overrides,
        "launch_mode": kind,
        "launched_at": utc_now(),
        "launch_host": platform.node(),
        "launch_argv": sys.argv,
        "git": git_info(),
        "config": config,
    }


def read_progress(point_dir: Path) -> dict | None:
    """Rank 0's latest progress.json, or None before the first report."""
    try:
        return json.loads((Path(point_dir) / PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        return None


def read_point(point_dir: Path) -> dict:
    return json.loads((Path(point_dir) / POINT_NAME).read_text())
