"""A stream: a dataset read in order, without an index (a torch IterableDataset: a user's own, or Hugging Face's
`datasets` streaming local files: json, csv, parquet, arrow, or tar shards in WebDataset's layout), trained on
every rank from its own share, with an exact resume.

- **Shares.** Each rank reads a disjoint share and each DataLoader worker a disjoint share of its rank's:
  Hugging Face's streams by `datasets.distributed.split_dataset_by_node` (whole shards per rank when they divide
  evenly) and, within a rank, by their own split of the shards among workers; a stream whose constructor takes
  `rank` and `world_size` is given them and shares itself out (splitting among its workers with
  torch.utils.data.get_worker_info, as torch asks of every IterableDataset); any other stream is read whole by
  every (rank, worker) slot, each keeping every slots-th item (`Strided`).
- **Position.** torchdata's StatefulDataLoader keeps each worker's position (the dataset's own `state_dict()`
  when it has one: Hugging Face's do, `Strided` does; else the count of items it yielded, skipped again on
  resume) and which worker's batch comes next. Every rank's position goes into the checkpoint at a step boundary,
  so a resumed run takes exactly the batches an uninterrupted one takes.
- **Epochs.** loader.epoch_samples fixes an epoch's steps; null: an epoch ends at the first step some rank lacks a
  full batch for, which the ranks agree on once every LOOKAHEAD steps, read ahead (one all-reduce of a count on a
  gloo group: no GPU wait). The samples past it in the other ranks' shares are not trained on that epoch, as
  drop_last drops a short batch.
- **Memory.** Nothing here grows with the data: no index of the samples, only the loader's position and the
  LOOKAHEAD steps' batches read ahead.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import LoaderConfig
from pipeline.job.context import Job
from pipeline.targets import first_of

log = logging.getLogger(__name__)
# steps read ahead of training, on which the ranks agree at once (loader.epoch_samples null): one all-reduce per
# LOOKAHEAD steps, for LOOKAHEAD steps' batches held in the rank's memory
LOOKAHEAD = 4
# a worker sends its stream's state with every this many batches (torchdata's default: every one); a position between
# them is the last state plus the batches since, which a resume reads again and skips. Every batch cost 9% of the
# seed MLP's throughput on 2 ranks (benchmarks/stream_loader.py)
SNAPSHOT_EVERY = 16
# torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates; nothing for a user to act on
warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)


def is_hugging_face_stream(dataset: Any) -> bool:
    return type(dataset).__module__.startswith("datasets.") and hasattr(dataset, "n_shards")


def first_items(dataset: Any, n: int, stream: bool) -> list:
    """The first `n` items; a stream's read from a copy, as a DataLoader worker reads its own, so it does not move."""
    return first_of(dataset, n) if stream else [dataset[i] for i in range(min(n, len(dataset)))]


class Strided(IterableDataset):
    """A stream that does not share itself out, shared by position: every (rank, worker) slot reads all of it and
    keeps the items whose position modulo the slots is its own. Its state: the items this slot has read, and the
    inner stream's own state where it has one (else the read items are skipped again on resume)."""

    def __init__(self, inner: Any, rank: int, world_size: int):
        self.inner, self.rank, self.world_size = inner, rank, world_size
        self.stateful = callable(getattr(inner, "state_dict", None)) and callable(getattr(inner, "load_state_dict",
                                                                                          None))
        self.read, self.resume = 0, None

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        resume, self.resume = self.resume, None
        self.read = resume["read"] if resume else 0
        if resume and self.stateful:
            self.inner.load_state_dict(resume["inner"])
        items = iter(self.inner)
        if resume and not self.stateful:
            for _ in itertools.islice(items, self.read):
                pass
        for item in items:
            position, self.read = self.read, self.read + 1
            if position % slots == slot:
                yield item

    def state_dict(self) -> dict:
        return {"read": self.read, "inner": self.inner.state_dict() if self.stateful else None}

    def load_state_dict(self, state: dict) -> None:
        self.resume = state

    def set_epoch(self, epoch: int) -> None:
        set_epoch(self.inner, epoch)


