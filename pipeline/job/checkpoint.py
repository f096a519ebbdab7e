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

A sharded run (parallel=fsdp|hsdp) checkpoints through torch.distributed.checkpoint (DCP) instead: every rank
writes its own shards into a temporary folder, rank 0 adds the run's stamp, step, schedule and timings
(`extra.pt`) and then `checksums.json` (every file's SHA-256 and size) and renames the folder into place
(checkpoint.dcp, the one before kept as checkpoint.prev.dcp). A folder whose files do not match its checksums is
passed over as a broken file is. DCP reshards on load, so a sharded checkpoint loads into any world size and any
parallel mode (`trainer.resume_from`), a plain model too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import config_hash
from pipeline.rundir import (CHECKPOINT_NAME, CHECKSUMS_NAME, PREVIOUS_CHECKPOINT_NAME,
                             PREVIOUS_SHARDED_CHECKPOINT_NAME, SHARDED_CHECKPOINT_NAME, write_atomic, write_json)

log = logging.getLogger(__name__)
# a checkpoint is torch.save's bytes, then this mark and their SHA-256 (torch.load reads past what follows its zip)
CHECKSUM_MARK = b"\npipeline-sha256:"
TRAILER_BYTES = len(CHECKSUM_MARK) + hashlib.sha256().digest_size
EXTRA_NAME = "extra.pt"  # in a DCP folder: the stamp, step, schedule and timings, written by rank 0


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify_folder(folder: Path) -> None:
    """Raises CorruptCheckpoint unless every file a DCP folder's checksums list is there, of its size and SHA-256."""
    try:
        listed = json.loads((folder / CHECKSUMS_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CorruptCheckpoint(f"its {CHECKSUMS_NAME} cannot be read ({type(e).__name__}: {e})") from None
    for name, want in listed.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != want["bytes"]:
            raise CorruptCheckpoint(f"{name} is missing or not of the size it was written with (truncated?)")
        if file_sha256(path) != want["sha256"]:
            raise CorruptCheckpoint(f"{name} does not match the SHA-256 it was written with (corrupt)")


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class Restored(NamedTuple):
    step: int  # 0: nothing restored
    segments: list  # this run's earlier stretches (pipeline.job.checkpoint.segment)
    streams: list[dict] | None  # every rank's position in a stream, by rank


class Checkpoints:
    """POINT_DIR/checkpoint.pt and the one before it (DDP), or POINT_DIR/checkpoint.dcp and the one before it
    (sharded runs), for the run `run_id` with `config`."""

    def __init__(self, point_dir: Path, run_id: str, config: dict):
        point_dir = Path(point_dir)
        self.sharded = config.get("parallel", {}).get("kind", "ddp") != "ddp"
        names = (SHARDED_CHECKPOINT_NAME, PREVIOUS_SHARDED_CHECKPOINT_NAME) if self.sharded else \
            (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME)
        self.path, self.previous = point_dir / names[0], point_dir / names[1]
        self.stamp = {"run_id": run_id, "config_sha256": config_hash(config)}
        resume_from = config.get("trainer", {}).get("resume_from")
        self.resume_from = Path(resume_from) if resume_from else None
        self.loaded: Path | None = None  # the file (or DCP folder) `load` resumed from
        self.unread = "rank 0 could not read it: its log says why"  # why the last candidate could not be used

    def save(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int,
             segments: list[dict], streams: list[dict] | None = None) -> None:
        """DDP: rank 0's file; sharded: every rank's shards, together (a collective). `streams`: every rank's
        position in a stream (pipeline.job.stream), on rank 0."""
        extra = {**self.stamp, "step": step, "segments": segments, "streams": streams,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None}
        if self.sharded:
            return self._save_sharded(model, optimizer, extra)
        state = {**extra, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
        write_atomic(self.path, lambda f: _save_with_checksum(state, f), previous=self.previous)

    def _save_sharded(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> None:
        """DCP into a temporary folder; rank 0 then adds extra.pt and checksums.json and renames it into place."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        rank = dist.get_rank()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted save's
            tmp.mkdir()
        dist.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
        dist.barrier()
        if rank == 0:
            save(extra, tmp / EXTRA_NAME)
            files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
            write_json(tmp / CHECKSUMS_NAME, {"files": files, **self.stamp, "step": extra["step"]})
            if self.path.exists():
                shutil.rmtree(self.previous, ignore_errors=True)
                os.replace(self.path, self.previous)
            os.replace(tmp, self.path)
            _fsync_folder(self.path.parent)
        dist.barrier()

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> Restored:
        """Load the newest usable checkpoint of this run, else trainer.resume_from's, into the model, optimizer and
        schedule; returns its step, the earlier segments' timings (another run's are not this run's) and the ranks'
        positions in a stream."""
        checkpoint, own = self.load(), True
        if checkpoint is None and self.resume_from is not None:
            checkpoint, own = self.load([self.resume_from], stamped=False), False
            if checkpoint is None:  # asked for by name: no silent start from step 0
                raise ResumeError(f"trainer.resume_from={self.resume_from} could not be read ({self.unread})")
        if checkpoint is None:
            return Restored(0, [], None)
        if self.loaded.is_dir():
            _load_sharded(self.loaded, model, optimizer, None if own else self.resume_from)
        else:
            if not own:
                same_parameters(self.resume_from, {k: tuple(v.shape) for k, v in checkpoint["model"].items()},
                                model.state_dict())
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint.get("scheduler") is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        return Restored(checkpoint["step"], checkpoint["segments"] if own else [], checkpoint.get("streams"))

    def load(self, candidates: list[Path] | None = None, stamped: bool = True) -> dict | None:
        """The newest usable checkpoint of this run (or of `candidates`, whoever's when not `stamped`), or None.
        Rank 0 chooses and every rank loads its choice, so all resume from the same step (a file that reads on one
        rank and not on another cannot split them). A DCP folder's is its extra.pt (the tensors load into the model
        in restore)."""
        chooser = not dist.is_initialized() or dist.get_rank() == 0
        path, checkpoint = self._choose(candidates or [self.path, self.previous], stamped) if chooser else (None, None)
        choice = [path]
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        self.loaded = Path(choice[0]) if choice[0] is not None else None
        if chooser or choice[0] is None:
            return checkpoint  # rank 0 read it while choosing
        return self._read(self.loaded, verified=True)

    def _choose(self, candidates: list[Path], stamped: bool) -> tuple[str | None, dict | None]:
        """The newest checkpoint that reads and is this run's: its path and its contents."""
        tried = []
        for path in candidates:
            if not path.exists():
                continue
            try:
                checkpoint = self._read(path)
            except Exception as e:  # no checksum, a wrong one, or torch.load's several kinds
                self.unread = f"{type(e).__name__}: {str(e)[:200]}"
                log.warning("checkpoint %s cannot be read (%s); trying the one before it", path, self.unread)
                tried.append(path.name)
                continue
            mine = {k: checkpoint.get(k) for k in self.stamp}
            if stamped and mine != self.stamp:
                log.warning("checkpoint %s belongs to another run (%s), not this one (%s); not used", path, mine,
                            self.stamp)
                tried.append(path.name)
                continue
            return str(path), checkpoint
        if tried:
            log.warning("no usable checkpoint (%s): this run starts over from step 0", ", ".join(tried))
        return None, None

    @staticmethod
    def _read(path: Path, verified: bool = False) -> dict:
        """A checkpoint file's contents, or a DCP folder's extra.pt, once its checksums are checked (rank 0 has
        checked them for the others: `verified`)."""
        if path.is_dir():
            if not verified:
                verify_folder(path)
            return torch.load(path / EXTRA_NAME, map_location="cpu", weights_only=True)
        if not verified:
            verify(path)
        return torch.load(path, map_location="cpu", weights_only=True)


class ResumeError(RuntimeError):
    """trainer.resume_from cannot be resumed from: unreadable, or of another model."""


def same_parameters(path: Path, theirs: dict[str, tuple], mine: dict[str, Any]) -> None:
    """A checkpoint's parameters (`theirs`: name -> shape) are this model's, by name and shape (a sharded one's
    by its global shape); else ResumeError, naming the first differences, before torch's load says it in a page."""
    mine = {k: tuple(v.shape) for k, v in mine.items() if hasattr(v, "shape")}
    missing, extra = [k for k in mine if k not in theirs], [k for k in theirs if k not in mine]
    shapes = [f"{k}: {'x'.join(map(str, theirs[k]))} there, {'x'.join(map(str, mine[k]))} here" for k in mine
              if k in theirs and theirs[k] != mine[k]]
    said = [f"{len(missing)} of this model's parameter(s) not in it ({', '.join(missing[:3])})" if missing else "",
            f"{len(extra)} the model here lacks ({', '.join(extra[:3])})" if extra else "",
            f"{len(shapes)} of another shape ({'; '.join(shapes[:3])})" if shapes else ""]
    if any(said):
        raise ResumeError(f"trainer.resume_from={path} is a checkpoint of another model: "
                          f"{'; '.join(s for s in said if s)}; resume from a checkpoint of this model")


def _load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  resume_from: Path | None) -> None:
    """A DCP checkpoint's model and optimizer state into this run's (sharded or not, any world size: DCP reshards
    what it reads to the tensors it is given); another run's (`resume_from`) once its parameters are this
    model's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    if resume_from is not None:
        saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        same_parameters(resume_from, {k[len("model."):]: tuple(m.size) for k, m in saved.items()
                                      if k.startswith("model.") and hasattr(m, "size")}, model_state)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def segment(start_step: int, phases: np.ndarray, evaluations: list[dict]) -> dict:
    """Rank 0's step timings of one uninterrupted stretch of a run (seconds: step, data, compute, comm), and the
    evaluations made during it (trainer.eval_every; checkpoints from before them have none)."""
    return {"start_step": start_step, "phases": torch.from_numpy(np.asarray(phases, dtype=np.float64)),
            "evaluations": evaluations}
