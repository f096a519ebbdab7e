"""The sweep manifest (`pipeline.rundir.Manifest`): which point went where, as which Slurm job, when. Written as
each point is submitted, so a launch that dies half-way still leaves an exact account of what it submitted."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from pipeline.rundir import MANIFEST_NAME, Manifest, ManifestPoint, Submission, utc_now


def read_manifest(sweep_dir: Path) -> Manifest:
    if not (Path(sweep_dir) / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{Path(sweep_dir) / MANIFEST_NAME}: no manifest; is {sweep_dir} a sweep folder made "
                                "by pipeline.launch?")
    return Manifest.read(sweep_dir)


def record_point(sweep_dir: Path, *, point: int, point_dir: Path | None, overrides: list[str], nodes: int | None,
                 job_id: str | None = None, skipped: str | None = None) -> None:
    """Add a submission (job_id) or a point that was not submitted (skipped: the reason) to the manifest."""
    sweep_dir = Path(sweep_dir)
    manifest = Manifest.read(sweep_dir) if (sweep_dir / MANIFEST_NAME).is_file() else Manifest()
    entry = manifest.points.get(point) or ManifestPoint(
        dir=os.path.relpath(point_dir, sweep_dir) if point_dir else None, overrides=overrides, nodes=nodes, jobs=[])
    jobs = [*entry.jobs, Submission(job_id=job_id, submitted_at=utc_now())] if job_id is not None else entry.jobs
    replace(manifest, points={**manifest.points, point: replace(entry, jobs=jobs, skipped=skipped)}).write(sweep_dir)