def set_epoch(dataset: Any, epoch: int) -> None:
    """A stream that reshuffles by epoch (Hugging Face's `shuffle`, a user's own `set_epoch`) is told the epoch."""
    if callable(getattr(dataset, "set_epoch", None)):
        dataset.set_epoch(epoch)


def rank_share(dataset: Any, rank: int, world_size: int, shares_itself: bool) -> Any:
    """This rank's share of the stream (see the module's docstring)."""
    if shares_itself:
        return dataset
    if is_hugging_face_stream(dataset):
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(dataset, rank=rank, world_size=world_size) if world_size > 1 else dataset
    return Strided(dataset, rank, world_size)


class StreamLoader:
    """torchdata's StatefulDataLoader over this rank's share: full batches only (a worker's short last batch is
    dropped), one pass per epoch, its position kept to the batch."""

    def __init__(self, share: Any, size: int, loader: LoaderConfig, pinned: bool, collate_fn, worker_seed: int):
        from torchdata.stateful_dataloader import StatefulDataLoader

        extra = {"prefetch_factor": loader.prefetch_factor} if loader.prefetch_factor is not None else {}
        # the workers are forked once, before the ranks' agreements start on their gloo threads: forked again each
        # epoch, a child was seen to hang in CPython's after-fork clean-up (a lock held by another thread)
        self.share = share
        self.loader = StatefulDataLoader(share, batch_size=size, drop_last=True, num_workers=loader.num_workers,
                                         pin_memory=pinned, collate_fn=collate_fn,
                                         persistent_workers=loader.num_workers > 0,
                                         snapshot_every_n_steps=SNAPSHOT_EVERY,
                                         generator=torch.Generator().manual_seed(worker_seed), **extra)

    def epoch(self, epoch: int) -> Iterator[Any]:
        """The epoch's batches, from where the loader stands (a resumed position, or the start)."""
        set_epoch(self.share, epoch)
        return iter(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def held_out_loader(share: Any, size: int, pinned: bool, collate_fn) -> DataLoader:
    """A plain DataLoader over a held-out stream's share, read once per evaluation from its start, in the rank's own
    process: workers forked mid-training would meet the ranks' agreements' threads (see StreamLoader)."""
    return DataLoader(share, batch_size=size, num_workers=0, pin_memory=pinned, collate_fn=collate_fn)


class Agreement:
    """The ranks agree on the least of a count they each have (full steps, batches): a MIN all-reduce of one integer
    on a gloo group, on the CPU (an NCCL one would make the step wait for the GPU)."""

    def __init__(self, world_size: int):
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None

    def least(self, count: int) -> int:
        if self.group is None:
            return count
        value = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return int(value.item())

    def all_have(self, have: bool) -> bool:
        return bool(self.least(1 if have else 0))


class StreamOrder:
    """Which batches each step takes from a stream: `accum` micro-batches of this rank's share, epoch after epoch
    (loader.epoch_samples long, or to the first rank's end of its share), until trainer.max_steps or
    trainer.epochs. Its state (the epoch, the steps into it, the loader's position) is every rank's own; the
    checkpoint keeps all of them (`state`, `restore`)."""

    def __init__(self, job: Job, loader: StreamLoader, agreement: Agreement):
        run, t = job.run, job.run.trainer
        self.job, self.loader, self.accum = job, loader, run.accum_steps
        self.epochs, self.epoch, self.into_epoch = t.epochs, 0, 0
        samples = run.loader.epoch_samples
        self.counted: int | None = None  # an epoch's steps, from loader.epoch_samples
        self.found: int | None = None  # else the first epoch's, once its end is found
        if samples is not None:
            self.counted = samples // (run.per_rank_batch * job.world_size)
            if self.counted == 0:
                raise ValueError(f"loader.epoch_samples={samples} is fewer than one global batch of "
                                 f"{run.per_rank_batch * job.world_size} samples; raise it, or lower the batch")
        planned = self.counted * t.epochs if self.counted else t.max_steps
        self.total_steps = min(planned, t.max_steps) if t.max_steps else planned
        self.agreement = agreement if self.counted is None else None
        self.position: dict | None = None  # the loader's state after the last step taken (None: none taken yet)

    @property
    def steps_per_epoch(self) -> int | None:
        """The record's: counted, or the first epoch's once found (None until then)."""
        return self.counted or self.found

    def state(self) -> dict:
        """This rank's position after the steps taken (the loader itself may be steps ahead: `steps`)."""
        return {"epoch": self.epoch, "into_epoch": self.into_epoch, "found": self.found,
                "loader": self.position if self.position is not None else self.loader.state_dict()}

    def restore(self, states: list[dict] | None, step: int) -> None:
        """Resume at `step` from the checkpoint's positions (one per rank); none (a checkpoint without them, or of
        another number of ranks: trainer.resume_from) starts the stream over, which the log says."""
        if not step:
            return
        if states is None or len(states) != self.job.world_size:
            log.warning("rank %d: the checkpoint holds no stream position for %d ranks (%s): the stream starts over "
                        "from its beginning at step %d", self.job.rank, self.job.world_size,
                        "none" if states is None else f"it has {len(states)}", step)
            return
        mine = states[self.job.rank]
        self.epoch, self.into_epoch, self.found = mine["epoch"], mine["into_epoch"], mine["found"]
        self.loader.load_state_dict(mine["loader"])

    def steps(self, start: int, batches: Any) -> Iterator[tuple[int, int, list]]:
        """(step, epoch, micro-batches) for every step from `start` to the last, on the device. The steps are read
        LOOKAHEAD at a time, and the ranks agree once on how many of them all have in full (loader.epoch_samples
        null): fewer ends the epoch after them, at the same step whatever the window's alignment, so a resumed run
        ends its epochs where an uninterrupted one does. The position a checkpoint keeps is the loader's after each
        step's own batches."""
        step = start
        while step < self.total_steps and self.epoch < self.epochs:
            if self.into_epoch == self.counted:  # resumed at a counted epoch's last step
                self.epoch, self.into_epoch = self.epoch + 1, 0
                continue
            source, ends = self.loader.epoch(self.epoch), False
            while not ends and step < self.total_steps and self.into_epoch != self.counted:
                window, ends = self._window(source, step)
                for micro, position in window:
                    self.into_epoch, self.position = self.into_epoch + 1, position
                    yield step, self.epoch, [batches.to_device(b) for b in micro]
                    step += 1
            if ends and self.found is None:
                self.found = self.into_epoch
            if step < self.total_steps or ends:
                self.epoch, self.into_epoch = self.epoch + 1, 0

    def _window(self, source: Iterator[Any], step: int) -> tuple[list[tuple[list, dict]], bool]:
        """The next steps' micro-batches, each with the loader's position after it, as many as every rank has in
        full (at most LOOKAHEAD, none past the run's or a counted epoch's end); and whether the epoch ends after
        them."""
        room = self.total_steps - step
        if self.counted is not None:
            room = min(room, self.counted - self.into_epoch)
        window = []
        for _ in range(min(LOOKAHEAD, room)):
            micro = list(itertools.islice(source, self.accum))
            if len(micro) < self.accum:
                break
            window.append((micro, self.loader.state_dict()))
        if self.agreement is None:
            if len(window) < min(LOOKAHEAD, room):
                raise ValueError(
                    f"rank {self.job.rank}: its share of the stream ended {self.into_epoch + len(window)} steps into "
                    f"epoch {self.epoch}, before loader.epoch_samples={self.job.run.loader.epoch_samples} "
                    f"({self.counted} steps); lower it, or leave it null to end each epoch where the stream "
                    "ends")
            return window, False
        agreed = self.agreement.least(len(window))
        if agreed == 0 and self.into_epoch == 0:
            raise ValueError(f"rank {self.job.rank}: a rank's share of the stream holds no full step of "
                             f"{self.accum} batch(es) of {self.job.run.micro_batch}: use fewer ranks or DataLoader "
                             "workers, a smaller batch, or more data")
        return window[:agreed], agreed < min(LOOKAHEAD, room)
