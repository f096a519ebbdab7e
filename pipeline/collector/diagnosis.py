"""Why a scaling group loses efficiency at each node count: the main reason, with its evidence.

The step at N nodes is compared with what the baseline's step predicts for it (the same step in weak scaling; the
data and compute phases times P_base / P in strong scaling, whose per-rank batch shrinks). The excess of each phase
over that, as a share of the step at N, is what that phase costs the efficiency (they add up to the loss). The
largest names the reason, and its evidence:

    comm     exposed communication: the comm phase's share, and the fabric (NCCL on TCP sockets, a probe far below
             the collection's, links or nodes the health check flagged)
    data     data-bound steps: the data phase's share
    compute  a straggler node (the slowest rank's busy time over the median rank's, and whether the health check
             flagged its node), threads that oversubscribe the cores (threads x ranks on a machine > its cores,
             which `oversubscribed`, counting processes, does not catch), or compute that grew without either

An efficiency above PLAUSIBLE is never shown bare: the likely cause is named (a baseline whose steps spread, or
whose threads oversubscribed its cores), as is a noisy baseline wherever it makes the efficiencies uncertain.
Oversubscribed groups (more processes than cores) have that reason alone. Pure Python: no torch.
"""

from __future__ import annotations

from pipeline.collector.records import Diverged, Run

PLAUSIBLE = 1.1  # an efficiency above this is flagged, with its likely cause
NEGLIGIBLE = 0.05  # a loss of efficiency below this needs no reason
STRAGGLER = 1.2  # the slowest rank's busy time over the median rank's, at least
NOISY = 1.5  # a baseline whose step time p95 is this many times its median (or repeats spread this much) is noisy

DEFINITIONS = {
    "main reason": "per node count, the phase whose excess over the baseline's step (the same step in weak scaling; "
                   "data and compute x P_base / P in strong) costs the most efficiency, as a share of the step at N: "
                   "comm -> exposed communication (with the fabric's figures and the health check's flags), data -> "
                   "data-bound steps, compute -> a straggler node (slowest rank's busy time >= "
                   f"{STRAGGLER} x the median rank's, and whether the health check flagged it), threads that "
                   "oversubscribe the cores (threads x ranks on a machine > its cores), or compute that grew; below a "
                   f"{NEGLIGIBLE:.0%} loss, none. An efficiency above {PLAUSIBLE:.0%} is flagged with its likely "
                   f"cause; a baseline whose step p95 is >= {NOISY} x its median, or whose repeats' throughputs "
                   f"differ by >= {NOISY}x, is noisy",
}


def spread(runs: list[Run]) -> tuple[float, float]:
    """(the largest step p95 / median of the runs, the largest over the smallest throughput of the repeats)."""
    throughputs = [r.throughput for r in runs]
    return max(r.step_spread for r in runs), max(throughputs) / min(throughputs)


def noisy_baseline(base: list[Run]) -> str:
    """Why the baseline's throughput is not to be trusted, or ""."""
    steps, repeats = spread(base)
    said = []
    if steps >= NOISY:
        worst = max(base, key=lambda r: r.step_spread)
        said.append(f"its steps spread: p95 {worst.step_spread:.1f} x the median in {worst.path}")
    if repeats >= NOISY:
        said.append(f"its {len(base)} repeats' throughputs differ by {repeats:.1f}x")
    return f"the baseline ({base[0].nodes} node(s)) is noisy: " + " and ".join(said) if said else ""


def thread_overload(runs: list[Run]) -> str:
    worst = max(runs, key=lambda r: r.thread_load)
    if worst.thread_load <= 1.0:
        return ""
    return f"threads oversubscribe the cores: {worst.thread_host} ({worst.thread_load:.1f} threads per core)"


def few_threads(runs: list[Run]) -> str:
    worst = min(runs, key=lambda r: r.thread_load)
    if worst.thread_load == 0 or worst.thread_load >= 0.5:
        return ""
    return (f"too few threads per rank: {worst.thread_host} leaves most cores idle (set OMP_NUM_THREADS or "
            "cluster.cpus_per_task)")


def straggler(runs: list[Run]) -> str:
    """The worst run's slowest node at this node count, and whether its health check flagged that node."""
    worst = max(runs, key=lambda r: r.skew)
    if worst.skew < STRAGGLER:
        return ""
    said = (f"a straggler node: {worst.slowest_host} (rank {worst.slowest_rank}) took {worst.skew:.2f} x the median "
            "rank's busy time")
    flagged = [n.flags for n in worst.health if n.node == worst.slowest_host and n.flags]
    if flagged:
        return said + f"; the health check flagged it: {flagged[0]}"
    return said + ("; the health check did not flag it" if worst.health else "; no health check ran")


