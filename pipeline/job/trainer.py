"""The DDP training loop: one rank's view. It times every step and evaluates the model on the held-out split at
the end (accuracy for a classifier, perplexity for a language model)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from pipeline.config import RunConfig
from pipeline.job.build import build_optimizer, build_scheduler
from pipeline.job.checkpoint import Checkpoints, segment
from pipeline.job.data import InMemoryBatches, LoaderBatches, holds_on_device, loader_info
from pipeline.job.env import DistEnv
from pipeline.job.observe import Phases, make_logger, make_profiler, write_progress
from pipeline.job.preemption import Interrupted, StopSignal
from pipeline.job.timing import StepTimer
from pipeline.rundir import Evaluation, FastPath, target_of

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 1.0


@dataclass
class TrainOutcome:
    steps: int
    start_step: int  # > 0 when this run resumed from a checkpoint
    steps_per_epoch: int
    phases: np.ndarray  # (steps - start_step, 4) seconds: step, data, compute, comm
    final_train_loss: float
    evaluation: Evaluation | None  # None when the dataset holds nothing out


def dropout_seed(seed: int, rank: int, step: int, world_size: int) -> int:
    """A distinct seed per (rank, step), so a resumed run draws the same dropout masks as an uninterrupted one."""
    return (seed * 0x9E3779B1 + step * world_size + rank) % (2**63)


def buffer_sync(every_forward: bool) -> dict:
    """DDP's argument for syncing buffers from rank 0 before each forward. torch 2.13 renamed
    `broadcast_buffers` to `forward_sync_buffers` (and warns on the old name); older releases know only the old."""
    if every_forward:
        return {}  # the default under either name
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class Trainer:
    """One rank's training: built in named steps (steps to take, batches, model, optimizer, resume, observers),
    then `fit` takes `train_step` until the last step and evaluates."""

    def __init__(self, run: RunConfig, env: DistEnv, device: torch.device, model: torch.nn.Module, train_set: Any,
                 test_set: Any | None, loss_fn: Callable, point_dir: Path, checkpoints: Checkpoints,
                 tensorboard_dir: Path | None = None):
        self.run, self.env, self.device, self.point_dir = run, env, device, point_dir
        self.checkpoints = checkpoints
        self.batch = run.per_rank_batch
        cuda = device.type == "cuda"
        self.precision = run.trainer.precision if run.trainer.precision != "auto" else ("bf16" if cuda else "fp32")
        self.train_set, self.test_set, self.loss_fn = train_set, test_set, loss_fn
        self._plan_steps()
        self.fast_path = self._make_batches(model)
        self.timer = StepTimer(device)
        self.raw_model, self.model = self._wrap_model(model)
        self.optimizer = build_optimizer(run, self.model, env.rank)
        self.scheduler = build_scheduler(run, self.optimizer, self.total_steps, env.rank)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        # the generator dropout draws from; reseeding it alone costs ~1 us, torch.manual_seed ~190 us
        self.dropout_rng = torch.cuda.default_generators[device.index] if cuda else torch.default_generator
        self.start_step, self.segments = self._resume(checkpoints.load())
        self.first_step_at: float | None = None  # unix time this process finished its first step
        self._make_observers(tensorboard_dir or point_dir / "tensorboard")

    # ------------------------------------------------------------------------------------------ set-up steps
    def _plan_steps(self) -> None:
        """The sampler (its order a function of seed and epoch), steps per epoch and the steps to take."""
        t, env = self.run.trainer, self.env
        self.sampler = DistributedSampler(range(len(self.train_set)), num_replicas=env.world_size, rank=env.rank,
                                          shuffle=True, seed=t.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the train split has {len(self.train_set)} samples: {len(self.sampler)} per rank over "
                f"{env.world_size} ranks, fewer than one per-rank batch of {self.batch}. Lower trainer.batch_size "
                f"(weak scaling) or trainer.global_batch_size (strong scaling), or use fewer ranks."
            )
        epochs_steps = t.epochs * self.steps_per_epoch
        self.total_steps = min(epochs_steps, t.max_steps) if t.max_steps else epochs_steps

    def _make_batches(self, model: torch.nn.Module) -> FastPath:
        """The batch source: the split in memory (on the GPU when it fits) when the dataset offers its arrays and
        loader.kind allows, else torch's DataLoader. Returns the fast-path choices made."""
        t, loader, cuda = self.run.trainer, self.run.loader, self.device.type == "cuda"
        has_arrays = callable(getattr(self.train_set, "arrays", None))
        if loader.kind == "memory" and not has_arrays:
            raise ValueError(f"rank {self.env.rank}: loader.kind=memory needs a dataset that offers its split as "
                             f"arrays (an arrays() method, as the built-in datasets have), and dataset._target_="
                             f"{target_of(self.run.dataset)} does not; use loader.kind=dataloader or auto")
        in_memory = has_arrays and loader.kind != "dataloader"
        # NHWC helps convolutions; a dense model would only pay for the copy back in its flatten
        images = np.ndim(self.train_set[0][0]) == 3
        channels_last = images and (t.channels_last if t.channels_last is not None else
                                    cuda and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()))
        if in_memory:
            held = [a for d in (self.train_set, self.test_set) if d is not None and hasattr(d, "arrays")
                    for a in d.arrays()]
            on_device = holds_on_device(t.data_on_device, sum(np.asarray(a).nbytes for a in held),
                                        torch.cuda.mem_get_info(self.device)[0] if cuda else 0)
            self.batches = InMemoryBatches(self.train_set, self.sampler, self.batch, self.device, on_device,
                                           channels_last)
            pinned = self.batches.pinned
        else:
            on_device, pinned = False, loader.pin_memory if loader.pin_memory is not None else cuda
            self.batches = LoaderBatches(self.train_set, self.sampler, self.batch, self.device, loader, pinned,
                                         channels_last, t.seed, self.env.rank)
        self.loader_info = loader_info("memory" if in_memory else "dataloader", loader, pinned)
        return FastPath(data_on_device=on_device, channels_last=channels_last, compile=t.compile,
                        pinned_memory=pinned)

    def _wrap_model(self, model: torch.nn.Module) -> tuple[torch.nn.Module, DistributedDataParallel]:
        """The model on its device (NHWC if chosen), compiled if asked, inside DDP; the timer watches its
        gradients when there are several ranks. Returns (the plain model, the DDP model)."""
        raw = model.to(self.device)
        if self.fast_path.channels_last:
            raw.to(memory_format=torch.channels_last)
        d = self.run.ddp
        ddp = DistributedDataParallel(
            torch.compile(raw) if self.fast_path.compile else raw,
            device_ids=[self.device.index] if self.device.type == "cuda" else None, bucket_cap_mb=d.bucket_cap_mb,
            gradient_as_bucket_view=d.gradient_as_bucket_view, static_graph=d.static_graph,
            **buffer_sync(d.broadcast_buffers))
        if self.env.world_size > 1:  # one rank communicates with nobody: no comm phase to mark (StepTimer.watch)
            self.timer.watch(raw)
        return raw, ddp

    def _resume(self, checkpoint: dict | None) -> tuple[int, list[dict]]:
        """Load a checkpoint's weights, optimizer and schedule state; returns its step and earlier segments'
        timings."""
        if checkpoint is None:
            return 0, []
        self.raw_model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.env.rank == 0:
            log.info("resumed from %s at step %d", self.checkpoints.loaded, checkpoint["step"])
        return checkpoint["step"], checkpoint["segments"]

    def _make_observers(self, tensorboard_dir: Path) -> None:
        """Rank 0's TensorBoard writer; the profiler's and NVTX's named ranges around the phases."""
        run, cuda = self.run, self.device.type == "cuda"
        self.metrics = make_logger(run.trainer.tensorboard, self.env.rank == 0, tensorboard_dir)
        p = run.profiler
        self.phases = Phases(profiling=p.enabled and (p.ranks is None or self.env.rank in p.ranks), nvtx=p.nvtx,
                             cuda=cuda)
        if self.phases.profiling or self.phases.nvtx:
            self.timer.on_grads_ready = self.phases.begin_wait

    def sample_batch(self, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n` training samples as a batch on the device (for counting FLOPs and checking that the
        model's output fits the loss before training)."""
        x, y = default_collate([self.train_set[i] for i in range(min(n, len(self.train_set)))])
        x = x.to(self.device)
        if self.fast_path.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device)

    # ------------------------------------------------------------------------------------------ training
    def save_checkpoint(self, step: int) -> None:
        self.checkpoints.save(model=self.raw_model, optimizer=self.optimizer, scheduler=self.scheduler, step=step,
                              segments=[*self.segments, segment(self.start_step, self.timer.phases())])

    def fit(self, stop: StopSignal | None = None) -> TrainOutcome:
        """Train from the start (or resumed) step to the last; raises Interrupted on rank 0 at the first step
        boundary after `stop` caught its signal."""
        self._announce()
        self.model.train()
        p = self.run.profiler
        profiler = make_profiler(self.phases.profiling, self.env.rank, self.run.trainer.warmup_steps, p.steps,
                                 self.point_dir)
        loss = torch.zeros((), device=self.device)
        self._window = (time.perf_counter(), self.start_step)  # where the next logged rate is measured from
        self._progress_at = -PROGRESS_EVERY_S
        batches = self._batches()
        self.timer.start()
        with profiler or contextlib.nullcontext():
            while True:
                with self.phases.range("data"):
                    step_batch = next(batches, None)
                if step_batch is None:
                    break
                step, epoch, x, y = step_batch
                loss = self.train_step(step, x, y)
                if profiler is not None:
                    profiler.step()
                self._after_step(step + 1, epoch, loss, stop)
        return self._finish(self.total_steps, loss)

    def _announce(self) -> None:
        if self.env.rank == 0:
            log.info("training %d steps (%d per epoch), per-rank batch %d, global batch %d, %d ranks, batches from %s",
                     self.total_steps, self.steps_per_epoch, self.batch, self.run.global_batch, self.env.world_size,
                     "the DataLoader" if self.loader_info.kind == "dataloader" else "memory")

    def _batches(self):
        """(step, epoch, inputs, targets) for every step still to take, on the device. The order is the sampler's
        for (seed, epoch), so a run resumed at any step takes the batches an uninterrupted one would."""
        step = self.start_step
        while step < self.total_steps:
            epoch, first = divmod(step, self.steps_per_epoch)
            for x, y in self.batches.epoch(epoch, first):
                yield step, epoch, x, y
                step += 1
                if step == self.total_steps:
                    return

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; the timer marks its phases. Returns the loss."""
        phase = self.phases.range
        self.dropout_rng.manual_seed(dropout_seed(self.run.trainer.seed, self.env.rank, step, self.env.world_size))
        self.timer.data_ready()
        with phase("forward"), self.autocast:
            loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        with phase("backward"):  # DDP waits for the gradient all-reduce before backward() returns
            loss.backward()
            self.phases.end_wait()
        self.timer.backward_done()
        with phase("optimizer"):
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
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
        """The last step's loss averaged over ranks, the evaluation, and the step timings."""
        final_loss = loss.detach().float().clone()
        dist.all_reduce(final_loss)
        evaluation = self.evaluate()
        if evaluation is not None:
            self.metrics.log({f"test/{evaluation.metric}": evaluation.value, "test/loss": evaluation.loss}, steps)
        return TrainOutcome(steps=steps, start_step=self.start_step, steps_per_epoch=self.steps_per_epoch,
                            phases=self.timer.phases(), final_train_loss=final_loss.item() / self.env.world_size,
                            evaluation=evaluation)

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
        # the progress file's readers poll every few seconds: rewriting it more often than each second is waste (a
        # fast step notices, benchmarks/step_costs.py)
        if now - self._progress_at >= PROGRESS_EVERY_S or step == self.total_steps:
            write_progress(self.point_dir, step=step, total=self.total_steps, samples_per_s=rate, eta_s=eta,
                           loss=value)
            self._progress_at = now
        self._window = (now, step)

    def close(self) -> None:
        """Stop what outlives training: DataLoader worker processes (persistent ones wait for the next epoch)."""
        if isinstance(self.batches, LoaderBatches):
            self.batches.close()

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Evaluation | None:
        """The held-out split (its first trainer.eval_samples samples, if set), every world_size-th sample on each
        rank; the sums are reduced over ranks. Accuracy for a classifier's (batch, classes) output and integer
        labels, perplexity = exp(mean token loss) for a dataset with a vocabulary, else the loss alone."""
        if self.test_set is None:
            return None
        self.model.eval()
        n = len(self.test_set)
        n = min(n, self.run.trainer.eval_samples) if self.run.trainer.eval_samples else n
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss x elements, elements, correct, scored
        classifier = True
        for x, y in self._eval_batches(range(self.env.rank, n, self.env.world_size)):
            with self.autocast:
                out = self.raw_model(x)
                loss = self.loss_fn(out, y)
            sums[0] += loss.double() * y.numel()
            sums[1] += y.numel()
            classifier = classifier and out.dim() == 2 and y.dim() == 1 and not y.is_floating_point()
            if classifier:
                sums[2] += (out.argmax(dim=1) == y).sum()
                sums[3] += len(y)
        dist.all_reduce(sums)
        mean_loss = (sums[0] / sums[1]).item()
        if getattr(self.test_set, "vocab_size", None) is not None:
            metric, value = "perplexity", math.exp(mean_loss)
        elif classifier:
            metric, value = "accuracy", (sums[2] / sums[3]).item()
        else:
            metric, value = "loss", mean_loss
        return Evaluation(split="test", samples=n, loss=mean_loss, metric=metric, value=value)

    def _eval_batches(self, shard: range):
        """This rank's share of the held-out split, in batches of the per-rank batch size, on the device."""
        if callable(getattr(self.test_set, "arrays", None)) and self.loader_info.kind == "memory":
            x, y = (torch.as_tensor(np.asarray(a)) for a in self.test_set.arrays())
            idx = torch.as_tensor(shard) % len(x)  # a cycled pool: sample i is row i % rows
            for start in range(0, len(idx), self.batch):
                part = idx[start:start + self.batch]
                xb = x[part].to(self.device)
                if self.fast_path.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                yield xb, y[part].to(self.device)
            return
        loader = DataLoader(self.test_set, batch_size=self.batch, sampler=list(shard),
                            num_workers=self.run.loader.num_workers, pin_memory=self.loader_info.pin_memory)
        for xb, yb in loader:
            yield xb.to(self.device, non_blocking=self.loader_info.pin_memory), yb.to(self.device)
