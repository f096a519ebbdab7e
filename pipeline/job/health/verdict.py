"""What the health check's figures say: a node or a link below health.threshold x the median of the nodes' figures is
flagged (which needs 3 nodes; at 2, a node's compute is compared with the other's, and the one link can only be
flagged against health.min_link_gb_s, never laid at either end), and so is a node whose check raised, returned a
non-finite or wrong result, or did not answer; then what the policy (health.on_bad) makes of the flags."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from pipeline.config import HealthConfig
from pipeline.job.health.schedule import Plan
from pipeline.result import BadNode, Health, LinkHealth, NodeHealth

# a node's best latency above 10 x the median and 200 us more: the best of 20 round trips between processes that
# share 2 loaded cores reached 0.9 ms against a median of 0.1 ms here (no fault: a latency fault cannot be made on
# this kernel, which has no netem), while a fault worth leaving a node out for is milliseconds against microseconds
LATENCY_FACTOR, LATENCY_SLACK_US = 10.0, 200.0


@dataclass
class Observations:
    """What rank 0 gathered: each node's compute and memory figures, each link's, the nodes whose check failed (and
    why), what the check could not tell, and what each of its steps took."""

    figures: dict[str, dict]
    links: list[LinkHealth]
    errors: dict[str, str]  # node -> its failed check
    notes: list[str]
    phases: dict[str, float]


@dataclass
class Verdict:
    """What rank 0 decided, as every rank reads it."""

    stop: bool
    message: str
    bad: list[BadNode] = field(default_factory=list)


def below(values: dict[str, float | None], threshold: float) -> dict[str, tuple[float, float]]:
    """{key: (ratio, reference)} for each value below threshold x the reference: the median of the values (3 or
    more), or with 2 the larger one (one node's compute against the other's). A missing value is not judged here
    (its error is)."""
    known = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if len(known) < 2:
        return {}
    reference = statistics.median(known.values()) if len(known) >= 3 else max(known.values())
    if reference <= 0:
        return {}
    return {k: (v / reference, reference) for k, v in known.items() if v < threshold * reference}


def node_link_scores(links: list[LinkHealth], nodes: list[str]) -> dict[str, float | None]:
    """A node's link score: its best pair's bandwidth."""
    best: dict[str, float | None] = {n: None for n in nodes}
    for link in links:
        for n in link.nodes:
            if link.gb_s is not None and (best[n] is None or link.gb_s > best[n]):
                best[n] = link.gb_s
    return best


def node_latencies(links: list[LinkHealth], nodes: list[str]) -> dict[str, float | None]:
    best: dict[str, float | None] = {n: None for n in nodes}
    for link in links:
        for n in link.nodes:
            if link.latency_us is not None and (best[n] is None or link.latency_us < best[n]):
                best[n] = link.latency_us
    return best


def suspect_links(links: list[LinkHealth], threshold: float) -> list[LinkHealth]:
    """Pairs below threshold x the median node's link score: measured again, alone, before anything is named."""
    nodes = sorted({n for link in links for n in link.nodes})
    scores = [s for s in node_link_scores(links, nodes).values() if s is not None]
    if len(nodes) < 3 or not scores:
        return []
    median = statistics.median(scores)
    return [link for link in links if link.gb_s is not None and link.gb_s < threshold * median]


def judge(cfg: HealthConfig, plan: Plan, device: str, seen: Observations, seconds: float) -> Health:
    """Rank 0: every node's figures and flags, and every link's, as the record states them (`device`: what the
    compute check ran on)."""
    figures, links = seen.figures, seen.links
    n = len(plan.nodes)
    gemm_low = below({k: v.get("gflops") for k, v in figures.items()}, cfg.threshold)
    mem_low = below({k: v.get("membw_gb_s") for k, v in figures.items()}, cfg.threshold)
    scores = node_link_scores(links, plan.nodes)
    latency = node_latencies(links, plan.nodes)
    link_low = below(scores, cfg.threshold) if n >= 3 else {}
    known = [v for v in latency.values() if v is not None]
    lat_median = statistics.median(known) if len(known) >= 3 else None
    for link in links:
        if link.error:
            seen.notes.append(f"link {'-'.join(link.nodes)}: {link.error}")
    check_checksums(figures, seen)
    nodes, bad = [], []
    for node in plan.nodes:
        fig, flags = figures.get(node, {}), []
        if node in gemm_low:
            ratio, ref = gemm_low[node]
            flags.append(f"compute {ratio:.2f} x the {'median' if n >= 3 else 'other node'} "
                         f"({fig['gflops']:.3g} vs {ref:.3g} GFLOP/s){cpu_cause(fig)}")
        if node in mem_low:
            ratio, ref = mem_low[node]
            flags.append(f"memory bandwidth {ratio:.2f} x the median ({fig['membw_gb_s']:.3g} vs {ref:.3g} GB/s)")
        if node in link_low:
            ratio, ref = link_low[node]
            flags.append(f"links {ratio:.2f} x the median node's (best pair {scores[node]:.3g} vs {ref:.3g} GB/s)")
        if lat_median is not None and latency[node] is not None and \
                latency[node] > LATENCY_FACTOR * lat_median + LATENCY_SLACK_US:
            flags.append(f"latency {latency[node]:.0f} us, over {LATENCY_FACTOR:.0f} x the median "
                         f"({lat_median:.0f} us)")
        error = seen.errors.get(node)
        if error is not None:
            flags.append(f"its check failed: {error}")
        members = [r for r in plan.roster if r.node == node]
        nodes.append(NodeHealth(
            node=node, hostname=members[0].hostname, machine=members[0].machine, ranks=[r.rank for r in members],
            ready_s=max(r.ready_s for r in members), gemm_gflops=fig.get("gflops"), cpu_share=fig.get("cpu_share"),
            gflops_per_cpu_s=fig.get("gflops_per_cpu_s"), throttled_periods=fig.get("throttled"),
            membw_gb_s=fig.get("membw_gb_s"), link_gb_s=scores[node], latency_us=latency[node], flags=flags,
            error=error))
        if flags:
            bad.append(BadNode(node=node, reason="; ".join(flags)))
    return Health(policy=cfg.on_bad, threshold=cfg.threshold, device=device,
                  mode="serial" if len(plan.turns) > 1 else "parallel", machines=len(set(plan.machine_of.values())),
                  seconds=seconds, phases=seen.phases, nodes=nodes,
                  links=flag_links(cfg, plan.nodes, links, {b.node for b in bad}, seen.notes), bad=bad,
                  notes=seen.notes)


