"""Who measures when in the health check: every rank's facts from the roll call, the compute step's turns (nodes that
share a machine never measure at once: they would measure their shares of one CPU) and the link step's rounds (a
round-robin tournament over the nodes' leading ranks), and the longest all of it can take."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.job.health.measure import GEMM_S, MEMBW_S, PAIR_BUDGET_S

MAX_ROUNDS = 8  # each node meets this many others at most: enough to name a node, O(1) in the node count


@dataclass(frozen=True)
class RankFacts:
    """What every rank says of itself at the roll call (gathered with the threads' placement)."""

    rank: int
    local_rank: int
    node: str
    hostname: str
    machine: str
    ready_s: float  # from its process's start until it was ready to rendezvous (a slow node imports slowly)


@dataclass(frozen=True)
class Plan:
    """The check's plan, from the roll call: the nodes in the order of their first rank, each node's leading rank
    (its end of the links), each node's machine (its boot id), and the compute step's turns."""

    roster: list[RankFacts]
    nodes: list[str]
    leaders: dict[str, int]
    machine_of: dict[str, str]
    turns: list[list[str]]

    @classmethod
    def of(cls, roster: list[RankFacts]) -> "Plan":
        nodes = sorted({r.node for r in roster}, key=lambda n: min(r.rank for r in roster if r.node == n))
        machine_of = {r.node: r.machine for r in roster}
        return cls(roster=roster, nodes=nodes, leaders={n: min(r.rank for r in roster if r.node == n) for n in nodes},
                   machine_of=machine_of, turns=turns_of(nodes, machine_of))

    def longest_s(self, answer_s: float) -> float:
        """The longest the check can take: every turn twice, every round and every pair once more, and a deadline
        passed for each node (one that does not answer is left out of what follows)."""
        n = len(self.nodes)
        return 2 * len(self.turns) * (GEMM_S + MEMBW_S + 0.5) + 2 * min(n, MAX_ROUNDS) * 4 * PAIR_BUDGET_S + \
            (n + 1) * answer_s + 10


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
