"""Training checkpoints: what a preempted or timed-out job needs to resume exactly where it stopped.

Rank 0 writes one at a step boundary (on the preemption / time-limit signal, and every
`trainer.checkpoint_every` steps); on restart every rank loads it. The data order is a function of
(seed, epoch) and dropout is reseeded from (seed, rank, step) every step, so the step count is the sampler's
position and no per-rank RNG state needs saving: a resumed run takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.rundir import write_atomic


def save(obj, path: Path) -> None:
    """torch.save through the run folder's atomic writer: a kill mid-write leaves the previous file whole."""
    write_atomic(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int,
                    segments: list[dict]) -> None:
    save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "segments": segments,
          "scheduler": scheduler.state_dict() if scheduler is not None else None}, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def segment(start_step: int, phases: np.ndarray) -> dict:
    """Rank 0's step timings of one uninterrupted stretch of a run (seconds: step, data, compute, comm)."""
    return {"start_step": start_step, "phases": torch.from_numpy(np.asarray(phases, dtype=np.float64))}
