"""What a node count costs: node-hours (GPU-hours on GPUs) per epoch, and the time to an epoch, against node
count; and the knee, the node count beyond which each added node buys less than COST_FRACTION of what a node
buys at the baseline.

    epoch time       = samples per epoch / throughput               (samples per epoch = steps x global batch)
    node-hours       = nodes x epoch time / 3600                    (GPU-hours: ranks x epoch time / 3600)
    marginal value   = (throughput_b - throughput_a) / (N_b - N_a) / (throughput_base / N_base)

An epoch is the same work at every node count in strong scaling (the same samples, a fixed global batch); in
weak scaling too, with the global batch (and so the optimization) growing with the nodes. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COST_FRACTION = 0.5


@dataclass
class CostPoint:
    nodes: int
    epoch_s: float
    node_hours: float
    gpu_hours: float | None  # on GPUs only: one rank per GPU
    marginal: float | None  # the value of the nodes added since the previous node count (see module docstring)


@dataclass
class CostView:
    group: str
    points: list[CostPoint] = field(default_factory=list)
    knee: int | None = None  # beyond this node count each added node buys less than COST_FRACTION of its cost
    summary: str = ""


def cost_view(group: str, rows, samples_per_epoch: float | None, on_gpus: bool) -> CostView:
    """From a group's rows (measured, sorted by node count); none without an epoch's length (a stream whose end no
    run reached)."""
    view = CostView(group)
    if samples_per_epoch is None:
        view.summary = "no epoch length (a stream whose end no run reached): no cost per epoch"
        return view
    base = rows[0]
    per_node_base = base.throughput / base.nodes
    previous = None
    for r in rows:
        epoch_s = samples_per_epoch / r.throughput
        marginal = None
        if previous is not None:
            marginal = (r.throughput - previous.throughput) / (r.nodes - previous.nodes) / per_node_base
        view.points.append(CostPoint(r.nodes, epoch_s, r.nodes * epoch_s / 3600,
                                     r.world_size * epoch_s / 3600 if on_gpus else None, marginal))
        if marginal is not None and marginal < COST_FRACTION and view.knee is None:
            view.knee = previous.nodes
        previous = r
    largest = rows[-1].nodes
    if len(rows) < 2:
        view.summary = "one node count measured: no knee to name yet"
    elif view.knee is None:
        view.summary = (f"no knee up to {largest} nodes: each step up bought at least {COST_FRACTION:.0%} of what a "
                        f"node buys at {base.nodes} node(s)")
    else:
        view.summary = (f"beyond {view.knee} node(s) each added node buys less than {COST_FRACTION:.0%} of what a node "
                        f"buys at {base.nodes} node(s)")
    return view
