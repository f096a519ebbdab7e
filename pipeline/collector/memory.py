"""Memory per rank against node count, measured and predicted, and the smallest node count at which a group's
training fits a device's memory.

The records count each rank's state (parameters, gradients, optimizer state) from its tensors' local shards, the
part of it that is sharded, and the peak (CUDA's peak allocated bytes, or a CPU process's peak resident set). From
the baseline, the group's smallest node count whose runs communicate (more than one rank: a single rank holds no
communication buffers; else its smallest), at N nodes:

    shard(N)  = the ranks a sharded tensor is split over: FSDP's grows with the nodes (every rank), HSDP's stays a
                node's ranks, DDP shards nothing (1)
    state(N)  = sharded_base x shard_base / shard(N) + (state_base - sharded_base)      the sharded part divides
    peak(N)   = state(N) + (peak_base - state_base)                  the rest as measured (activations, gathered
                                                                     parameters, buffers, the runtime)

The state is a count, so its prediction is exact for the same model and optimizer; the peak's rest is assumed to
stay as measured at the baseline, which holds in weak scaling (the same micro-batch) and is an upper bound in
strong scaling (each rank's micro-batch shrinks with the nodes). Its 95% interval is Student's t over the
baseline's repeats (one per repeat, as the probe forecast's); without two repeats it says so instead. A group
fits a device of D bytes at the smallest node count whose predicted state is <= D ("the training state fits"),
and whose peak's upper bound is <= D ("the whole run fits"). Pure Python and numpy: no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from pipeline.collector.forecast import t975
from pipeline.collector.records import Run

# where the fit is looked for beyond the measured node counts
FIT_SEARCH = tuple(2 ** i for i in range(13))  # 1 to 4096 nodes
PREDICT_AT = (8, 16, 64)
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*$", re.I)
ASSUMPTION = ("sharded state / shard ranks + the replicated state; peak = that + the rest measured at the baseline "
              "(activations, gathered parameters, buffers, runtime), an upper bound in strong scaling")


def size_text(value: float | None) -> str:
    """Bytes as people read them: 3 significant digits in GB, or MB below one GB (powers of 10, as --device-memory's
    GB)."""
    if value is None:
        return "-"
    return f"{value / 1e9:.3g} GB" if value >= 1e9 else f"{value / 1e6:.3g} MB"


def parse_size(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', '1T', '4096' (bytes) as bytes; raises ValueError otherwise."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size; give e.g. 80GB, 80GiB, 512MB or a number of bytes")
    number, unit, binary = float(m[1]), m[2].upper(), bool(m[3])
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


@dataclass
class MemoryPrediction:
    nodes: int
    shard_ranks: int
    state_bytes: int  # exact, from the baseline's count
    peak_bytes: float | None = None  # None without an interval (see MemoryForecast.missing)
    low: float | None = None
    high: float | None = None
    measured_state: float | None = None  # where measured: the mean over repeats
    measured_peak: float | None = None
    measured_parts: tuple[float, float, float] | None = None  # parameters, gradients, optimizer state

    @property
    def error(self) -> float | None:
        """predicted peak / measured peak - 1, the validation at a measured node count."""
        if self.peak_bytes is None or not self.measured_peak:
            return None
        return self.peak_bytes / self.measured_peak - 1


@dataclass
class MemoryForecast:
    group: str
    parallel: str
    device_bytes: int | None
    device_source: str  # "--device-memory" or the measured device's, in words
    predictions: list[MemoryPrediction] = field(default_factory=list)
    fits_state_at: int | None = None
    fits_peak_at: int | None = None
    fits: str = ""  # the answer in words
    missing: str = ""
    peak_kind: str = ""


def _shard(parallel: str, shard_base: int, nodes: int, base_nodes: int) -> int:
    return max(1, shard_base * nodes // base_nodes) if parallel == "fsdp" else shard_base


def forecast_memory(label: str, parallel: str, members: list[Run], device_bytes: int | None) -> MemoryForecast:
    """From a group's runs (sorted by node count): measured memory per node count, predictions from the baseline,
    and where it fits `device_bytes` (None: the measured device's, the smallest any run had)."""
    held = [r for r in members if r.memory is not None]
    source = "--device-memory"
    if device_bytes is None:
        known = [r.memory.device_bytes for r in held if r.memory.device_bytes]
        device_bytes = min(known) if known else None
        source = ("the measured device's: " + ("its GPU's memory" if held and held[0].device_type == "cuda" else
                                              "the host's memory over the ranks on it")) if known else "unknown"
    forecast = MemoryForecast(label, parallel, device_bytes, source)
    if not held:
        forecast.missing = "no memory in these records (records written since memory was recorded have it)"
        return forecast
    base_nodes = min((r.nodes for r in held if r.world_size > 1), default=held[0].nodes)
    base = [r.memory for r in held if r.nodes == base_nodes]
    forecast.peak_kind = base[0].peak_kind
    shard_base = base[0].shard_ranks
    measured = {}
    for r in held:
        measured.setdefault(r.nodes, []).append(r.memory)
    rests = [m.peak_bytes - m.state_bytes for m in base if m.peak_bytes is not None]
    if len(rests) < 2:
        forecast.missing = (f"needs two runs at the baseline ({base_nodes} node(s)) with a peak for the peak's "
                            "interval")

    def state_at(n: int) -> int:
        m = base[0]
        return round(m.sharded_bytes * shard_base / _shard(parallel, shard_base, n, base_nodes)) + \
            m.state_bytes - m.sharded_bytes

    for n in sorted(set(measured) | set(PREDICT_AT)):
        p = MemoryPrediction(n, _shard(parallel, shard_base, n, base_nodes), state_at(n))
        if n in measured:
            p.measured_state = float(np.mean([m.state_bytes for m in measured[n]]))
            p.measured_parts = tuple(float(np.mean([getattr(m, f"{part}_bytes") for m in measured[n]]))
                                     for part in ("parameter", "gradient", "optimizer"))
            peaks = [m.peak_bytes for m in measured[n] if m.peak_bytes is not None]
            p.measured_peak = float(np.mean(peaks)) if peaks else None
        if len(rests) >= 2:
            each = [p.state_bytes + rest for rest in rests]
            mean = float(np.mean(each))
            half = t975(len(each) - 1) * float(np.std(each, ddof=1)) / math.sqrt(len(each))
            p.peak_bytes, p.low, p.high = mean, max(mean - half, 0.0), mean + half
        forecast.predictions.append(p)
    _fits(forecast, state_at, rests)
    return forecast


def _fits(forecast: MemoryForecast, state_at, rests: list[float]) -> None:
    """The smallest node count (1, 2, 4, ... 4096) at which the state, and the peak's upper bound, fit the
    device."""
    device = forecast.device_bytes
    if device is None:
        forecast.fits = "no device memory known: give --device-memory (e.g. 80GB)"
        return
    counts = list(FIT_SEARCH)
    forecast.fits_state_at = next((n for n in counts if state_at(n) <= device), None)
    high = None
    if len(rests) >= 2:
        high = float(np.mean(rests)) + t975(len(rests) - 1) * float(np.std(rests, ddof=1)) / math.sqrt(len(rests))
        forecast.fits_peak_at = next((n for n in counts if state_at(n) + high <= device), None)
    size = f"{size_text(device)} ({forecast.device_source})"
    state = (f"The training state fits {size} from {forecast.fits_state_at} node(s)" if forecast.fits_state_at
             else f"The training state does not fit {size} at any node count up to {counts[-1]}" +
             (" (DDP holds all of it on every rank: try parallel=fsdp)" if forecast.parallel == "ddp" else ""))
    if high is None:
        peak = "; the peak's fit needs two runs at the baseline"
    elif forecast.fits_peak_at:
        peak = f"; with the rest measured at the baseline, the whole run from {forecast.fits_peak_at} node(s)"
    else:
        peak = f"; with the rest measured at the baseline, the whole run at none up to {counts[-1]}"
    forecast.fits = state + peak
