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
links take
min(nodes - 1, MAX_ROUNDS) rounds of about 2 x PAIR_BUDGET_S at most each (O(1) beyond 9 nodes), plus a round per
suspect pair.

Everything travels through the rendezvous store, per-rank keys that rank 0 collects against deadlines, so a rank
that fails is named instead of hanging the job: every rank catches its own errors and posts them, and never leaves
mid-check (srun --kill-on-bad-exit would take rank 0 down before it reports); rank 0 writes the verdict, then every
rank acts on it. A store client blocks for ever when the store's host (rank 0) is stopped, whatever its timeout says,
so each rank has a watchdog that names the phase it is stuck in and the store's host, and ends the rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pipeline.badnodes import add_bad_nodes, bad_nodes_or_empty
from pipeline.cgroup import throttled_periods
from pipeline.config import HealthConfig, RunConfig
from pipeline.job.env import DistEnv
from pipeline.result import BadNode, Health, LinkHealth, NodeHealth
from pipeline.rundir import BadNodeEntry, Failure, Point, utc_now
from pipeline.slurm import excluded_nodes

log = logging.getLogger(__name__)

GEMM_S = 0.3  # per window: 3 CFS periods, the least that shows a CPU quota (a shorter one fits inside the quota)
MEMBW_S = 0.1
MEMBW_MAX_MIB = 512  # per buffer (two are copied between)
LINK_BYTES = {"cpu": 1 << 20, "cuda": 64 << 20}  # a transfer of >= 1 ms at the link's rate
LINK_REPS = 5  # best of: 2 let clean nodes fall to 0.36 x the median here, 5 never below 0.57
LATENCY_REPS = 20
PAIR_BUDGET_S = 0.5  # per pair and direction: a slow link stops repeating after 2 transfers
MAX_ROUNDS = 8  # each node meets this many others at most: enough to name a node, O(1) in the node count
# a node's best latency above 10 x the median and 200 us more: the best of 20 round trips between processes that
# share 2 loaded cores reached 0.9 ms against a median of 0.1 ms here (no fault: a latency fault cannot be made on
# this kernel, which has no netem), while a fault worth leaving a node out for is milliseconds against microseconds
LATENCY_FACTOR, LATENCY_SLACK_US = 10.0, 200.0


# a job that stops before training because its health check found a bad node exits with this code (sacct, srun)
EXIT_BAD_NODE = 3


class BadNodesFound(Exception):
    """The health check found a bad node and the policy stops the job before training (health.on_bad=exclude or
    fail). The worker exits with EXIT_BAD_NODE."""

    exit_code = EXIT_BAD_NODE


@dataclass(frozen=True)
class RankFacts:
    """What every rank says of itself at the roll call (gathered with the threads' placement)."""

    rank: int
    local_rank: int
    node: str
    hostname: str
    machine: str
    ready_s: float  # from its process's start until it was ready to rendezvous (a slow node imports slowly)


@dataclass
class Verdict:
    """What rank 0 decided, as every rank reads it."""

    stop: bool
    message: str
    bad: list[BadNode] = field(default_factory=list)


def turns_of(nodes: list[str], machine_of: dict[str, str]) -> list[list[str]]:
    """Turns of the compute check: the k-th node of every machine measures in turn k. Nodes on machines of their own
    all go in one turn; nodes that share a machine never share a turn."""
    by_machine: dict[str, list[str]] = {}
    for node in nodes:
        by_machine.setdefault(machine_of[node], []).append(node)
    depth = max(len(v) for v in by_machine.values())
    return [[m[k] for m in by_machine.values() if k < len(m)] for k in range(depth)]


