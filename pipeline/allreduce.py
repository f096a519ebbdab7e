"""The ring all-reduce model, once: its time, and its latency and bandwidth fitted to measurements. The job's fabric
probe fits it to all-reduces of many sizes on one world size (pipeline.job.probe); the collector's forecast fits it
to the measured comm phase over several world sizes and predicts larger ones with it (pipeline.collector.forecast).

    time(P ranks, bytes) = 2(P-1) x latency + 2(P-1)/P x bytes x seconds_per_byte

(latency per ring step; 1 / seconds_per_byte is the bus bandwidth, nccl-tests' busbw). The fit is non-negative
least squares, with one rule for a term that would come out negative: the better of the two one-term fits (each
clamped at 0) by squared residuals. Pure numpy: no torch.
"""

from __future__ import annotations

import numpy as np


def terms(ranks: np.ndarray, nbytes: np.ndarray | float) -> np.ndarray:
    """The model's two columns for each measurement: 2(P-1) and 2(P-1)/P x bytes."""
    ranks = np.asarray(ranks, dtype=float)
    return np.stack([2 * (ranks - 1), 2 * (ranks - 1) / ranks * np.asarray(nbytes, dtype=float)], axis=1)


def ring_time(latency_s: float, seconds_per_byte: float, ranks: int, nbytes: float) -> float:
    return latency_s * 2 * (ranks - 1) + seconds_per_byte * 2 * (ranks - 1) / ranks * nbytes


def fit(ranks: np.ndarray, nbytes: np.ndarray | float, seconds: np.ndarray) -> tuple[float, float]:
    """(latency in s per ring step, seconds per byte), both >= 0, fitted to `seconds` measured at `ranks` and
    `nbytes` (either may be one value for all)."""
    x = terms(np.broadcast_to(ranks, np.shape(seconds)), np.broadcast_to(nbytes, np.shape(seconds)))
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
