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
  full batch for, which the ranks agree on each step (one all-reduce of a flag on a gloo group: no GPU wait). The
  samples past it in the other ranks' shares are not trained on that epoch, as drop_last drops a short batch.
- **Memory.** Nothing here grows with the data: no index of the samples, only the loader's position.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import LoaderConfig
from pipeline.job.context import Job
from pipeline.targets import first_of

log = logging.getLogger(__name__)
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
    """The ranks agree whether every one still has a batch: a MIN all-reduce of one flag on a gloo group, on the
    CPU (an NCCL one would make every step wait for the GPU), started without waiting (`start`) so that it runs
    while a step computes."""

    def __init__(self, world_size: int):
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None

    def start(self, have: bool) -> Callable[[], bool]:
        """The agreement under way; calling the result waits for it."""
        if self.group is None:
            return lambda: have
        flag = torch.tensor([1 if have else 0], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group, async_op=True)

        def agreed() -> bool:
            work.wait()
            return bool(flag.item())
        return agreed

    def all_have(self, have: bool) -> bool:
        return self.start(have)()


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
        self.steps_per_epoch: int | None = None
        if samples is not None:
            self.steps_per_epoch = samples // (run.per_rank_batch * job.world_size)
            if self.steps_per_epoch == 0:
                raise ValueError(f"loader.epoch_samples={samples} is fewer than one global batch of "
                                 f"{run.per_rank_batch * job.world_size} samples; raise it, or lower the batch")
        planned = self.steps_per_epoch * t.epochs if self.steps_per_epoch else t.max_steps
        self.total_steps = min(planned, t.max_steps) if t.max_steps else planned
        self.agreement = agreement if self.steps_per_epoch is None else None
        self.position: dict | None = None  # the loader's state after the last step taken (None: none taken yet)

    def state(self) -> dict:
        """This rank's position after the steps taken (the loader itself is a step ahead: `steps`)."""
        return {"epoch": self.epoch, "into_epoch": self.into_epoch, "steps_per_epoch": self.steps_per_epoch,
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
        self.epoch, self.into_epoch = mine["epoch"], mine["into_epoch"]
        if self.steps_per_epoch is None:
            self.steps_per_epoch = mine["steps_per_epoch"]  # the first epoch's end, found before the checkpoint
        self.loader.load_state_dict(mine["loader"])

    def steps(self, start: int, batches: Any) -> Iterator[tuple[int, int, list]]:
        """(step, epoch, micro-batches) for every step from `start` to the last, on the device. Each step's
        batches are read, and the ranks' agreement that all have them started, while the step before computes;
        the position a checkpoint keeps is the loader's after each step's batches, not after the next's."""
        step, fixed = start, self.agreement is None
        while step < self.total_steps and self.epoch < self.epochs:
            if fixed and self.into_epoch == self.steps_per_epoch:  # resumed at an epoch's last step
                self.epoch, self.into_epoch = self.epoch + 1, 0
                continue
            source = self.loader.epoch(self.epoch)
            ahead = self._read(source)
            while True:
                micro, position, agreed = ahead
                if fixed and len(micro) < self.accum:
                    raise ValueError(
                        f"rank {self.job.rank}: its share of the stream ended {self.into_epoch} steps into epoch "
                        f"{self.epoch}, before loader.epoch_samples={self.job.run.loader.epoch_samples} "
                        f"({self.steps_per_epoch} steps); lower it, or leave it null to end each epoch where the "
                        "stream ends")
                if not fixed and not agreed():
                    if self.into_epoch == 0:
                        raise ValueError(f"rank {self.job.rank}: a rank's share of the stream holds no full step "
                                         f"of {self.accum} batch(es) of {self.job.run.micro_batch}: use fewer "
                                         "ranks or DataLoader workers, a smaller batch, or more data")
                    if self.steps_per_epoch is None:
                        self.steps_per_epoch = self.into_epoch  # the record's: the first epoch's length
                    break
                self.into_epoch, self.position = self.into_epoch + 1, position
                last = step + 1 == self.total_steps or (fixed and self.into_epoch == self.steps_per_epoch)
                ahead = None if last else self._read(source)
                yield step, self.epoch, [batches.to_device(b) for b in micro]
                step += 1
                if last:
                    break
            if step < self.total_steps:
                self.epoch, self.into_epoch = self.epoch + 1, 0

    def _read(self, source: Iterator[Any]) -> tuple[list, dict, Callable[[], bool] | None]:
        """The next step's micro-batches (fewer at the share's end), the loader's position after them, and the
        ranks' agreement that all have a full step (none with loader.epoch_samples: the steps are counted)."""
        micro = list(itertools.islice(source, self.accum))
        agreed = self.agreement.start(len(micro) == self.accum) if self.agreement is not None else None
        return micro, self.loader.state_dict(), agreed
