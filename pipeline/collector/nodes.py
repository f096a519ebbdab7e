"""Each Slurm node across every record of a collection: its health-check figures, how often the check flagged it,
how often it was a run's straggler, and how many jobs stopped for it (the sweeps' bad-node lists), so that a bad
node shows over many runs, not in one. Local debug mode's nodes are simulated (this machine): left out. Pure
Python and numpy: no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.collector.diagnosis import STRAGGLER
from pipeline.collector.records import Run
from pipeline.rundir import BAD_NODES_NAME, BadNodes

DEFINITIONS = {
    "nodes": "per Slurm node, over every record of the collection: runs it took part in; straggler, the runs whose "
             f"slowest rank (busy time >= {STRAGGLER} x the median rank's) was on it; checks, the health checks "
             "that measured it, flagged, those that flagged it; its median GEMM GFLOP/s, best link GB/s and memory "
             "GB/s over those checks; stopped, the jobs that stopped before training for it (the sweeps' "
             f"{BAD_NODES_NAME})",
}


@dataclass
class NodeHistory:
    node: str
    runs: int = 0
    straggler: int = 0
    checks: int = 0
    flagged: int = 0
    gemm_gflops: float | None = None
    link_gb_s: float | None = None
    membw_gb_s: float | None = None
    stopped: int = 0
    last_flag: str = ""  # the latest reason it was flagged or stopped for


def find_bad_node_lists(paths: list[Path]) -> tuple[list[BadNodes], list[str]]:
    """Every sweep's bad-node list under `paths`, and the ones that cannot be read (path: why)."""
    found, problems = [], []
    for path in sorted({p for root in paths if root.is_dir() for p in root.rglob(BAD_NODES_NAME)}):
        try:
            found.append(BadNodes.read(path.parent))
        except (OSError, ValueError) as e:
            problems.append(f"{path}: {e}")
    return found, problems


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def node_histories(runs: list[Run], lists: list[BadNodes]) -> list[NodeHistory]:
    """Every real Slurm node of the runs and the lists, by name."""
    nodes: dict[str, NodeHistory] = {}
    figures: dict[str, tuple[list, list, list]] = {}
    for r in sorted((r for r in runs if not r.simulated), key=lambda r: r.path):
        for name in {h for _, h in r.hosts}:
            nodes.setdefault(name, NodeHistory(name)).runs += 1
        if r.skew >= STRAGGLER:
            nodes[r.slowest_host].straggler += 1
        for fig in r.health:
            h = nodes.setdefault(fig.node, NodeHistory(fig.node))
            h.checks += 1
            gemm, link, mem = figures.setdefault(fig.node, ([], [], []))
            for values, value in ((gemm, fig.gemm_gflops), (link, fig.link_gb_s), (mem, fig.membw_gb_s)):
                if value is not None:
                    values.append(value)
            if fig.flags:
                h.flagged += 1
                h.last_flag = fig.flags
    for bad in lists:
        for entry in bad.entries:
            if not entry.simulated:
                h = nodes.setdefault(entry.node, NodeHistory(entry.node))
                h.stopped += 1
                h.last_flag = entry.reason
    for name, (gemm, link, mem) in figures.items():
        nodes[name].gemm_gflops, nodes[name].link_gb_s, nodes[name].membw_gb_s = map(_median, (gemm, link, mem))
    return sorted(nodes.values(), key=lambda h: (-(h.flagged + h.stopped + h.straggler), h.node))