def check_checksums(figures: dict[str, dict], seen: Observations) -> None:
    """Every node multiplied the same seeded matrices: a checksum off the median's (relative 1e-3: BLAS
    kernels sum in different orders) is a wrong result, an error of that node's; at 2 nodes, a note."""
    sums = {node: fig["checksum"] for node, fig in figures.items()}
    if len(sums) < 2:
        return
    median = statistics.median(sums.values())
    odd = {n: s for n, s in sums.items() if abs(s - median) > 1e-3 * abs(median)}
    if len(sums) == 2 and odd:
        seen.notes.append("the 2 nodes' GEMM checksums differ: "
                          + ", ".join(f"{n} {s:.6g}" for n, s in sums.items()))
        return
    for node, value in odd.items():
        seen.errors.setdefault(node, f"the GEMM's result is wrong (checksum {value:.6g}, the others' {median:.6g})")


def flag_links(cfg: HealthConfig, nodes: list[str], links: list[LinkHealth], bad_nodes: set[str],
               notes: list[str]) -> list[LinkHealth]:
    """A single slow link: below half the node threshold x the median node score, confirmed alone, and
    neither end a bad node. At 2 nodes, only against health.min_link_gb_s."""
    out = []
    scores = [s for s in node_link_scores(links, nodes).values() if s is not None]
    median = statistics.median(scores) if len(nodes) >= 3 and scores else None
    for link in links:
        flag = None
        if link.gb_s is not None and not bad_nodes & set(link.nodes):
            if median is not None and link.confirmed and link.gb_s < cfg.threshold / 2 * median:
                flag = (f"link {'-'.join(link.nodes)} {link.gb_s / median:.2f} x the median node's "
                        f"({link.gb_s:.3g} vs {median:.3g} GB/s)")
            elif median is None and cfg.min_link_gb_s is not None and link.gb_s < cfg.min_link_gb_s:
                flag = (f"link {'-'.join(link.nodes)} {link.gb_s:.3g} GB/s, below health.min_link_gb_s="
                        f"{cfg.min_link_gb_s}")
        out.append(LinkHealth(nodes=link.nodes, gb_s=link.gb_s, latency_us=link.latency_us,
                              confirmed=link.confirmed, flag=flag, error=link.error))
    if median is None and len(nodes) == 2:
        notes.append("2 nodes: one link and no median, so a slow link cannot be laid at either end "
                          "(health.min_link_gb_s sets a floor for it)")
    return out


def cpu_cause(fig: dict) -> str:
    """What a slow CPU node's detail says of the cause."""
    share, throttled = fig.get("cpu_share"), fig.get("throttled")
    if share is None:
        return ""
    if share < 0.7 and throttled:
        return f": a CPU quota (its cgroup throttled {throttled} times, CPU share {share:.2f})"
    if share < 0.7:
        return f": its CPU share was {share:.2f} (something else runs there)"
    return f": at a full CPU share ({share:.2f}): slower hardware (clocks, a build without its vector unit)"


def verdict_of(health: Health, cfg: HealthConfig) -> Verdict:
    """What the policy makes of the flags: warn goes on; fail and exclude stop before training."""
    links = [link.flag for link in health.links if link.flag]
    if not health.bad:
        return Verdict(stop=False, message="; ".join(links))
    said = "; ".join(f"{b.node}: {b.reason}" for b in health.bad)
    if cfg.on_bad == "warn":
        return Verdict(stop=False, message=f"{said} (health.on_bad=warn: training goes on)", bad=health.bad)
    return Verdict(stop=True, message=f"health check: {said} (health.on_bad={cfg.on_bad}: stopping before training)",
                   bad=health.bad)
