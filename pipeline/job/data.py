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
from dataclasses import replace
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, default_collate

from pipeline.config import LoaderConfig, target_of
from pipeline.job.context import Job
from pipeline.job.stream import Agreement, StreamLoader, StreamOrder, first_items, held_out_loader, rank_share
from pipeline.result import FastPath, LoaderInfo

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


def metadata(key: Any) -> bool:
    """A mapping item's key that names where the sample came from, not data: WebDataset's `__key__` and `__url__`
    (so Hugging Face's reader of tar shards names them). It does not reach the model."""
    return isinstance(key, str) and key.startswith("__") and key.endswith("__")


@dataclass(frozen=True)
class ItemFormat:
    """What a dataset's items (and so its collated batches) are: `(input, target)` pairs, or mappings whose input
    and target sit under io.input_key and io.target_key (Hugging Face's datasets and collators give
    `{"input_ids": ..., "labels": ..., "attention_mask": ...}`)."""

    input_key: str
    target_key: str
    model_keys: tuple[str, ...] | None = None  # the other keys the model gets (io.model_keys); None: all

    def keyword(self, key: Any) -> bool:
        """Whether a mapping item's `key` goes to the model as a keyword."""
        if key in (self.input_key, self.target_key) or metadata(key):
            return False
        return self.model_keys is None or key in self.model_keys

    def split(self, item: Any) -> Batch:
        if isinstance(item, Mapping):
            extra = {k: v for k, v in item.items() if self.keyword(k)}
            return Batch(item[self.input_key], item[self.target_key], extra)
        return Batch(item[0], item[1], {})

    def describe(self, item: Any, where: str) -> str:
        """What the items are, in words for the record; a TypeError naming the dataset (`where`) and the io.* keys
        when they are neither pairs nor mappings holding both keys."""
        if isinstance(item, Mapping):
            missing = [k for k in (self.input_key, self.target_key) if k not in item]
            if missing:
                raise TypeError(f"{where}: item 0 is a mapping with keys {list(item)}, without {', '.join(missing)}; "
                                "set io.input_key and io.target_key to the keys that hold the input and the target")
            unknown = [k for k in self.model_keys or () if k not in item]
            if unknown:
                raise TypeError(f"{where}: io.model_keys names {', '.join(unknown)}, which item 0 (keys {list(item)}) "
                                "does not have")
            extra = [k for k in item if self.keyword(k)]
            return (f"mappings: {self.input_key} the input, {self.target_key} the targets"
                    + (f", {', '.join(extra)} passed to the model as keywords" if extra else ""))
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return "(input, target) pairs"
        kind = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
        raise TypeError(f"{where}: item 0 is {kind}, not an (input, target) pair or a mapping; a dataset's "
                        "__getitem__ must return (input, target), or a mapping with the keys io.input_key and "
                        "io.target_key")


@dataclass(frozen=True)
class Data:
    """A job's data as its config built it: the splits (no test split when the dataset holds nothing out), how their
    items are read, how they are collated (None: torch's default_collate), and whether they are streams
    (IterableDatasets: pipeline.job.stream) and the first training items (read without moving a stream)."""

    train_set: Any
    test_set: Any | None
    items: ItemFormat
    collate_fn: Callable | None
    kind: str  # what the items are, in words (the record's io.batch)
    first: list  # the first training items (at most two)
    evaluation_source: str | None = None  # where test_set comes from, in words (pipeline.targets.Splits.source)
    stream: bool = False
    shares_itself: bool = False  # a stream built with `rank` and `world_size`: it reads this rank's share only


def check_datasets(train: Any, test: Any | None, target: str, rank: int, items: ItemFormat, stream: bool) -> str:
    """Before anything is built on them: items are pairs or mappings with the input and target keys, and each
    dataset's own checks (`validate()`, e.g. token values within the vocabulary) pass. Errors name the dataset and
    the rank. Returns what the items are, in words."""
    kind = ""
    for split, data in (("train", train), ("test", test)):
        if data is None:
            continue
        where = f"rank {rank}: dataset._target_={target} ({split} split)"
        first = first_items(data, 1, stream)
        if not first:
            raise ValueError(f"{where}: the dataset is empty" + (" (the stream yields nothing)" if stream else ""))
        kind = kind or items.describe(first[0], where)
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
    """A list of items as one batch, by the user's collate_fn when given (loader.collate_fn), else collate_rows."""
    return fmt.split((collate_fn or collate_rows)(items))


