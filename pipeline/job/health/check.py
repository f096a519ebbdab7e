"""The steps every rank takes in the health check (pipeline.job.health): the compute step in turns, the link step in
rounds, rank 0's verdict, which every rank then acts on."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from pipeline.config import HealthConfig
from pipeline.job.health.measure import GEMM_S, MEMBW_S, PAIR_BUDGET_S, copy_buffers, node_figures, pair_figures
from pipeline.job.health.protocol import Board, Watchdog
from pipeline.job.health.report import Reporter
from pipeline.job.health.schedule import Plan, RankFacts, tournament
from pipeline.job.health.verdict import Observations, Verdict, below, judge, suspect_links, verdict_of
from pipeline.result import BadNode, Health, LinkHealth


# a job that stops before training because its health check found a bad node exits with this code (sacct, srun)
EXIT_BAD_NODE = 3


class BadNodesFound(Exception):
    """The health check found a bad node and the policy stops the job before training (health.on_bad=exclude or
    fail). The worker exits with EXIT_BAD_NODE."""

    exit_code = EXIT_BAD_NODE


class Check:
    """One rank's part in the health check; rank 0 also collects what the others measured."""

    def __init__(self, cfg: HealthConfig, board: Board, device: torch.device, plan: Plan, me: int):
        self.cfg, self.board, self.device, self.plan, self.me = cfg, board, device, plan, me
        self.seen = Observations(figures={}, links=[], errors={}, notes=[], phases={})

    def compute(self) -> dict[str, dict]:
        """The GEMM and the copy, turn by turn, each node's slowest rank's figures kept, and of two passes the better
        (load from elsewhere only ever slows a node down). Nodes that share a machine make two passes, the second in
        the reverse order (load there varies from one time slot to the next: one pass let clean nodes fall to 0.42 x
        the median here); nodes on machines of their own make one, and those below the threshold measure once more.
        Rank 0 returns {node: figures}; the others {}."""
        buffers, why = copy_buffers(self.device)
        if why:
            self.seen.notes.append(why)
        best: dict[str, dict] = {}
        turns = list(enumerate(self.plan.turns))
        passes = [turns, turns[::-1]] if len(turns) > 1 else [turns]
        for attempt, order in enumerate(passes):
            self._pass(f"compute/{attempt}", order, buffers, best)
        if len(passes) == 1:
            if self.me == 0:
                slow = below({n: f["gflops"] for n, f in best.items()}, self.cfg.threshold)
                self.board.publish("retry", sorted(slow))
            retry = set(self.board.read("retry"))
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
        whose rank failed is in self.seen.errors instead)."""
        ranks = [r.rank for r in self.plan.roster if r.node in turn]
        if self.me == 0:
            self.board.publish(f"go/{key}", 1)
        if self.me in ranks:
            self.board.read(f"go/{key}")
            self.board.post(key, node_figures(self.device, buffers))
        if self.me != 0:
            return {}
        slowest: dict[str, dict] = {}
        for r, answer in self.board.collect(key, ranks, GEMM_S + MEMBW_S).items():
            node = self.plan.roster[r].node
            if "error" in answer:
                self.seen.errors.setdefault(node, answer["error"])
            elif node not in slowest or answer["gflops"] < slowest[node]["gflops"]:
                slowest[node] = answer
        return {node: fig for node, fig in slowest.items() if node not in self.seen.errors}

    def links(self) -> list[LinkHealth]:
        """The tournament over the nodes' leading ranks, then the suspect pairs again, one at a time (the better of
        the two measurements kept: load only ever slows a pair down). Rank 0 returns every pair; the others []."""
        if self.me == 0:
            self.board.publish("failed", sorted(self.seen.errors))
        # a node whose compute check failed is left out: it would only time out
        failed = set(self.board.read("failed"))
        leaders = [self.plan.leaders[n] for n in self.plan.nodes if n not in failed]
        found = self._rounds("links", [[(leaders[a], leaders[b]) for a, b in rd] for rd in tournament(len(leaders))])
        if self.me == 0:
            self.board.publish("suspects", [[self.plan.leaders[link.nodes[0]], self.plan.leaders[link.nodes[1]]]
                                            for link in suspect_links(found, self.cfg.threshold)])
        suspects = [[tuple(p)] for p in self.board.read("suspects")]
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
            self.board.watchdog.phase = f"{name}, round {i + 1} of {len(rounds)}"
            mine = [p for p in rd if self.me in p]
            if self.me == 0:
                self.board.publish(f"go/{name}/{i}", 1)
            if mine or self.me == 0:
                self.board.read(f"go/{name}/{i}")
            for a, b in mine:
                peer = self.plan.roster[b if self.me == a else a].node
                self.board.post(f"{name}/{i}/{a}-{b}", pair_figures(self.me, a, b, peer, self.device))
            if self.me == 0:
                for a, b in rd:
                    answers[(a, b)] = self.board.collect(f"{name}/{i}/{a}-{b}", [a, b], 4 * PAIR_BUDGET_S)
        self.seen.phases[name] = time.perf_counter() - started
        found = []
        for (a, b), both in answers.items():
            errors = [both[r]["error"] for r in (a, b) if "error" in both[r]]
            rates = [both[r].get("sent_gb_s") for r in (a, b)]
            found.append(LinkHealth(nodes=[self.plan.roster[a].node, self.plan.roster[b].node],
                                    gb_s=None if errors or None in rates else min(rates),
                                    latency_us=both[a].get("latency_us"),
                                    error=f"{self.plan.roster[a].node} <-> {self.plan.roster[b].node}: {errors[0]}"
                                    if errors else None))
        return found


def check_health(cfg: HealthConfig, store: dist.Store, device: torch.device, roster: list[RankFacts], me: int,
                 reporter: Reporter) -> tuple[Health | None, Verdict]:
    """Run the check on every rank; (rank 0's Health, else None; the verdict every rank acts on)."""
    started, plan = time.perf_counter(), Plan.of(roster)
    watchdog = Watchdog(plan.longest_s(cfg.answer_s), reporter.hang, roster[0].node)
    board = Board(store, me, cfg.answer_s, watchdog)
    check = Check(cfg, board, device, plan, me)
    try:
        watchdog.phase = "compute"
        t0 = time.perf_counter()
        check.seen.figures = check.compute()
        check.seen.phases["compute"] = time.perf_counter() - t0
        watchdog.phase = "links"
        check.seen.links = check.links()
        health = None
        if me == 0:
            health = judge(cfg, plan, device.type, check.seen, time.perf_counter() - started)
            verdict = verdict_of(health, cfg)
            health = reporter.decided(health, verdict)
            board.publish("verdict", {"stop": verdict.stop, "message": verdict.message,
                                      "bad": [[b.node, b.reason] for b in verdict.bad]})
        watchdog.phase = "waiting for the verdict"
        answer = board.read("verdict")
        verdict = Verdict(stop=answer["stop"], message=answer["message"],
                          bad=[BadNode(node=n, reason=r) for n, r in answer["bad"]])
        return health, verdict
    finally:
        watchdog.stop()
