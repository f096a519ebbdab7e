"""The health check: before training, a multi-node job measures each of its nodes and the links between them, so
that one slow or broken node or link is named (and, under health.on_bad=exclude, left out) instead of silently
slowing every step.

    roll call   free: every rank's node, machine (the kernel's boot id), threads and start-up time, gathered when
                the threads are placed (pipeline.job.placement); nodes that share a boot id share a machine
    compute     a fixed GEMM (float32 512x512 on a CPU, bfloat16 8192x8192 on a GPU, the same seeded inputs on every
                node, so every node must get the same checksum) for GEMM_S on the device each rank trains on, with
                the threads it trains with: FLOP/s, and on a CPU its CPU share and its cgroup's throttled periods.
                On distinct machines every node at once; nodes that share a machine (local debug mode, --netns)
                take turns, since at once they would measure their shares of one CPU, in two passes (the second
                in reverse order, the better kept: load from elsewhere only ever slows a node down); nodes on
                machines of their own make one pass, and those below the threshold measure once more
    memory      a copy of a buffer 4x the last-level cache (at most MEMBW_MAX_MIB; 1 GiB on a GPU) in the same turn;
                not measured where that buffer would fit in the cache (it would measure the cache)
    links       one rank per node, point-to-point in rounds of a round-robin tournament: each round pairs every
                node with another, all pairs at once; per pair the best of 20 ping-pongs (latency) and the best of
                LINK_REPS transfers of LINK_BYTES each way (bandwidth, the lower direction's). A node's link score
                is its best pair (a node whose every pair is slow is the slow one); suspect pairs are measured
                again one at a time before a single link is named

Verdicts compare with the median of the nodes' figures (a node or link below health.threshold x the median is
flagged), which needs 3 nodes; at 2 nodes a node's compute is compared with the other's, and the one link can only be
flagged against health.min_link_gb_s, never laid at either end. A node whose check raises, returns a non-finite or
wrong result, or does not answer within health.answer_s is named as failed. Cost: the compute step is O(1) in the
node count on distinct machines (2 x GEMM_S at most) and O(nodes) where they share one (2 x nodes x GEMM_S); the
links take min(nodes - 1, MAX_ROUNDS) rounds of about 2 x PAIR_BUDGET_S at most each (O(1) beyond 9 nodes), plus a
round per suspect pair.

Everything travels through the rendezvous store against deadlines, so a rank that fails is named instead of hanging
the job; rank 0 writes the verdict, then every rank acts on it. One module per idea:

    schedule.py   who is where (the roll call) and who measures when: turns, rounds, the longest it can take
    measure.py    the figures: the GEMM, the copy, a pair's ping-pong and transfers
    protocol.py   the store with deadlines, and the watchdog that ends a rank stuck in it
    verdict.py    the statistics that flag a node or a link, and what the policy makes of the flags
    report.py     what the job leaves behind: the log, the sweep's bad-node list, the record's facts
    check.py      the steps every rank takes, in order (check_health)
"""

from pipeline.job.health.check import EXIT_BAD_NODE, BadNodesFound, check_health
from pipeline.job.health.report import JobReporter
from pipeline.job.health.schedule import RankFacts

__all__ = ["EXIT_BAD_NODE", "BadNodesFound", "JobReporter", "RankFacts", "check_health"]
