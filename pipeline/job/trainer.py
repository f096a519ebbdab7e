"""The DDP training loop: one rank's view. It times every step and evaluates test accuracy at the end."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from pipeline.config import RunConfig
from pipeline.job.checkpoint import save_checkpoint, segment
from pipeline.job.env import DistEnv
from pipeline.job.observe import Phases, make_logger, make_profiler, write_progress
from pipeline.job.preemption import Interrupted, StopSignal
from pipeline.job.timing import StepTimer
from pipeline.rundir import CHECKPOINT_NAME, FastPath

log = logging.getLogger(__name__)

EVAL_BATCH = 1024
DEVICE_DATA_SHARE = 0.5


@dataclass
class TrainOutcome:
    steps: int
    start_step: int  # > 0 when this run resumed from a checkpoint
    steps_per_epoch: int
    phases: np.ndarray  # (steps - start_step, 4) seconds: step, data, compute, comm
    final_train_loss: float
    test_accuracy: float


def dropout_seed(seed: int, rank: int, step: int, world_size: int) -> int:
    """A distinct seed per (rank, step), so a resumed run draws the same dropout masks as an uninterrupted one."""
    return (seed * 0x9E3779B1 + step * world_size + rank) % (2**63)


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def buffer_sync(every_forward: bool) -> dict:
    """DDP's argument for syncing buffers from rank 0 before each forward. torch 2.13 renamed
    `broadcast_buffers` to `forward_sync_buffers` (and warns on the old name); older releases know only the old."""
    if every_forward:
        return {}  # the default under either name
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


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
    batch = torch.empty_like(source[:len(idx)], pin_memory=pinned)
    torch.index_select(source, 0, idx, out=batch)  # into the buffer's strides (channels_last stays)
    return batch.to(device, non_blocking=True)


class Trainer:
    """One rank's training: built in named steps (data, fast path, model, optimizer, resume, observers), then
    `fit` takes `train_step` until the last step and evaluates."""

    def __init__(self, run: RunConfig, env: DistEnv, device: torch.device, model: torch.nn.Module, dataset,
                 point_dir: Path, resume: dict | None = None):
        self.run, self.env, self.device, self.point_dir = run, env, device, point_dir
        self.checkpoint_path = point_dir / CHECKPOINT_NAME
        self.batch = run.per_rank_batch
        cuda = device.type == "cuda"
        self.precision = run.trainer.precision if run.trainer.precision != "auto" else ("bf16" if cuda else "fp32")
        train, test = dataset.load("train"), dataset.load("test")
        self.fast_path = self._choose_fast_path(model, dataset.input_shape, sum(a.nbytes for a in (*train, *test)))
        self.train_x, self.train_y = self._place(*train)
        self.test_x, self.test_y = self._place(*test)
        self._plan_steps()
        self.timer = StepTimer(device)
        self.raw_model, self.model = self._wrap_model(model)
        t = run.trainer
        self.optimizer = make_optimizer(t.optimizer, self.model.parameters(), t.lr, t.momentum, t.weight_decay)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        # the generator dropout draws from; reseeding it alone costs ~1 us, torch.manual_seed ~190 us
        self.dropout_rng = torch.cuda.default_generators[device.index] if cuda else torch.default_generator
        self.start_step, self.segments = self._resume(resume)
        self.first_step_at: float | None = None  # unix time this process finished its first step
        self._make_observers()

    # ------------------------------------------------------------------------------------------ set-up steps
    def _choose_fast_path(self, model: torch.nn.Module, input_shape: tuple, split_bytes: int) -> FastPath:
        t, cuda = self.run.trainer, self.device.type == "cuda"
        on_device = holds_on_device(t.data_on_device, split_bytes,
                                    torch.cuda.mem_get_info(self.device)[0] if cuda else 0)
        # NHWC helps convolutions; a dense model would only pay for the copy back in its flatten
        channels_last = (t.channels_last if t.channels_last is not None else
                         cuda and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()))
        return FastPath(data_on_device=on_device, channels_last=channels_last and len(input_shape) == 3,
                        compile=t.compile, pinned_memory=cuda and not on_device)

    def _place(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The split as tensors, on the device when the fast path holds it there, else in host memory."""
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if self.fast_path.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fast_path.data_on_device:
            return x.to(self.device), y.to(self.device)
        return x, y

    def _plan_steps(self) -> None:
        """The sampler (its order a function of seed and epoch), steps per epoch and the steps to take."""
        t, env = self.run.trainer, self.env
        self.sampler = DistributedSampler(range(len(self.train_y)), num_replicas=env.world_size, rank=env.rank,
                                          shuffle=True, seed=t.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the train split has {len(self.train_y)} samples: {len(self.sampler)} per rank over "
                f"{env.world_size} ranks, fewer than one per-rank batch of {self.batch}. Lower trainer.batch_size "
                f"(weak scaling) or trainer.global_batch_size (strong scaling), or use fewer ranks."
            )
        epochs_steps = t.epochs * self.steps_per_epoch
        self.total_steps = min(epochs_steps, t.max_steps) if t.max_steps else epochs_steps

    def _wrap_model(self, model: torch.nn.Module) -> tuple[torch.nn.Module, DistributedDataParallel]:
        """The model on its device (NHWC if chosen), compiled if asked, inside DDP; the timer watches its
        gradients. Returns (the plain model, the DDP model)."""
        raw = model.to(self.device)
        if self.fast_path.channels_last:
            raw.to(memory_format=torch.channels_last)
        d = self.run.ddp
        ddp = DistributedDataParallel(
            torch.compile(raw) if self.fast_path.compile else raw,
            device_ids=[self.device.index] if self.device.type == "cuda" else None, bucket_cap_mb=d.bucket_cap_mb,
            gradient_as_bucket_view=d.gradient_as_bucket_view, static_graph=d.static_graph,
            **buffer_sync(d.broadcast_buffers))
        self.timer.watch(raw)
        return raw, ddp

    def _resume(self, checkpoint: dict | None) -> tuple[int, list[dict]]:
        """Load a checkpoint's weights and optimizer state; returns its step and earlier segments' timings."""
        if checkpoint is None:
            return 0, []
        self.raw_model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.env.rank == 0:
            log.info("resumed from %s at step %d", self.checkpoint_path, checkpoint["step"])
        return checkpoint["step"], checkpoint["segments"]

    def _make_observers(self) -> None:
        """Rank 0's TensorBoard writer; the profiler's and NVTX's named ranges around the phases."""
        run, cuda = self.run, self.device.type == "cuda"
        self.metrics = make_logger(run.trainer.tensorboard, self.env.rank == 0, self.point_dir)
        self.phases = Phases(profiling=run.profiler.enabled and self.env.rank in run.profiler.ranks,
                             nvtx=run.profiler.nvtx, cuda=cuda)
        if self.phases.profiling or self.phases.nvtx:
            self.timer.on_grads_ready = self.phases.begin_wait

    # ------------------------------------------------------------------------------------------ training
    def save_checkpoint(self, step: int) -> None:
        save_checkpoint(self.checkpoint_path, model=self.raw_model, optimizer=self.optimizer, step=step,
                        segments=[*self.segments, segment(self.start_step, self.timer.phases())])

    def fit(self, stop: StopSignal | None = None) -> TrainOutcome:
        """Train from the start (or resumed) step to the last; raises Interrupted on rank 0 at the first step
        boundary after `stop` caught its signal."""
        self._announce()
        self.model.train()
        p = self.run.profiler
        profiler = make_profiler(p.enabled, self.env.rank, p.ranks, self.run.trainer.warmup_steps, p.steps,
                                 self.point_dir)
        loss = torch.zeros((), device=self.device)
        self._window = (time.perf_counter(), self.start_step)  # where the next logged rate is measured from
        self.timer.start()
        with profiler or contextlib.nullcontext():
            for step, epoch, idx in self._batch_indices():
                loss = self.train_step(step, idx)
                if profiler is not None:
                    profiler.step()
                self._after_step(step + 1, epoch, loss, stop)
        return self._finish(self.total_steps, loss)

    def _announce(self) -> None:
        if self.env.rank == 0:
            log.info("training %d steps (%d per epoch), per-rank batch %d, global batch %d, %d ranks",
                     self.total_steps, self.steps_per_epoch, self.batch, self.run.global_batch, self.env.world_size)

    def _batch_indices(self):
        """(step, epoch, this rank's sample indices) for every step still to take. The order is the sampler's for
        (seed, epoch), so a run resumed at any step takes the batches an uninterrupted one would."""
        step = self.start_step
        while step < self.total_steps:
            epoch, first = divmod(step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            order = torch.as_tensor(list(self.sampler), device=self.train_x.device)
            for i in range(first, min(self.steps_per_epoch, first + self.total_steps - step)):
                yield step, epoch, order[i * self.batch:(i + 1) * self.batch]
                step += 1

    def train_step(self, step: int, idx: torch.Tensor) -> torch.Tensor:
        """One optimizer step on rows `idx` of the train split; the timer marks its phases. Returns the loss."""
        phase = self.phases.range
        with phase("data"):
            x = gather_batch(self.train_x, idx, self.device, self.fast_path.pinned_memory)
            y = gather_batch(self.train_y, idx, self.device, self.fast_path.pinned_memory)
            self.dropout_rng.manual_seed(dropout_seed(self.run.trainer.seed, self.env.rank, step,
                                                      self.env.world_size))
        self.timer.data_ready()
        with phase("forward"), self.autocast:
            loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        with phase("backward"):  # DDP waits for the gradient all-reduce before backward() returns
            loss.backward()
            self.phases.end_wait()
        self.timer.backward_done()
        with phase("optimizer"):
            self.optimizer.step()
        self.timer.step_done()
        return loss

    def _after_step(self, done: int, epoch: int, loss: torch.Tensor, stop: StopSignal | None) -> None:
        """After `done` steps: note the first step's time; on rank 0, stop if asked, checkpoint, report."""
        if self.first_step_at is None:
            self.first_step_at = time.time()
        if self.env.rank != 0:
            return
        t = self.run.trainer
        if stop is not None and stop.received is not None:
            raise Interrupted(done, stop.received)
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done < self.total_steps:
            self.save_checkpoint(done)
        if done % t.log_every == 0 or done == self.total_steps:
            self._report(done, epoch, loss)

    def _finish(self, steps: int, loss: torch.Tensor) -> TrainOutcome:
        """The last step's loss averaged over ranks, test accuracy, and the step timings."""
        final_loss = loss.detach().float().clone()
        dist.all_reduce(final_loss)
        accuracy = self.evaluate()
        self.metrics.log({"test/accuracy": accuracy}, steps)
        self.metrics.close()
        return TrainOutcome(steps=steps, start_step=self.start_step, steps_per_epoch=self.steps_per_epoch,
                            phases=self.timer.phases(), final_train_loss=final_loss.item() / self.env.world_size,
                            test_accuracy=accuracy)

    def _report(self, step: int, epoch: int, loss: torch.Tensor) -> None:
        """Rank 0, every `log_every` steps: a log line, TensorBoard scalars, the progress file."""
        now, (since, since_step) = time.perf_counter(), self._window
        rate = (step - since_step) * self.run.global_batch / (now - since)
        eta = (self.total_steps - step) * self.run.global_batch / rate
        value = loss.item()
        log.info("step %d/%d epoch %d loss %.4f %.0f samples/s ETA %.0f s", step, self.total_steps, epoch, value,
                 rate, eta)
        recent = self.timer.phases(last=step - since_step).mean(axis=0) * 1e3
        self.metrics.log({"train/loss": value, "train/samples_per_s": rate,
                          "train/lr": self.optimizer.param_groups[0]["lr"],
                          "time/step_ms": recent[0], "time/data_ms": recent[1], "time/compute_ms": recent[2],
                          "time/comm_ms": recent[3]}, step)
        write_progress(self.point_dir, step=step, total=self.total_steps, samples_per_s=rate, eta_s=eta, loss=value)
        self._window = (now, step)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Each rank scores every world_size-th test sample; the counts are summed over ranks."""
        self.model.eval()
        xs, ys = self.test_x[self.env.rank::self.env.world_size], self.test_y[self.env.rank::self.env.world_size]
        counts = torch.tensor([0.0, len(ys)], dtype=torch.float64, device=self.device)  # correct, scored
        for start in range(0, len(ys), EVAL_BATCH):
            x = xs[start:start + EVAL_BATCH].to(self.device)
            y = ys[start:start + EVAL_BATCH].to(self.device)
            with self.autocast:
                pred = self.raw_model(x).argmax(dim=1)
            counts[0] += (pred == y).sum()
        dist.all_reduce(counts)
        return (counts[0] / counts[1]).item()
