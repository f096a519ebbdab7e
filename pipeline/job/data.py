"""Where a rank's batches come from: a split held in memory and batched by indexing (on the GPU when it fits), or
torch's DataLoader over any map-style dataset (workers, pinned memory, prefetching, a collate_fn of the user's).
Both are asked for the batches of given sample indices: training's are the DistributedSampler's order for
(seed, epoch) from the step a run starts at, so a resumed run takes exactly the batches an uninterrupted one takes
and the two paths take the same batches; evaluation's are this rank's share of the held-out split, through the
same code. A batch is a `Batch` (inputs, targets, and a mapping item's other keys), whatever the items are."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from pipeline.config import LoaderConfig
from pipeline.job.env import DistEnv
from pipeline.result import LoaderInfo

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


class Batch(NamedTuple):
    """One batch as the model meets it: its inputs, its targets, and the other keys of a mapping item (an
    attention mask), which the model gets as keywords."""

    inputs: torch.Tensor
    targets: torch.Tensor
    extra: dict


@dataclass(frozen=True)
class ItemFormat:
    """What a dataset's items (and so its collated batches) are: `(input, target)` pairs, or mappings whose input
    and target sit under io.input_key and io.target_key (Hugging Face's datasets and collators give
    `{"input_ids": ..., "labels": ..., "attention_mask": ...}`)."""

    input_key: str
    target_key: str

    def split(self, item: Any) -> Batch:
        if isinstance(item, Mapping):
            keys = (self.input_key, self.target_key)
            return Batch(item[self.input_key], item[self.target_key],
                         {k: v for k, v in item.items() if k not in keys})
        return Batch(item[0], item[1], {})

    def describe(self, item: Any, where: str) -> str:
        """What the items are, in words for the record; a TypeError naming the dataset (`where`) and the io.* keys
        when they are neither pairs nor mappings holding both keys."""
        if isinstance(item, Mapping):
            missing = [k for k in (self.input_key, self.target_key) if k not in item]
            if missing:
                raise TypeError(f"{where}: item 0 is a mapping with keys {list(item)}, without {', '.join(missing)}; "
                                "set io.input_key and io.target_key to the keys that hold the input and the target")
            extra = [k for k in item if k not in (self.input_key, self.target_key)]
            return (f"mappings: {self.input_key} the input, {self.target_key} the targets"
                    + (f", {', '.join(extra)} passed to the model as keywords" if extra else ""))
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return "(input, target) pairs"
        kind = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
        raise TypeError(f"{where}: item 0 is {kind}, not an (input, target) pair or a mapping; a dataset's "
                        "__getitem__ must return (input, target), or a mapping with the keys io.input_key and "
                        "io.target_key")


def check_datasets(train: Any, test: Any | None, target: str, rank: int, items: ItemFormat) -> str:
    """Before anything is built on them: items are pairs or mappings with the input and target keys, and each
    dataset's own checks (`validate()`, e.g. token values within the vocabulary) pass. Errors name the dataset and
    the rank. Returns what the items are, in words."""
    kind = ""
    for split, data in (("train", train), ("test", test)):
        if data is None:
            continue
        where = f"rank {rank}: dataset._target_={target} ({split} split)"
        if len(data) == 0:
            raise ValueError(f"{where}: the dataset is empty")
        kind = kind or items.describe(data[0], where)
        if callable(getattr(data, "validate", None)):
            try:
                data.validate()
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    return kind


def to_device(batch: Batch, device: torch.device, non_blocking: bool, memory_format: torch.memory_format) -> Batch:
    """A collated batch on the device: images in the chosen memory format, the extra keys' tensors alongside."""
    inputs = batch.inputs.to(device, non_blocking=non_blocking,
                             memory_format=memory_format if batch.inputs.dim() == 4 else torch.preserve_format)
    extra = {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
             for k, v in batch.extra.items()}
    return Batch(inputs, batch.targets.to(device, non_blocking=non_blocking), extra)


