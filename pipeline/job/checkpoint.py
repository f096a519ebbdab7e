"""Training checkpoints: what a preempted or timed-out job needs to resume exactly where it stopped.

Rank 0 writes one at a step boundary (on the preemption / time-limit signal, and every
`trainer.checkpoint_every` steps); on restart every rank loads it. The data order is a function of
(seed, epoch) and dropout is reseeded from (seed, rank, step) every step, so the step count is the sampler's
position and no per-rank RNG state needs saving: a resumed run takes exactly the steps an uninterrupted one would.

A checkpoint is written whole (fsynced before it is renamed into place), the one before it is kept
(checkpoint.prev.pt), and each is stamped with its run's id and config hash and ends with the SHA-256 of what it
holds, checked before torch.load reads it: torch.load takes a file with bytes overwritten inside a tensor without
complaint, and the run resumes on garbage. A checkpoint that fails the check or cannot be read (truncated,
corrupt) is reported and the one before it used, or none (the run starts over, saying so); a checkpoint of
another run is refused. So a requeued job never loops on a broken file, and never resumes another run's weights.
`Checkpoints.loaded` names the file the run resumed from.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import config_hash
from pipeline.rundir import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, write_atomic

log = logging.getLogger(__name__)
# a checkpoint is torch.save's bytes, then this mark and their SHA-256 (torch.load reads past what follows its zip)
CHECKSUM_MARK = b"\npipeline-sha256:"
TRAILER_BYTES = len(CHECKSUM_MARK) + hashlib.sha256().digest_size


class CorruptCheckpoint(ValueError):
    """A checkpoint whose bytes are not what was written: no checksum (truncated), or not the one it carries."""


def save(obj, path: Path) -> None:
    """torch.save through the run folder's atomic writer: a kill mid-write leaves the previous file whole."""
    write_atomic(path, lambda f: torch.save(obj, f))


class _Hashing:
    """A file that torch.save writes through, hashing what it writes."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _save_with_checksum(obj, f: BinaryIO) -> None:
    hashing = _Hashing(f)
    torch.save(obj, hashing)
    f.write(CHECKSUM_MARK + hashing.sha256.digest())


def verify(path: Path) -> None:
    """Raises CorruptCheckpoint unless the file's content matches the SHA-256 at its end."""
    size = path.stat().st_size
    content = hashlib.sha256()
    with open(path, "rb") as f:
        left = size - TRAILER_BYTES
        while left > 0 and (chunk := f.read(min(left, 1 << 24))):
            content.update(chunk)
            left -= len(chunk)
        trailer = f.read()
    if left > 0 or not trailer.startswith(CHECKSUM_MARK):
        raise CorruptCheckpoint(f"it carries no checksum at its end ({size} bytes: truncated?)")
    if trailer[len(CHECKSUM_MARK):] != content.digest():
        raise CorruptCheckpoint("its content does not match the SHA-256 it was written with (corrupt)")


class Checkpoints:
    """POINT_DIR/checkpoint.pt and the one before it, for the run `run_id` with `config`."""

    def __init__(self, point_dir: Path, run_id: str, config: dict):
        self.path, self.previous = Path(point_dir) / CHECKPOINT_NAME, Path(point_dir) / PREVIOUS_CHECKPOINT_NAME
        self.stamp = {"run_id": run_id, "config_sha256": config_hash(config)}
        self.loaded: Path | None = None  # the file `load` resumed from

    def save(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int,
             segments: list[dict]) -> None:
        state = {**self.stamp, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "segments": segments, "scheduler": scheduler.state_dict() if scheduler is not None else None}
        write_atomic(self.path, lambda f: _save_with_checksum(state, f), previous=self.previous)

    def load(self) -> dict | None:
        """The newest usable checkpoint of this run, or None. Rank 0 chooses and every rank loads its choice, so
        all resume from the same step (a file that reads on one rank and not on another cannot split them)."""
        chooser = not dist.is_initialized() or dist.get_rank() == 0
        path, checkpoint = self._choose() if chooser else (None, None)
        choice = [path]
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        self.loaded = Path(choice[0]) if choice[0] is not None else None
        if chooser or choice[0] is None:
            return checkpoint  # rank 0 read it while choosing
        return self._read(self.loaded)

    def _choose(self) -> tuple[str | None, dict | None]:
        """The newest checkpoint that reads and is this run's: its path and its contents."""
        tried = []
        for path in (self.path, self.previous):
            if not path.is_file():
                continue
            try:
                checkpoint = self._read(path)
            except Exception as e:  # no checksum, a wrong one, or torch.load's several kinds
                log.warning("checkpoint %s cannot be read (%s: %s); trying the one before it", path,
                            type(e).__name__, str(e)[:200])
                tried.append(path.name)
                continue
            mine = {k: checkpoint.get(k) for k in self.stamp}
            if mine != self.stamp:
                log.warning("checkpoint %s belongs to another run (%s), not this one (%s); not used", path, mine,
                            self.stamp)
                tried.append(path.name)
                continue
            return str(path), checkpoint
        if tried:
            log.warning("no usable checkpoint (%s): this run starts over from step 0", ", ".join(tried))
        return None, None

    @staticmethod
    def _read(path: Path) -> dict:
        verify(path)
        return torch.load(path, map_location="cpu", weights_only=True)


def segment(start_step: int, phases: np.ndarray) -> dict:
    """Rank 0's step timings of one uninterrupted stretch of a run (seconds: step, data, compute, comm)."""
    return {"start_step": start_step, "phases": torch.from_numpy(np.asarray(phases, dtype=np.float64))}
