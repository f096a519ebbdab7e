"""What the health check leaves behind besides its answer: a hung rank's failure record, the log of every node's
figures, under health.on_bad=exclude the bad nodes on the sweep's list (written before any rank learns the verdict,
since a rank that leaves early takes the others down), and for the record the nodes the job's submission avoided and
the run's earlier stops."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipeline.badnodes import add_bad_nodes, bad_nodes_or_empty
from pipeline.job.context import Job
from pipeline.job.health.verdict import Verdict
from pipeline.result import Health, NodeHealth
from pipeline.rundir import BadNodeEntry, Failure, utc_now
from pipeline.slurm import excluded_nodes

log = logging.getLogger(__name__)


class Reporter:
    """What the check leaves behind besides its answer: `hang` records this rank's failure when the watchdog
    ends it; `decided` (rank 0) acts on the verdict before any rank learns it, since a rank that leaves early
    takes the others down (srun --kill-on-bad-exit)."""

    def hang(self, message: str) -> None:
        pass

    def decided(self, health: Health, verdict: Verdict) -> Health:
        return health


class JobReporter(Reporter):
    """The job's side of a verdict: a hung rank's failure record; on rank 0 the log, the nodes its submission
    avoided and this run's earlier stops (for the record), and under health.on_bad=exclude the bad nodes on the
    sweep's list, written before any rank learns the verdict."""

    def __init__(self, job: Job):
        self.job = job
        self.sweep_dir = Path(job.point.sweep_dir) if job.point.sweep_dir else job.point_dir

    def hang(self, message: str) -> None:
        env = self.job.env
        print(f"pipeline: rank {env.rank} ({env.node_name}): {message}", file=sys.stderr, flush=True)
        Failure(rank=env.rank, node_rank=env.node_rank, at_unix=time.time(), error=message).write(self.job.point_dir)

    def decided(self, health: Health, verdict: Verdict) -> Health:
        point, job_id, simulated = self.job.point, self.job.env.job_id, self.job.local_mode
        if verdict.stop and self.job.run.health.on_bad == "exclude":
            add_bad_nodes(self.sweep_dir, [BadNodeEntry(node=b.node, reason=b.reason, job_id=job_id,
                                                        run_id=point.run_id, point=point.point, at=utc_now(),
                                                        simulated=simulated) for b in verdict.bad])
        for n in health.nodes:
            log.info("health: %s", describe_node(n))
        (log.error if verdict.stop else log.warning if verdict.message else log.info)(
            "health check of %d nodes (%.1f s, %s): %s", len(health.nodes), health.seconds, health.mode,
            verdict.message or "every node within " f"{health.threshold} x the median")
        earlier = [e for e in bad_nodes_or_empty(self.sweep_dir).entries
                   if e.run_id == point.run_id and e.job_id != job_id]
        return replace(health, left_out=[] if simulated else excluded_nodes(job_id), earlier=earlier)


def describe_node(n: NodeHealth) -> str:
    """One node's figures in a line, for the log."""
    def f(value, fmt):
        return "-" if value is None else format(value, fmt)
    cpu = f", CPU share {f(n.cpu_share, '.2f')}, throttled {f(n.throttled_periods, 'd')}" if n.cpu_share is not None \
        else ""
    return (f"{n.node} (ranks {','.join(map(str, n.ranks))}, ready after {n.ready_s:.1f} s): GEMM "
            f"{f(n.gemm_gflops, '.3g')} GFLOP/s{cpu}, memory {f(n.membw_gb_s, '.3g')} GB/s, best link "
            f"{f(n.link_gb_s, '.3g')} GB/s, latency {f(n.latency_us, '.0f')} us" + (f"; {n.error}" if n.error else ""))