def prefetched(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """`batches` one ahead, for data that stays in host memory: the next batch's copy to the GPU is issued on a
    side stream while this one trains, and the compute stream waits only for the copy of the batch it takes. Each
    tensor is marked as used by the compute stream, so the caching allocator does not hand its memory to the side
    stream's next copy before the compute that reads it is done."""
    side = torch.cuda.Stream(device)

    def load() -> Batch | None:
        with torch.cuda.stream(side):
            return next(batches, None)

    ahead = load()
    while ahead is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(side)
        for tensor in (ahead.inputs, ahead.targets, *ahead.extra.values()):
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                tensor.record_stream(compute)
        batch, ahead = ahead, load()
        yield batch


def collate(items: list, fmt: ItemFormat, collate_fn: Callable | None) -> Batch:
    """A list of items as one batch, by the user's collate_fn when given (loader.collate_fn), else torch's."""
    return fmt.split((collate_fn or default_collate)(items))


@dataclass(frozen=True)
class BatchSpec:
    """How one rank's batches are made: their size, where they go and in what layout, whether they come through
    pinned host memory (copied without blocking), how items are read and how they are collated."""

    size: int
    device: torch.device
    items: ItemFormat
    channels_last: bool = False
    pinned: bool = False
    collate_fn: Callable | None = None  # None: torch's default_collate

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.preserve_format


class InMemoryBatches:
    """The split as two tensors, on the device when it fits there (`on_device`), else in host memory; a batch is
    gathered from the rows it is asked for."""

    def __init__(self, dataset: Any, spec: BatchSpec, on_device: bool):
        x, y = (torch.as_tensor(np.asarray(a)) for a in dataset.arrays())
        if len(x) != len(y):
            raise ValueError(f"dataset.arrays() gave {len(x)} inputs and {len(y)} targets")
        if spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.x, self.y = (x.to(spec.device), y.to(spec.device)) if on_device else (x, y)
        self.spec = spec

    def batches(self, indices: Sequence[int], drop_last: bool) -> Iterator[Batch]:
        """The samples `indices` in batches (the last one short unless `drop_last`)."""
        # sample i is row i % rows: a dataset may hold a pool smaller than its length (datasets.InMemory)
        order = torch.as_tensor(indices, dtype=torch.int64, device=self.x.device) % len(self.x)
        size, device, pinned = self.spec.size, self.spec.device, self.spec.pinned
        stop = len(order) - len(order) % size if drop_last else len(order)
        for start in range(0, stop, size):
            idx = order[start:start + size]
            yield Batch(gather_batch(self.x, idx, device, pinned), gather_batch(self.y, idx, device, pinned), {})


class IndexBatches(Sampler):
    """DataLoader's batch sampler: the indices of the current pass, in batches; set anew before each pass (a
    persistent-workers DataLoader keeps its sampler), so one loader serves every epoch and a resumed one's first."""

    def __init__(self, batch: int):
        self.batch, self.indices, self.drop_last = batch, [], True

    def set(self, indices: Sequence[int], drop_last: bool) -> None:
        self.indices, self.drop_last = list(indices), drop_last

    def __iter__(self):
        stop = len(self.indices) - len(self.indices) % self.batch if self.drop_last else len(self.indices)
        return (self.indices[i:i + self.batch] for i in range(0, stop, self.batch))

    def __len__(self) -> int:
        return len(self.indices) // self.batch if self.drop_last else -(-len(self.indices) // self.batch)


class LoaderBatches:
    """torch's DataLoader over the dataset, for the indices it is asked for; batches copied to the device (without
    blocking, from pinned memory, when pin_memory is on). `worker_seed` seeds the workers' random streams
    (augmentation): they differ by rank and repeat by seed."""

    def __init__(self, dataset: Any, spec: BatchSpec, loader: LoaderConfig, worker_seed: int):
        self.order, self.spec = IndexBatches(spec.size), spec
        extra = {"prefetch_factor": loader.prefetch_factor} if loader.prefetch_factor is not None else {}
        self.loader = DataLoader(dataset, batch_sampler=self.order, num_workers=loader.num_workers,
                                 pin_memory=spec.pinned, persistent_workers=loader.persistent_workers,
                                 collate_fn=spec.collate_fn, generator=torch.Generator().manual_seed(worker_seed),
                                 **extra)

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)  # a persistent-workers DataLoader keeps its iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def batches(self, indices: Sequence[int], drop_last: bool) -> Iterator[Batch]:
        self.order.set(indices, drop_last)
        spec = self.spec
        for batch in self.loader:
            yield to_device(spec.items.split(batch), spec.device, spec.pinned, spec.memory_format)


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