def collate_rows(items: list) -> Any:
    """torch's default_collate, once a mapping item's lists (a Hugging Face dataset's rows: `{"input_ids": [...],
    "labels": 3}`) are tensors: torch's own would collate a list field position by position, into a list of
    tensors. Rows whose lists differ in length are an error naming the field: padding is a collate_fn's."""
    if not (items and isinstance(items[0], Mapping)):
        return default_collate(items)
    rows = [{k: torch.as_tensor(v) if isinstance(v, list) else v for k, v in item.items()} for item in items]
    try:
        return default_collate(rows)
    except RuntimeError as e:
        uneven = next((k for k, v in rows[0].items() if isinstance(v, torch.Tensor)
                       and any(r[k].shape != v.shape for r in rows)), None)
        if uneven is None:
            raise
        lengths = sorted({tuple(r[uneven].shape) for r in rows})
        raise ValueError(f"the rows' {uneven!r} differ in shape within a batch ({lengths[0]} to {lengths[-1]}): "
                         "pad them in the dataset, or give loader.collate_fn a collator that pads (e.g. "
                         "transformers.DataCollatorWithPadding)") from e


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
                                 collate_fn=spec.collate_fn or collate_rows,
                                 generator=torch.Generator().manual_seed(worker_seed), **extra)

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)  # a persistent-workers DataLoader keeps its iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def batches(self, indices: Sequence[int], drop_last: bool) -> Iterator[Batch]:
        self.order.set(indices, drop_last)
        spec = self.spec
        for batch in self.loader:
            yield to_device(spec.items.split(batch), spec.device, spec.pinned, spec.memory_format)


def check_workers(loader: LoaderConfig, cpus: int, rank: int) -> None:
    """Warn when the DataLoader's worker processes outnumber the CPUs this rank was given (they then compete with
    each other and with the training thread, and the data phase grows)."""
    if loader.num_workers > cpus:
        log.warning("rank %d: loader.num_workers=%d is more than the %d CPU(s) this rank has (its share of the "
                    "host's cores, or Slurm's --cpus-per-task); the workers will compete for them",
                    rank, loader.num_workers, cpus)


def loader_info(kind: str, loader: LoaderConfig, pin: bool) -> LoaderInfo:
    if kind == "memory":
        return LoaderInfo(kind="memory", num_workers=0, pin_memory=pin, persistent_workers=False, prefetch_factor=None)
    return LoaderInfo(kind=kind, num_workers=loader.num_workers, pin_memory=pin,
                      # a stream's workers persist whenever there are some (pipeline.job.stream.StreamLoader)
                      persistent_workers=loader.num_workers > 0 if kind == "stream" else loader.persistent_workers,
                      prefetch_factor=loader.prefetch_factor if loader.prefetch_factor is not None
                      else (2 if loader.num_workers else None))


