"""The ring model of the collectives, once: their time, and latency and bandwidth fitted to measurements. The job's
fabric probe fits it to collectives of many sizes on one world size (pipeline.job.probe); the collector's forecast
predicts a step's communication at other world sizes with it, and fits it to the measured comm phase over several
(pipeline.collector.forecast).

    time(op, P ranks, bytes) = k (P-1) x latency + k (P-1)/P x bytes x seconds_per_byte

with k = 2 for an all-reduce (a reduce-scatter then an all-gather) and k = 1 for an all-gather or a reduce-scatter,
`bytes` nccl-tests' size (an all-gather's output, a reduce-scatter's input, an all-reduce's buffer), latency per
ring step and 1 / seconds_per_byte the bus bandwidth (nccl-tests' busbw = algbw x k (P-1)/P). A step's
communication is the sum over its collectives (`Volume`s: an op, its group's ranks, its calls and bytes per step),
each call paying the latency. The fit is non-negative least squares, with one rule for a term that would come out
negative: the better of the two one-term fits (each clamped at 0) by squared residuals. Pure numpy: no torch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

RING_STEPS = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1}  # k: ring steps per rank, in units of P-1


class Volume(NamedTuple):
    """One kind of collective of a step: what it is, over how many ranks, how often and how much per step."""

    op: str
    ranks: int
    calls: int
    bytes: int


def bus_factor(op: str, ranks: int) -> float:
    """nccl-tests' busbw / algbw: k (n-1)/n."""
    return RING_STEPS[op] * (ranks - 1) / ranks


def terms(ranks: np.ndarray, nbytes: np.ndarray | float, op: str = "all_reduce") -> np.ndarray:
    """The model's two columns for each measurement of one collective: k(P-1) and k(P-1)/P x bytes."""
    ranks = np.asarray(ranks, dtype=float)
    k = RING_STEPS[op]
    return np.stack([k * (ranks - 1), k * (ranks - 1) / ranks * np.asarray(nbytes, dtype=float)], axis=1)


def volume_terms(volumes: list[Volume]) -> np.ndarray:
    """A step's two columns: the sum over its collectives of calls x k(P-1), and of k(P-1)/P x bytes."""
    out = np.zeros(2)
    for v in volumes:
        k = RING_STEPS[v.op]
        out += (v.calls * k * (v.ranks - 1), k * (v.ranks - 1) / v.ranks * v.bytes)
    return out


def ring_time(latency_s: float, seconds_per_byte: float, ranks: int, nbytes: float, op: str = "all_reduce") -> float:
    return float(terms([ranks], nbytes, op)[0] @ np.array([latency_s, seconds_per_byte]))


def volume_time(volumes: list[Volume], fabric: dict[str, tuple[float, float]]) -> float:
    """A step's communication: each collective on its op's (latency, seconds per byte)."""
    return float(sum(volume_terms([v]) @ np.array(fabric[v.op]) for v in volumes))


def fit_columns(x: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """(latency, seconds per byte), both >= 0, for the columns `x` (n, 2) and the times measured."""
    t = np.asarray(seconds, dtype=float)
    solution, *_ = np.linalg.lstsq(x, t, rcond=None)
    if (solution >= 0).all():
        return float(solution[0]), float(solution[1])
    fits = []
    for j in (0, 1):
        column = x[:, j]
        coef = max(0.0, float(column @ t / (column @ column))) if column @ column > 0 else 0.0
        fits.append((float(np.sum((t - coef * column) ** 2)), j, coef))
    _, j, coef = min(fits)
    return (coef, 0.0) if j == 0 else (0.0, coef)


def fit(ranks: np.ndarray, nbytes: np.ndarray | float, seconds: np.ndarray,
        op: str = "all_reduce") -> tuple[float, float]:
    """(latency in s per ring step, seconds per byte), both >= 0, fitted to `seconds` measured at `ranks` and
    `nbytes` (either may be one value for all)."""
    x = terms(np.broadcast_to(ranks, np.shape(seconds)), np.broadcast_to(nbytes, np.shape(seconds)), op)
    return fit_columns(x, seconds)
