"""A sweep's bad-node list (SWEEP_DIR/bad-nodes.json, `pipeline.rundir.BadNodes`): written by the rank 0 of a job
whose health check found a bad node under health.on_bad=exclude, read by the launcher and `status`, which leave
those nodes out of every later submission into the sweep (sbatch --exclude), and by the job, whose record says
which nodes its submission avoided. Torch-free: the job side and the launch side both use it.

Several jobs of a sweep may find bad nodes at once: each adds its entries under an exclusive lock
(SWEEP_DIR/.bad-nodes.lock, flock: released if its holder dies), reading the list anew inside it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.rundir import BAD_NODES_LOCK, BAD_NODES_NAME, BadNodeEntry, BadNodes
from pipeline.runlock import exclusive


def read_bad_nodes(sweep_dir: Path) -> BadNodes:
    """The sweep's list; empty without one. Raises OSError or ValueError for a file that cannot be used."""
    if not (Path(sweep_dir) / BAD_NODES_NAME).exists():
        return BadNodes()
    return BadNodes.read(sweep_dir)


def bad_nodes_or_empty(sweep_dir: Path) -> BadNodes:
    """The list, or an empty one where it cannot be read (a reader that must not fail on it: the job's record)."""
    try:
        return read_bad_nodes(sweep_dir)
    except (OSError, ValueError):
        return BadNodes()


def add_bad_nodes(sweep_dir: Path, entries: list[BadNodeEntry]) -> BadNodes:
    """Append entries to the sweep's list (a list that cannot be read is started anew: it is advice, and the
    entries being added are the news). Returns the list as written."""
    with exclusive(Path(sweep_dir) / BAD_NODES_LOCK):
        current = bad_nodes_or_empty(sweep_dir)
        updated = replace(current, entries=[*current.entries, *entries])
        updated.write(sweep_dir)
        return updated

