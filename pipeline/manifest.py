"""The sweep manifest: which point went where, as which Slurm job, when. Written as each point is submitted,
so a launch that dies half-way still leaves an exact account of what it submitted."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.record import utc_now, write_json_atomic

MANIFEST_NAME = "manifest.json"


def read_manifest(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {sweep_dir} a sweep folder made by pipeline.launch?")
    return json.loads(path.read_text())


def record_point(sweep_dir: Path, *, point: int, point_dir: Path | None, overrides: list[str], nodes: int | None,
                 job_id: str | None = None, skipped: str | None = None) -> None:
    """Add a submission (job_id) or a point that was not submitted (skipped: the reason) to the manifest."""
    path = Path(sweep_dir) / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.is_file() else {"schema_version": 1, "points": {}}
    entry = manifest["points"].setdefault(str(point), {
        "dir": os.path.relpath(point_dir, sweep_dir) if point_dir else None,
        "overrides": overrides, "nodes": nodes, "jobs": [], "skipped": None})
    if job_id is not None:
        entry["jobs"].append({"job_id": job_id, "submitted_at": utc_now()})
    entry["skipped"] = skipped
    write_json_atomic(path, manifest)
