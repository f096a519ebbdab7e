"""A point's job resubmits itself without the bad nodes its health check found, with nobody watching:
python -m pipeline.launcher.heal SWEEP_DIR

Run by the job's own batch script once its ranks' step has ended (submitit's `teardown`, on the allocation's first
node, on the host: no container or rank is involved), where health.on_bad=exclude. When the sweep's bad-node list
names this job, the point is resubmitted through the same function as `status` and the launch's wait use
(launcher.points.resubmit_without_bad_nodes): under the sweep's resubmission lock, within health.max_resubmits,
with the manifest's entries; a `status` call later finds it done and does nothing twice. A cluster that refuses
`sbatch` from compute nodes gets the reason in the job's batch log, and the point waits, as before, for the next
`status` (or `status --wait`) on a login node. Exits 0 whatever happens: the script's own exit status is the
ranks' step's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.launcher.manifest import read_manifest
from pipeline.badnodes import bad_nodes_or_empty
from pipeline.slurm import job_id_from_env

PREFIX = "pipeline.launcher.heal:"


def heal(sweep_dir: Path, job_id: str | None) -> list[str]:
    """This job's point resubmitted without the nodes its health check put on the sweep's list; what was done."""
    if job_id is None or not bad_nodes_or_empty(sweep_dir).of_job(job_id):
        return []
    entries = read_manifest(sweep_dir).points
    point = next((p for p, e in entries.items() if e.jobs and e.jobs[-1].job_id == job_id), None)
    if point is None:
        return [f"job {job_id} is no point's latest job in {sweep_dir}: nothing to resubmit"]
    from pipeline.launcher.points import resubmit_without_bad_nodes
    from pipeline.launcher.status import PointStatus

    entry = entries[point]
    status = PointStatus(point=point, nodes=entry.nodes, job_id=job_id, state="bad node", detail="",
                         dir=sweep_dir / entry.dir if entry.dir else None)
    return resubmit_without_bad_nodes(sweep_dir, [status])


def main(argv: list[str]) -> int:
    sweep_dir, job_id = Path(argv[0]), job_id_from_env()
    try:
        said = heal(sweep_dir, job_id)
    except Exception as e:  # sbatch refused on a compute node, a sweep folder that cannot be read
        said = [f"job {job_id}: its point could not be resubmitted from the job ({type(e).__name__}: {e}); "
                f"`python -m pipeline.status {sweep_dir}` on a login node will"]
    for line in said:
        print(PREFIX, line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
