"""Where a rank's batches come from: a split held in memory and batched by indexing (on the GPU when it fits), or
torch's DataLoader over any map-style dataset (workers, pinned memory, prefetching). Both take their order from
the same DistributedSampler, a function of (seed, epoch), and both can start at any step of an epoch, so a
resumed run takes exactly the batches an uninterrupted one takes, and the two paths take the same batches."""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from pipeline.config import LoaderConfig
from pipeline.job.env import DistEnv
from pipeline.rundir import LoaderInfo

log = logging.getLogger(__name__)
DEVICE_DATA_SHARE = 0.5


def holds_on_device(setting: bool | None, split_bytes: int, free_device_bytes: int) -> bool:
    """trainer.data_on_device; when null (auto), the splits go to the GPU if they take at most half its free
    memory, leaving the rest to the model, activations and the allocator (0 free bytes: the CPU, never)."""
    if setting is not None:
        return setting
    return 0 < split_bytes <= DEVICE_DATA_SHARE * free_device_bytes


def gather_batch(source: torch.Tensor, idx: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
    """Rows `idx` of a split, on `device`. From host memory to a GPU (`pinned`) they are gathered straight into a
    pinned buffer and copied without blocking: indexing a pinned tensor would give pageable memory, whose copy is
    synchronous. The buffer comes from torch's caching host allocator, which reuses it only once the copy that
    read it has finished."""
    if source.device == device:
        return source[idx]
    batch = _batch_buffer(source, len(idx), pinned)
    torch.index_select(source, 0, idx, out=batch)  # into the buffer's strides (channels_last stays)
    return batch.to(device, non_blocking=True)


def _batch_buffer(source: torch.Tensor, rows: int, pinned: bool) -> torch.Tensor:
    """Room for `rows` rows of `source` in its memory format: a cycled pool may have fewer rows than the batch
    (one shaped on source[:rows] would be resized by index_select, which drops channels_last)."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(source.dim())
    layout = channels_last if channels_last and source.is_contiguous(memory_format=channels_last) else \
        torch.contiguous_format
    return torch.empty((rows, *source.shape[1:]), dtype=source.dtype, memory_format=layout, pin_memory=pinned)


def check_datasets(train: Any, test: Any | None, target: str, rank: int) -> None:
    """Before anything is built on them: items are (input, target) pairs, and each dataset's own checks
    (`validate()`, e.g. token values within the vocabulary) pass. Errors name the dataset and the rank."""
    for split, data in (("train", train), ("test", test)):
        if data is None:
            continue
        where = f"rank {rank}: dataset._target_={target} ({split} split)"
        check_pairs(data, where)
        if callable(getattr(data, "validate", None)):
            try:
                data.validate()
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None


def check_pairs(dataset: Any, where: str) -> None:
    """A dataset's items are (input, target) pairs: said at once, naming the dataset (`where`), rather than as an
    unpacking error deep in the loop."""
    if len(dataset) == 0:
        raise ValueError(f"{where}: the dataset is empty")
    item = dataset[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        kind = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
        raise TypeError(f"{where}: item 0 is {kind}, not an (input, target) pair; a dataset's __getitem__ must "
                        "return (input, target)")


class InMemoryBatches:
    """The split as two tensors, on the device when it fits there, else in host memory; a batch is gathered from
    the rows the sampler gives this rank."""

    def __init__(self, dataset: Any, sampler: DistributedSampler, batch: int, device: torch.device, on_device: bool,
                 channels_last: bool):
        x, y = (torch.as_tensor(np.asarray(a)) for a in dataset.arrays())
        if len(x) != len(y):
            raise ValueError(f"dataset.arrays() gave {len(x)} inputs and {len(y)} targets")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.x, self.y = (x.to(device), y.to(device)) if on_device else (x, y)
        self.sampler, self.batch, self.device = sampler, batch, device
        self.pinned = device.type == "cuda" and not on_device

    def epoch(self, epoch: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        # sample i is row i % rows: a dataset may hold a pool smaller than its length (datasets.InMemory)
        order = torch.as_tensor(list(self.sampler), device=self.x.device) % len(self.x)
        for i in range(first, len(order) // self.batch):
            idx = order[i * self.batch:(i + 1) * self.batch]
            yield (gather_batch(self.x, idx, self.device, self.pinned),
                   gather_batch(self.y, idx, self.device, self.pinned))


class EpochOrder(Sampler):
    """A DistributedSampler's order for one epoch, from a given batch on (where a resumed run starts)."""

    def __init__(self, sampler: DistributedSampler, batch: int):
        self.sampler, self.batch, self.skip = sampler, batch, 0

    def start(self, epoch: int, first_batch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = first_batch * self.batch

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


class LoaderBatches:
    """torch's DataLoader over the dataset, in the sampler's order; batches copied to the device (without
    blocking, from pinned memory, when pin_memory is on)."""

    def __init__(self, dataset: Any, sampler: DistributedSampler, batch: int, device: torch.device,
                 loader: LoaderConfig, pin: bool, channels_last: bool, seed: int, rank: int):
        self.order = EpochOrder(sampler, batch)
        extra = {"prefetch_factor": loader.prefetch_factor} if loader.prefetch_factor is not None else {}
        self.loader = DataLoader(dataset, batch_size=batch, sampler=self.order, drop_last=True,
                                 num_workers=loader.num_workers, pin_memory=pin,
                                 persistent_workers=loader.persistent_workers,
                                 # workers' random streams (augmentation) differ by rank, and repeat by seed
                                 generator=torch.Generator().manual_seed(seed * 1000 + rank), **extra)
        self.device, self.pin = device, pin
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)  # a persistent-workers DataLoader keeps its iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def epoch(self, epoch: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.order.start(epoch, first)
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=self.pin, memory_format=self.memory_format),
                   y.to(self.device, non_blocking=self.pin))


def check_workers(loader: LoaderConfig, cpus: int, env: DistEnv) -> None:
    """Warn when the DataLoader's worker processes outnumber the CPUs this rank was given (they then compete with
    each other and with the training thread, and the data phase grows)."""
    if loader.num_workers > cpus:
        log.warning("rank %d: loader.num_workers=%d is more than the %d CPU(s) this rank has (its share of the "
                    "host's cores, or Slurm's --cpus-per-task); the workers will compete for them",
                    env.rank, loader.num_workers, cpus)


def loader_info(kind: str, loader: LoaderConfig, pin: bool) -> LoaderInfo:
    if kind == "memory":
        return LoaderInfo(kind="memory", num_workers=0, pin_memory=pin, persistent_workers=False, prefetch_factor=None)
    return LoaderInfo(kind="dataloader", num_workers=loader.num_workers, pin_memory=pin,
                      persistent_workers=loader.persistent_workers,
                      prefetch_factor=loader.prefetch_factor if loader.prefetch_factor is not None
                      else (2 if loader.num_workers else None))