def tournament(n: int, max_rounds: int = MAX_ROUNDS) -> list[list[tuple[int, int]]]:
    """Round-robin rounds (the circle method) over n players: n-1 rounds of n/2 disjoint pairs (n even; n odd
    gets a bye a round, and n rounds), at most `max_rounds` of them; each pair (low, high)."""
    ids: list[int | None] = list(range(n)) + ([None] if n % 2 else [])
    m, rounds = len(ids), []
    for _ in range(m - 1):
        pairs = [(ids[i], ids[m - 1 - i]) for i in range(m // 2)]
        rounds.append([tuple(sorted(p)) for p in pairs if None not in p])
        ids = [ids[0], ids[-1], *ids[1:-1]]
    return rounds[:max_rounds]


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


# ----------------------------------------------------------------------------------------------- the figures
def gemm(device: torch.device, seconds: float) -> dict:
    """The fixed GEMM for `seconds`: FLOP/s, the checksum every node must reproduce, and on a CPU the CPU share
    and the cgroup's throttled periods over the window."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.mm(a, b)  # warm-up, and the product to check
    checksum = float(c.double().abs().sum())
    throttled, cpu, t0 = throttled_periods(), time.process_time(), time.perf_counter()
    iterations = 0
    while True:
        torch.mm(a, b, out=c)
        iterations += 1
        if device.type == "cuda" and iterations % 8:
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - t0 >= seconds:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
    after = throttled_periods()
    flops = 2 * n**3 * iterations
    out = {"gflops": flops / wall / 1e9, "checksum": checksum, "finite": bool(torch.isfinite(c).all())}
    if device.type == "cpu":
        out.update(cpu_share=cpu / wall, gflops_per_cpu_s=flops / max(cpu, 1e-9) / 1e9,
                   throttled=after - throttled if None not in (after, throttled) else None)
    return out


def last_level_cache_bytes() -> int | None:
    try:
        caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
        text = (caches[-1] / "size").read_text().strip()
    except (OSError, IndexError):
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def membw_buffer(device: torch.device) -> tuple[int | None, str]:
    """The bytes of each of the copy's two buffers, or None and why not: on a CPU 4x the last-level cache, at most
    MEMBW_MAX_MIB; where even that would not be twice the cache, the copy would measure the cache."""
    if device.type == "cuda":
        return 1 << 30, ""
    llc = last_level_cache_bytes()
    if llc is None:
        return 256 << 20, ""
    size = min(4 * llc, MEMBW_MAX_MIB << 20)
    if size < 2 * llc:
        return None, (f"memory bandwidth not measured: this CPU's last-level cache ({llc >> 20} MiB) is more than "
                      f"half the largest buffer the check copies ({MEMBW_MAX_MIB} MiB), so it would measure the cache")
    return size, ""


def membw(buffers: tuple[torch.Tensor, torch.Tensor] | None, seconds: float) -> float | None:
    """Bytes read and written per second by copying one buffer into the other, in GB/s."""
    if buffers is None:
        return None
    x, y = buffers
    y.copy_(x)
    iterations, t0 = 0, time.perf_counter()
    while True:
        y.copy_(x)
        iterations += 1
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        if time.perf_counter() - t0 >= seconds:
            break
    return 2 * x.numel() * x.element_size() * iterations / (time.perf_counter() - t0) / 1e9


# -------------------------------------------------------------------------------------------- the check
class Watchdog:
    """Ends this rank when the check outlives `seconds`: a store client blocks for ever in get/check/wait when the
    store's host is stopped, and a Python thread still runs then (those calls release the GIL)."""

    def __init__(self, seconds: float, said: Callable[[str], None], store_host: str):
        self.phase = "start"
        self.seconds, self.said, self.store_host = seconds, said, store_host
        self.timer = threading.Timer(seconds, self._bark)
        self.timer.daemon = True
        self.timer.start()

    def _bark(self) -> None:
        self.said(f"health check still running after {self.seconds:.0f} s, in {self.phase}; the store it reports "
                  f"through is on rank 0 ({self.store_host}), which may not answer")
        os._exit(4)

    def stop(self) -> None:
        self.timer.cancel()


class Check:
    """One rank's part in the health check (see the module's docstring); rank 0 also collects and judges."""

    def __init__(self, cfg: HealthConfig, store: dist.Store, device: torch.device, roster: list[RankFacts],
                 me: int):
        self.cfg, self.device, self.roster, self.me = cfg, device, roster, me
        self.store = dist.PrefixStore("health", store)
        self.nodes = sorted({r.node for r in roster}, key=lambda n: min(r.rank for r in roster if r.node == n))
        self.node = roster[me].node
        self.leaders = {n: min(r.rank for r in roster if r.node == n) for n in self.nodes}
        self.machine_of = {r.node: r.machine for r in roster}
        self.turns = turns_of(self.nodes, self.machine_of)
        self.phases: dict[str, float] = {}
        self.errors: dict[str, str] = {}  # node -> its failed check
        self.notes: list[str] = []
        self.watchdog: Watchdog | None = None

    # ------------------------------------------------------------------------------ the store, with deadlines
    def post(self, key: str, value: dict) -> None:
        self.store.set(f"{key}/{self.me}", json.dumps(value))

    def collect(self, key: str, ranks: list[int], due_s: float) -> dict[int, dict]:
        """Rank 0: every rank's answer to `key` within due_s + health.answer_s; a rank that gave none gets an error."""
        got, end = {}, time.monotonic() + due_s + self.cfg.answer_s
        while True:
            for r in ranks:
                if r not in got and self.store.check([f"{key}/{r}"]):
                    got[r] = json.loads(self.store.get(f"{key}/{r}"))
            if len(got) == len(ranks) or time.monotonic() > end:
                break
            time.sleep(0.01)
        for r in ranks:
            got.setdefault(r, {"error": f"no answer within {due_s + self.cfg.answer_s:.0f} s"})
        return got

    def publish(self, key: str, value) -> None:
        self.store.set(key, json.dumps(value))

    def read(self, key: str):
        """Wait for what rank 0 publishes (no deadline of its own: the watchdog bounds it)."""
        self.store.wait([key], timedelta(seconds=self.watchdog.seconds if self.watchdog else 600))
        return json.loads(self.store.get(key))

    # ---------------------------------------------------------------------------------------------- the steps
    def compute(self) -> dict[str, dict]:
        """The GEMM and the copy, turn by turn, each node's slowest rank's figures kept, and of two passes the better
        (load from elsewhere only ever slows a node down). Nodes that share a machine make two passes, the second in
        the reverse order (load there varies from one time slot to the next: one pass let clean nodes fall to 0.42 x
        the median here); nodes on machines of their own make one, and those below the threshold measure once more.
        Rank 0 returns {node: figures}; the others {}."""
        size, why = membw_buffer(self.device)
        if why:
            self.notes.append(why)
        buffers = None
        if size is not None:
            x = torch.ones(size // 4, device=self.device)
            buffers = (x, torch.empty_like(x))
        best: dict[str, dict] = {}
        turns = list(enumerate(self.turns))
        passes = [turns, turns[::-1]] if len(turns) > 1 else [turns]
        for attempt, order in enumerate(passes):
            self._pass(f"compute/{attempt}", order, buffers, best)
        if len(passes) == 1:
            if self.me == 0:
                self.publish("retry", sorted(below({n: f["gflops"] for n, f in best.items()}, self.cfg.threshold)))
            retry = set(self.read("retry"))
            if retry:
                self._pass("compute/retry", [(k, [n for n in t if n in retry]) for k, t in turns], buffers, best)
        return best

    def _pass(self, key: str, order: list[tuple[int, list[str]]], buffers, best: dict[str, dict]) -> None:
        for k, turn in order:
            if turn:
                for node, fig in self._turn(f"{key}/{k}", turn, buffers).items():
                    if node not in best or fig["gflops"] > best[node]["gflops"]:
                        best[node] = fig

    def _turn(self, key: str, turn: list[str], buffers) -> dict[str, dict]:
        """One turn: its nodes' ranks measure at once. Rank 0 returns each node's slowest rank's figures (a node
        whose rank failed is in self.errors instead)."""
        ranks = [r.rank for r in self.roster if r.node in turn]
        if self.me == 0:
            self.publish(f"go/{key}", 1)
        if self.me in ranks:
            self.read(f"go/{key}")
            self.post(key, self._measure(buffers))
        if self.me != 0:
            return {}
        slowest: dict[str, dict] = {}
        for r, answer in self.collect(key, ranks, GEMM_S + MEMBW_S).items():
            node = self.roster[r].node
            if "error" in answer:
                self.errors.setdefault(node, answer["error"])
            elif node not in slowest or answer["gflops"] < slowest[node]["gflops"]:
                slowest[node] = answer
        return {node: fig for node, fig in slowest.items() if node not in self.errors}

    def _measure(self, buffers) -> dict:
        try:
            out = gemm(self.device, GEMM_S)
            out["membw_gb_s"] = membw(buffers, MEMBW_S)
            if not out["finite"]:
                return {"error": "the GEMM's result is not finite (NaN or infinite)"}
            return out
        except Exception as e:  # the check names the node, whatever failed on it
            return {"error": f"{type(e).__name__}: {e}"[:300]}

    def links(self) -> list[LinkHealth]:
        """The tournament over the nodes' leading ranks, then the suspect pairs again, one at a time (the better of
        the two measurements kept: load only ever slows a pair down). Rank 0 returns every pair; the others []."""
        if self.me == 0:
            self.publish("failed", sorted(self.errors))
        failed = set(self.read("failed"))  # a node whose compute check failed is left out: it would only time out
        leaders = [self.leaders[n] for n in self.nodes if n not in failed]
        found = self._rounds("links", [[(leaders[a], leaders[b]) for a, b in rd] for rd in tournament(len(leaders))])
        if self.me == 0:
            self.publish("suspects", [[self.leaders[link.nodes[0]], self.leaders[link.nodes[1]]]
                                      for link in suspect_links(found, self.cfg.threshold)])
        suspects = [[tuple(p)] for p in self.read("suspects")]
        again = {tuple(link.nodes): link for link in self._rounds("confirm", suspects)}
        merged = []
        for link in found:
            second = again.get(tuple(link.nodes))
            if second is not None:
                keep = second if (second.gb_s or 0) > (link.gb_s or 0) else link
                link = LinkHealth(nodes=link.nodes, gb_s=keep.gb_s, latency_us=keep.latency_us, confirmed=True,
                                  error=keep.error)
            merged.append(link)
        return merged

    def _rounds(self, name: str, rounds: list[list[tuple[int, int]]]) -> list[LinkHealth]:
        """Each round's pairs at once, the next round once rank 0 holds this one's answers. Rank 0 returns a
        LinkHealth per pair: the lower of the two directions (each measured by its sender), the leader's latency,
        or the first error either end met."""
        started, answers = time.perf_counter(), {}
        for i, rd in enumerate(rounds):
            self.watchdog.phase = f"{name}, round {i + 1} of {len(rounds)}"
            mine = [p for p in rd if self.me in p]
            if self.me == 0:
                self.publish(f"go/{name}/{i}", 1)
            if mine or self.me == 0:
                self.read(f"go/{name}/{i}")
            for a, b in mine:
                self.post(f"{name}/{i}/{a}-{b}", self._pair(a, b))
            if self.me == 0:
                for a, b in rd:
                    answers[(a, b)] = self.collect(f"{name}/{i}/{a}-{b}", [a, b], 4 * PAIR_BUDGET_S)
        self.phases[name] = time.perf_counter() - started
        found = []
        for (a, b), both in answers.items():
            errors = [both[r]["error"] for r in (a, b) if "error" in both[r]]
            rates = [both[r].get("sent_gb_s") for r in (a, b)]
            found.append(LinkHealth(nodes=[self.roster[a].node, self.roster[b].node],
                                    gb_s=None if errors or None in rates else min(rates),
                                    latency_us=both[a].get("latency_us"),
                                    error=f"{self.roster[a].node} <-> {self.roster[b].node}: {errors[0]}"
                                    if errors else None))
        return found

    def _pair(self, a: int, b: int) -> dict:
        """One pair: latency by ping-pong (the leader's figure: half the best round trip), then each way a
        bandwidth that its sender measures (a transfer and its 4-byte acknowledgement, best of LINK_REPS within
        PAIR_BUDGET_S). The lower rank leads."""
        peer = b if self.me == a else a
        who = f"{self.roster[peer].node} (rank {peer})"
        lead = self.me == a
        timeout = timedelta(seconds=max(5.0, 10 * PAIR_BUDGET_S))
        tiny = torch.zeros(1, device=self.device)
        big = torch.ones(LINK_BYTES[self.device.type] // 4, device=self.device)

        def wait(work, what: str) -> None:
            try:
                work.wait(timeout)
            except RuntimeError as e:  # gloo's timeout names no peer
                raise TimeoutError(f"{what} {who} timed out ({str(e).splitlines()[0][-80:]})") from None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        def send(t):
            wait(dist.isend(t, peer), "send to")

        def recv(t):
            wait(dist.irecv(t, peer), "receive from")

        try:
            trips = []
            for i in range(LATENCY_REPS + 2):
                t0 = time.perf_counter()
                if lead:
                    send(tiny)
                    recv(tiny)
                else:
                    recv(tiny)
                    send(tiny)
                if i >= 2:
                    trips.append(time.perf_counter() - t0)
            sent = [self._direction(lead == forward, big, send, recv) for forward in (True, False)]
            return {"sent_gb_s": next(r for r in sent if r is not None),
                    **({"latency_us": min(trips) / 2 * 1e6} if lead else {})}
        except Exception as e:  # named, and posted: the pair's other end may be the one at fault
            return {"error": f"{type(e).__name__}: {e}"[:300]}

    def _direction(self, sending: bool, big: torch.Tensor, send, recv) -> float | None:
        """One direction's best transfer in GB/s (the sender's figure; None on the receiving side). The sender
        decides whether to go on (PAIR_BUDGET_S, after 2 transfers) and says so in a control message."""
        flag, best, started = torch.zeros(1, device=big.device), None, time.perf_counter()
        for i in range(LINK_REPS + 1):  # the first untimed
            if sending:
                flag.fill_(1.0 if i <= 2 or time.perf_counter() - started < PAIR_BUDGET_S else 0.0)
                send(flag)
                if flag.item() == 0:
                    break
                t0 = time.perf_counter()
                send(big)
                recv(flag)
                if i:
                    rate = big.numel() * big.element_size() / (time.perf_counter() - t0) / 1e9
                    best = rate if best is None else max(best, rate)
            else:
                recv(flag)
                if flag.item() == 0:
                    break
                recv(big)
                send(flag)
        return best

    # ------------------------------------------------------------------------------------------- the verdict
    def judge(self, figures: dict[str, dict], links: list[LinkHealth], started: float) -> Health:
        """Rank 0: every node's figures, the flags, and what the policy makes of them."""
        cfg, n = self.cfg, len(self.nodes)
        gemm_low = below({k: v.get("gflops") for k, v in figures.items()}, cfg.threshold)
        mem_low = below({k: v.get("membw_gb_s") for k, v in figures.items()}, cfg.threshold)
        scores = node_link_scores(links, self.nodes)
        latency = node_latencies(links, self.nodes)
        link_low = below(scores, cfg.threshold) if n >= 3 else {}
        known = [v for v in latency.values() if v is not None]
        lat_median = statistics.median(known) if len(known) >= 3 else None
        for link in links:
            if link.error:
                self.notes.append(f"link {'-'.join(link.nodes)}: {link.error}")
        self._check_checksums(figures)
        nodes, bad = [], []
        for node in self.nodes:
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
            error = self.errors.get(node)
            if error is not None:
                flags.append(f"its check failed: {error}")
            members = [r for r in self.roster if r.node == node]
            nodes.append(NodeHealth(
                node=node, hostname=members[0].hostname, machine=members[0].machine, ranks=[r.rank for r in members],
                ready_s=max(r.ready_s for r in members), gemm_gflops=fig.get("gflops"), cpu_share=fig.get("cpu_share"),
                gflops_per_cpu_s=fig.get("gflops_per_cpu_s"), throttled_periods=fig.get("throttled"),
                membw_gb_s=fig.get("membw_gb_s"), link_gb_s=scores[node], latency_us=latency[node], flags=flags,
                error=error))
            if flags:
                bad.append(BadNode(node=node, reason="; ".join(flags)))
        return Health(policy=cfg.on_bad, threshold=cfg.threshold, device=self.device.type,
                      mode="serial" if len(self.turns) > 1 else "parallel",
                      machines=len(set(self.machine_of.values())), seconds=time.perf_counter() - started,
                      phases=self.phases, nodes=nodes, links=self._flag_links(links, {b.node for b in bad}), bad=bad,
                      notes=self.notes)

    def _check_checksums(self, figures: dict[str, dict]) -> None:
        """Every node multiplied the same seeded matrices: a checksum off the median's (relative 1e-3: BLAS
        kernels sum in different orders) is a wrong result, an error of that node's; at 2 nodes, a note."""
        sums = {node: fig["checksum"] for node, fig in figures.items()}
        if len(sums) < 2:
            return
        median = statistics.median(sums.values())
        odd = {n: s for n, s in sums.items() if abs(s - median) > 1e-3 * abs(median)}
        if len(sums) == 2 and odd:
            self.notes.append("the 2 nodes' GEMM checksums differ: "
                              + ", ".join(f"{n} {s:.6g}" for n, s in sums.items()))
            return
        for node, value in odd.items():
            self.errors.setdefault(node, f"the GEMM's result is wrong (checksum {value:.6g}, the others' {median:.6g})")

    def _flag_links(self, links: list[LinkHealth], bad_nodes: set[str]) -> list[LinkHealth]:
        """A single slow link: below half the node threshold x the median node score, confirmed alone, and
        neither end a bad node. At 2 nodes, only against health.min_link_gb_s."""
        cfg, out = self.cfg, []
        scores = [s for s in node_link_scores(links, self.nodes).values() if s is not None]
        median = statistics.median(scores) if len(self.nodes) >= 3 and scores else None
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
        if median is None and len(self.nodes) == 2:
            self.notes.append("2 nodes: one link and no median, so a slow link cannot be laid at either end "
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


class Reporter:
    """What the check leaves behind besides its answer: `hang` records this rank's failure when the watchdog
    ends it; `decided` (rank 0) acts on the verdict before any rank learns it, since a rank that leaves early
    takes the others down (srun --kill-on-bad-exit)."""

    def hang(self, message: str) -> None:
        pass

    def decided(self, health: Health, verdict: Verdict) -> Health:
        return health


def check_health(cfg: HealthConfig, store: dist.Store, device: torch.device, roster: list[RankFacts], me: int,
                 reporter: Reporter) -> tuple[Health | None, Verdict]:
    """Run the check on every rank; (rank 0's Health, else None; the verdict every rank acts on)."""
    started = time.perf_counter()
    check = Check(cfg, store, device, roster, me)
    n = len(check.nodes)
    # the longest it can take: every turn twice, every round and every pair once more, and a deadline passed for
    # each node (one that does not answer is left out of what follows)
    bound = 2 * len(check.turns) * (GEMM_S + MEMBW_S + 0.5) + 2 * min(n, MAX_ROUNDS) * 4 * PAIR_BUDGET_S + \
        (n + 1) * cfg.answer_s + 10
    check.watchdog = Watchdog(bound, reporter.hang, roster[0].node)
    try:
        check.watchdog.phase = "compute"
        t0 = time.perf_counter()
        figures = check.compute()
        check.phases["compute"] = time.perf_counter() - t0
        check.watchdog.phase = "links"
        links = check.links()
        health = None
        if me == 0:
            health = check.judge(figures, links, started)
            verdict = verdict_of(health, cfg)
            health = reporter.decided(health, verdict)
            check.publish("verdict", {"stop": verdict.stop, "message": verdict.message,
                                      "bad": [[b.node, b.reason] for b in verdict.bad]})
        check.watchdog.phase = "waiting for the verdict"
        answer = check.read("verdict")
        verdict = Verdict(stop=answer["stop"], message=answer["message"],
                          bad=[BadNode(node=n, reason=r) for n, r in answer["bad"]])
        return health, verdict
    finally:
        check.watchdog.stop()


class JobReporter(Reporter):
    """The job's side of a verdict: a hung rank's failure record; on rank 0 the log, the nodes its submission
    avoided and this run's earlier stops (for the record), and under health.on_bad=exclude the bad nodes on the
    sweep's list, written before any rank learns the verdict."""

    def __init__(self, point: Point, point_dir: Path, env: DistEnv, cfg: RunConfig):
        self.point, self.point_dir, self.env, self.cfg = point, point_dir, env, cfg
        self.sweep_dir = Path(point.sweep_dir) if point.sweep_dir else point_dir

    def hang(self, message: str) -> None:
        print(f"pipeline: rank {self.env.rank} ({self.env.node_name}): {message}", file=sys.stderr, flush=True)
        Failure(rank=self.env.rank, node_rank=self.env.node_rank, at_unix=time.time(), error=message).write(
            self.point_dir)

    def decided(self, health: Health, verdict: Verdict) -> Health:
        simulated = self.point.launch_mode == "local"
        if verdict.stop and self.cfg.health.on_bad == "exclude":
            add_bad_nodes(self.sweep_dir, [BadNodeEntry(node=b.node, reason=b.reason, job_id=self.env.job_id,
                                                        run_id=self.point.run_id, point=self.point.point, at=utc_now(),
                                                        simulated=simulated) for b in verdict.bad])
        for n in health.nodes:
            log.info("health: %s", describe_node(n))
        (log.error if verdict.stop else log.warning if verdict.message else log.info)(
            "health check of %d nodes (%.1f s, %s): %s", len(health.nodes), health.seconds, health.mode,
            verdict.message or "every node within " f"{health.threshold} x the median")
        earlier = [e for e in bad_nodes_or_empty(self.sweep_dir).entries
                   if e.run_id == self.point.run_id and e.job_id != self.env.job_id]
        return replace(health, left_out=[] if simulated else excluded_nodes(self.env.job_id), earlier=earlier)


def describe_node(n: NodeHealth) -> str:
    """One node's figures in a line, for the log."""
    def f(value, fmt):
        return "-" if value is None else format(value, fmt)
    cpu = f", CPU share {f(n.cpu_share, '.2f')}, throttled {f(n.throttled_periods, 'd')}" if n.cpu_share is not None \
        else ""
    return (f"{n.node} (ranks {','.join(map(str, n.ranks))}, ready after {n.ready_s:.1f} s): GEMM "
            f"{f(n.gemm_gflops, '.3g')} GFLOP/s{cpu}, memory {f(n.membw_gb_s, '.3g')} GB/s, best link "
            f"{f(n.link_gb_s, '.3g')} GB/s, latency {f(n.latency_us, '.0f')} us" + (f"; {n.error}" if n.error else ""))