class Batches:
    """Where one rank's batches come from, chosen once: the split held in memory (on the GPU when it fits) when the
    dataset offers its arrays and loader.kind allows, torchdata's StatefulDataLoader over this rank's share of a
    stream, else torch's DataLoader; and the fast-path choices that go with the choice (NHWC images, cuDNN's timing
    of its algorithms, pinned memory, the next batch's copy ahead: not for a stream, whose position the checkpoint
    keeps, which a batch taken ahead would move)."""

    def __init__(self, job: Job, data: Data, model: torch.nn.Module):
        t, loader, cuda = job.run.trainer, job.run.loader, job.cuda
        self.job, self.data = job, data
        self.in_memory = self._from_memory(data.train_set)
        channels_last, cudnn_benchmark = self._layout(data, model)
        self.on_device, pinned = self._placement(data)
        self.spec = BatchSpec(size=job.run.micro_batch, device=job.device, items=data.items,
                              channels_last=channels_last, pinned=pinned, collate_fn=data.collate_fn)
        self.agreement = Agreement(job.world_size) if data.stream else None
        self.train = self.source(data.train_set, persistent=loader.persistent_workers)
        if not self.in_memory:
            check_workers(loader, torch.get_num_threads(), job.rank)
        self.info = loader_info("memory" if self.in_memory else "stream" if data.stream else "dataloader", loader,
                                pinned)
        prefetch = cuda and not self.on_device and not data.stream and (t.prefetch if t.prefetch is not None else True)
        self.fast_path = FastPath(data_on_device=self.on_device, channels_last=channels_last, compile=t.compile,
                                  pinned_memory=pinned, cudnn_benchmark=cudnn_benchmark, prefetch=prefetch)

    def _from_memory(self, train: Any) -> bool:
        """Batches indexed from the split held in memory: when the dataset offers its arrays and loader.kind allows."""
        kind, has_arrays = self.job.run.loader.kind, not self.data.stream and callable(getattr(train, "arrays", None))
        if kind == "memory" and not has_arrays:
            raise ValueError(f"rank {self.job.rank}: loader.kind=memory needs a dataset that offers its split as "
                             "arrays (an arrays() method, as the built-in datasets have), and dataset._target_="
                             f"{target_of(self.job.run.dataset)} does not"
                             f"{' (it is a stream)' if self.data.stream else ''}; use loader.kind=dataloader or auto")
        return has_arrays and kind != "dataloader"

    def _layout(self, data: Data, model: torch.nn.Module) -> tuple[bool, bool]:
        """(NHWC images, cuDNN's timing of its algorithms), each as trainer.* says or, when null, for a convolutional
        model on CUDA; cuDNN is set so here."""
        t, cuda = self.job.run.trainer, self.job.cuda
        # NHWC helps convolutions; a dense model would only pay for the copy back in its flatten
        images = np.ndim(data.items.split(data.first[0]).inputs) == 3
        convolutional = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
        # FSDP shards contiguous parameters only: NHWC is off under it (refused at launch when asked for)
        auto = cuda and convolutional and self.job.run.parallel.kind == "ddp"
        channels_last = images and (t.channels_last if t.channels_last is not None else auto)
        # the batch shape is fixed (drop_last), so cuDNN's timing of its algorithms, once per shape, pays off
        cudnn_benchmark = cuda and (t.cudnn_benchmark if t.cudnn_benchmark is not None else convolutional)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        return channels_last, cudnn_benchmark

    def _placement(self, data: Data) -> tuple[bool, bool]:
        """(the splits held on the GPU, batches through pinned host memory): in memory, the splits go to the GPU when
        they fit (trainer.data_on_device), else they come pinned; through the DataLoader, as loader.pin_memory says
        (null: on a GPU)."""
        job = self.job
        if not self.in_memory:
            pin = job.run.loader.pin_memory
            return False, pin if pin is not None else job.cuda
        held = [a for split in (data.train_set, data.test_set) if split is not None and hasattr(split, "arrays")
                for a in split.arrays()]
        on_device = holds_on_device(job.run.trainer.data_on_device, sum(np.asarray(a).nbytes for a in held),
                                    torch.cuda.mem_get_info(job.device)[0] if job.cuda else 0)
        return on_device, job.cuda and not on_device

    @property
    def worker_seed(self) -> int:
        return self.job.run.trainer.seed * 1000 + self.job.rank

    def source(self, dataset: Any, persistent: bool) -> InMemoryBatches | LoaderBatches | StreamLoader:
        """A split's batches: in memory when the training's are and the split offers its arrays, a stream's share
        through the StatefulDataLoader, else through the DataLoader (its workers kept between passes when
        `persistent`)."""
        job, spec = self.job, self.spec
        if self.data.stream:
            share = rank_share(dataset, job.rank, job.world_size, self.data.shares_itself)
            return StreamLoader(share, spec.size, job.run.loader, spec.pinned, spec.collate_fn or collate_rows,
                                self.worker_seed)
        if self.in_memory and callable(getattr(dataset, "arrays", None)):
            return InMemoryBatches(dataset, spec, self.on_device)
        loader = replace(job.run.loader, persistent_workers=persistent)
        return LoaderBatches(dataset, spec, loader, worker_seed=self.worker_seed)

    def to_device(self, collated: Any) -> Batch:
        spec = self.spec
        return to_device(spec.items.split(collated), spec.device, spec.pinned, spec.memory_format)

    def order(self) -> StepOrder | StreamOrder:
        """Which batches each step takes: the sampler's order over the split's indices, or the stream's."""
        if self.data.stream:
            return StreamOrder(self.job, self.train, self.agreement)
        return StepOrder(self.job, len(self.data.train_set))

    def held_out(self, test: Any, limit: int) -> Iterator[Batch]:
        """This rank's share of the held-out split (its first `limit` samples in all, when set): every
        world_size-th index, or a stream's share, read from its start to where the first rank's ends."""
        job = self.job
        if not self.data.stream:
            n = min(len(test), limit) if limit else len(test)
            source = self.source(test, persistent=False)
            return self.ahead(source.batches(range(job.rank, n, job.world_size), drop_last=False))
        return self._held_out_stream(test, limit)

    def _held_out_stream(self, test: Any, limit: int) -> Iterator[Batch]:
        job, spec = self.job, self.spec
        share = rank_share(test, job.rank, job.world_size, self.data.shares_itself)
        batches = iter(held_out_loader(share, spec.size, spec.pinned, spec.collate_fn or collate_rows))
        quota = -(-limit // job.world_size) if limit else None  # per rank
        taken = 0
        while True:
            collated = next(batches, None) if quota is None or taken < quota else None
            if not self.agreement.all_have(collated is not None):  # every rank the same number of batches (FSDP)
                return
            batch = self.to_device(collated)
            if quota is not None and taken + len(batch.targets) > quota:
                keep = quota - taken
                batch = Batch(batch.inputs[:keep], batch.targets[:keep],
                              {k: v[:keep] if isinstance(v, torch.Tensor) else v for k, v in batch.extra.items()})
            taken += len(batch.targets)
            yield batch

    def ahead(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """The batches, the next one's copy to the GPU on a side stream while this one trains (fast_path.prefetch)."""
        return prefetched(batches, self.job.device) if self.fast_path.prefetch else batches

    def sample(self, n: int = 2) -> Batch:
        """The first `n` training samples as a batch on the device, collated as the DataLoader would."""
        items = self.data.first[:n]
        spec = self.spec
        return to_device(collate(items, spec.items, spec.collate_fn), spec.device, False, spec.memory_format)

    def tokens_per_sample(self) -> int | None:
        """A token model's tokens per sample: the input's length when inputs are integer token ids."""
        x = torch.as_tensor(self.spec.items.split(self.data.first[0]).inputs)
        return None if x.is_floating_point() or x.dim() != 1 else int(x.numel())

    def close(self) -> None:
        """Stop what outlives training: DataLoader worker processes (persistent ones wait for the next epoch)."""
        if isinstance(self.train, LoaderBatches):
            self.train.close()


class StepOrder:
    """Which samples each step takes: the DistributedSampler's order for (seed, epoch), `per_rank_batch` samples a
    step in `accum` micro-batches. A run resumed at any step takes the batches an uninterrupted one would, and in
    strong scaling every world size takes the same samples in a step (only which rank takes which changes)."""

    def __init__(self, job: Job, samples: int):
        run, t = job.run, job.run.trainer
        self.batch, self.accum = run.per_rank_batch, run.accum_steps
        self.sampler = DistributedSampler(range(samples), num_replicas=job.world_size, rank=job.rank, shuffle=True,
                                          seed=t.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the train split has {samples} samples: {len(self.sampler)} per rank over {job.world_size} ranks, "
                f"fewer than one per-rank batch of {self.batch}. Lower trainer.batch_size (weak scaling) or "
                "trainer.global_batch_size (strong scaling), or use fewer ranks.")
        epochs_steps = t.epochs * self.steps_per_epoch
        self.total_steps = min(epochs_steps, t.max_steps) if t.max_steps else epochs_steps

    def steps(self, start: int, batches: Batches) -> Iterator[tuple[int, int, list[Batch]]]:
        """(step, epoch, micro-batches) for every step from `start` to the last, on the device."""
        step = start
        while step < self.total_steps:
            epoch, first = divmod(step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)[first * self.batch:self.steps_per_epoch * self.batch]
            micro = []
            for batch in batches.ahead(batches.train.batches(order, drop_last=True)):
                micro.append(batch)
                if len(micro) < self.accum:
                    continue
                yield step, epoch, micro
                micro = []
                step += 1
                if step == self.total_steps:
                    return
