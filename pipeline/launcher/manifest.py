"""The sweep manifest (`pipeline.rundir.Manifest`): which point went where, as which Slurm job (or array task),
when. Written as points are submitted, under a lock, so a launch that dies half-way still leaves an exact account
of what it submitted, and launches or resubmissions into one sweep at the same time lose nothing."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

from pipeline.rundir import MANIFEST_NAME, Manifest, ManifestPoint, Submission, utc_now
from pipeline.runlock import exclusive

LOCK_NAME = ".manifest.lock"


def read_manifest(sweep_dir: Path) -> Manifest:
    """Raises FileNotFoundError without one, OSError or ValueError (SchemaError) for one that cannot be read."""
    if not (Path(sweep_dir) / MANIFEST_NAME).exists():
        raise FileNotFoundError(f"{Path(sweep_dir) / MANIFEST_NAME}: no manifest; is {sweep_dir} a sweep folder made "
                                "by pipeline.launch with cluster=slurm?")
    return Manifest.read(sweep_dir)


@contextlib.contextmanager
def _locked(sweep_dir: Path):
    """An exclusive lock on the sweep's manifest for a read-modify-write (flock: released if the holder dies)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(sweep_dir / LOCK_NAME):
        yield


def _update(sweep_dir: Path, entries: dict[int, ManifestPoint]) -> None:
    with _locked(Path(sweep_dir)):
        path = Path(sweep_dir) / MANIFEST_NAME
        manifest = Manifest.read(sweep_dir) if path.is_file() else Manifest()
        merged = dict(manifest.points)
        for point, entry in entries.items():
            old = merged.get(point)
            merged[point] = replace(old, jobs=[*old.jobs, *entry.jobs], skipped=entry.skipped) if old else entry
        replace(manifest, points=merged).write(sweep_dir)


def add_submissions(sweep_dir: Path, submitted: list[tuple[int, Path, list[str], int, str]],
                    left_out: list[str] = ()) -> None:
    """(point, folder, overrides, nodes, Slurm job id) for every point of one submission, in one write, with the
    nodes that submission left out."""
    now = utc_now()
    _update(Path(sweep_dir), {point: ManifestPoint(dir=os.path.relpath(folder, sweep_dir), overrides=overrides,
                                                   nodes=nodes, jobs=[Submission.of(job, now, list(left_out))])
                              for point, folder, overrides, nodes, job in submitted})


def add_skipped(sweep_dir: Path, point: int, overrides: list[str], reason: str) -> None:
    """A point that was not submitted (allow_partial=true), and why."""
    _update(Path(sweep_dir), {point: ManifestPoint(dir=None, overrides=overrides, nodes=None, jobs=[],
                                                   skipped=reason)})