def fabric(row, runs: list[Run]) -> str:
    """The fabric figures behind exposed communication."""
    said = [f"busbw {row.busbw_gb_s:.3g} GB/s ({row.transport})"] if row.busbw_gb_s is not None else []
    if row.fabric_flag:
        said.append(row.fabric_flag)
    flagged = sorted({f"{n.node}: {n.flags}" for r in runs for n in r.health if n.flags and "link" in n.flags})
    if flagged:
        said.append("the health check flagged " + "; ".join(flagged))
    return "; ".join(said)


def excess(row, base) -> dict[str, float]:
    """Each phase's seconds above what the baseline's step predicts at this node count."""
    scale = base.world_size / row.world_size if row.scaling == "strong" else 1.0
    data, compute, comm = row.breakdown_s
    b_data, b_compute, b_comm = base.breakdown_s
    return {"data": data - b_data * scale, "compute": compute - b_compute * scale,
            "comm": comm - (b_comm if base.world_size > 1 else 0.0)}


def diagnose(rows: list, members: list[Run], diverged: list[Diverged]) -> None:
    """Set each row's reason and evidence (rows: one group's, baseline first)."""
    by_nodes = {n: [r for r in members if r.nodes == n] for n in {r.nodes for r in members}}
    lost = {}
    for d in diverged:
        lost[d.nodes] = lost.get(d.nodes, 0) + 1
    if rows and rows[0].oversubscribed:
        for row in rows:
            row.reason = "oversubscription"
            row.evidence = f"more processes than cores: {thread_overload(by_nodes[row.nodes]) or 'see the records'}"
        return
    base, noise = rows[0], noisy_baseline(by_nodes[rows[0].nodes])
    for row in rows:
        runs = by_nodes[row.nodes]
        notes = [n for n in (few_threads(runs), f"against a noisy baseline (see {base.nodes} node(s))"
                             if noise and row is not base else "",
                             f"{lost[row.nodes]} more run(s) here diverged (listed apart)" if row.nodes in lost else "")
                 if n]
        if row is base:
            row.reason, row.evidence = "baseline", "; ".join(filter(None, [noise, few_threads(runs)]))
            continue
        row.reason, evidence = main_reason(row, base, runs, by_nodes[base.nodes])
        if row.efficiency is not None and row.efficiency > PLAUSIBLE:
            row.implausible = implausible(row, noise, by_nodes[base.nodes])
        row.evidence = "; ".join(filter(None, [evidence, *notes]))


def main_reason(row, base, runs: list[Run], base_runs: list[Run]) -> tuple[str, str]:
    extra = excess(row, base)
    step = row.step_time_s
    phase, seconds = max(extra.items(), key=lambda kv: kv[1])
    if row.efficiency is not None and 1 - row.efficiency < NEGLIGIBLE or seconds <= 0:
        return "none", f"within {NEGLIGIBLE:.0%} of the baseline"
    share = f"{phase} {seconds * 1e3:.3g} ms more per step than the baseline's: {seconds / step:.0%} of the step"
    if phase == "comm":
        return "exposed communication", "; ".join(filter(None, [share, fabric(row, runs)]))
    if phase == "data":
        return "data-bound steps", f"{share} (data {row.share_data:.0%} of it)"
    late = straggler(runs)
    if late:
        return "straggler node", f"{share}; {late}"
    crowded = thread_overload(runs)
    if crowded and not thread_overload(base_runs):
        return "threads oversubscribe the cores", f"{share}; {crowded}"
    return "compute grew", f"{share}, without a straggler or oversubscribed threads (the nodes slower? load?)"


def implausible(row, noise: str, base_runs: list[Run]) -> str:
    """The likely cause of an efficiency above PLAUSIBLE."""
    crowded = thread_overload(base_runs)
    if noise:
        cause = noise + ", so its throughput is too low"
    elif crowded:
        cause = f"the baseline's {crowded}"
    elif row.scaling == "strong":
        cause = "strong scaling's smaller per-rank batch may fit a cache the baseline's did not"
    else:
        cause = "no cause in the records: repeat the baseline"
    return f"efficiency {row.efficiency:.1%} is above {PLAUSIBLE:.0%}, which is not physically plausible: {cause}"
