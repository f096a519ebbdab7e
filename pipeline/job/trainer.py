"""The training loop: one rank's view, under DDP, FSDP or HSDP (pipeline.job.parallel). It takes every step in
`trainer.grad_accum_steps` micro-batches, times it, stops the run when a loss is not finite (all ranks together),
and evaluates the model on the held-out split at the end (accuracy for a classifier, perplexity for a language
model). Training returns a typed outcome (`TrainOutcome`) that the record is built from."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from pipeline.config import RunConfig, target_of
from pipeline.job.build import Workload, build_optimizer, build_scheduler, optimizer_info
from pipeline.job.checkpoint import Checkpoints, segment
from pipeline.job.data import (Batch, BatchSpec, InMemoryBatches, LoaderBatches, check_workers, collate,
                               holds_on_device, loader_info, prefetched, to_device)
from pipeline.job.env import DistEnv
from pipeline.job.memory import measure as measure_memory
from pipeline.job.model_io import ModelIO
from pipeline.job.observe import Phases, make_logger, make_profiler, write_progress
from pipeline.job.parallel import Parallel, parallelize
from pipeline.job.preemption import Interrupted, StopSignal
from pipeline.job.timing import StepTimer
from pipeline.result import (CollectiveVolume, Evaluation, FastPath, LoaderInfo, Memory, ModelIOInfo, OptimizerInfo,
                             ParallelInfo, Segment)

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 1.0
IGNORE_INDEX = -100  # torch's cross_entropy and Hugging Face's losses skip targets of this value


@dataclass
class TrainOutcome:
    """What one rank's training produced, for the record (pipeline.job.record)."""

    steps: int  # steps done: the planned total, or fewer when the run diverged
    start_step: int  # > 0 when this run resumed from a checkpoint
    steps_per_epoch: int
    phases: np.ndarray  # (steps - start_step, 4) seconds: step, data, compute, comm
    final_train_loss: float | None  # None when it was not finite
    evaluation: Evaluation | None  # None when the dataset holds nothing out, or it failed (see missing)
    segments: list[Segment]  # rank 0's throughput in the stretches before a restart (raw timings below)
    precision: str  # what the steps ran in: fp32 or bf16
    fast_path: FastPath
    loader: LoaderInfo
    io: ModelIOInfo
    optimizer: OptimizerInfo
    model_parameters: int
    gradient_bytes: int
    parameters_sha256: str
    tokens_per_sample: int | None
    first_step_at: float | None  # unix time this process finished its first step
    parallel: ParallelInfo
    memory: Memory | None  # None when it could not be read (see missing)
    diverged_at_step: int | None = None
    missing: dict[str, str] = field(default_factory=dict)


class Diverged(Exception):
    """A loss that was not finite, seen by every rank at the same check."""

    def __init__(self, step: int):
        super().__init__(f"the loss was not finite (NaN or infinite) at step {step}: the run diverged")
        self.step = step


class EvaluationFailed(Exception):
    pass


def dropout_seed(seed: int, rank: int, step: int, world_size: int) -> int:
    """A distinct seed per (rank, step), so a resumed run draws the same dropout masks as an uninterrupted one."""
    return (seed * 0x9E3779B1 + step * world_size + rank) % (2**63)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: an FSDP DTensor's local shard, any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def parameters_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes on this rank: equal on all ranks when DDP kept them in sync (FSDP: of
    this rank's shards, which differ)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(local(p.detach()).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gradient_bytes(model: torch.nn.Module) -> int:
    """The whole model's gradient, one per parameter in the parameter's dtype: what DDP all-reduces every step."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def per_step(counts: dict, before: dict, steps: int) -> dict:
    return {k: (counts[k] - before.get(k, 0)) // steps for k in counts}


class FiniteCheck:
    """Every `every` steps the ranks agree (one all-reduce of a few flags) whether any step's loss was not finite,
    and at which step first, and whether any rank caught the stop signal (a sharded run's ranks checkpoint
    together, so they stop at the same step). Between checks the flags stay on the device, so no step waits for the
    GPU."""

    def __init__(self, every: int, device: torch.device, world_size: int):
        self.every, self.world_size = every, world_size
        self.flags = torch.zeros(every + 1, device=device)  # a slot per step, then the stop signal's number
        self.first = None  # the step of the window's first slot

    def note(self, step: int, loss: torch.Tensor) -> None:
        if self.first is None:
            self.first = step
        self.flags[step - self.first] = (~torch.isfinite(loss.detach())).float()

    def due(self, done: int, last: int) -> bool:
        return self.first is not None and (done - self.first == self.every or done == last)

    def check(self, signum: int | None = None) -> tuple[int | None, int | None]:
        """(the first step with a loss that was not finite on any rank since the last check, the stop signal any
        rank gave as `signum`), each None when there was none."""
        flags = self.flags.clone()
        flags[self.every] = float(signum or 0)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        values = flags.tolist()
        bad = [i for i, f in enumerate(values[:self.every]) if f]
        first, self.first = self.first, None
        self.flags.zero_()
        return (first + bad[0] if bad else None), (int(values[self.every]) or None)


class Trainer:
    """One rank's training: built in named steps (steps to take, batches, model, optimizer, resume, observers),
    then `fit` takes `train_step` until the last step, evaluates, and returns a TrainOutcome."""

    def __init__(self, run: RunConfig, env: DistEnv, device: torch.device, workload: Workload,
                 checkpoints: Checkpoints, folders: tuple[Path, Path]):
        """`folders`: (the point's folder, its TensorBoard folder)."""
        self.run, self.env, self.device, self.work = run, env, device, workload
        self.point_dir, self.checkpoints = folders[0], checkpoints
        self.batch, self.accum = run.per_rank_batch, run.accum_steps  # per step: accum micro-batches, self.batch in all
        cuda = device.type == "cuda"
        self.precision = run.trainer.precision if run.trainer.precision != "auto" else ("bf16" if cuda else "fp32")
        self.io = ModelIO(run.io, workload.loss_fn, workload.batch_kind)
        self._plan_steps()
        self.fast_path = self._make_batches(workload.model)
        self.timer = StepTimer(device)
        self.parallel = self._wrap_model(workload.model)
        self.raw_model, self.model = self.parallel.raw, self.parallel.wrapped
        # after wrapping: FSDP's sharded parameters are not the ones the model was built with
        self.optimizer = build_optimizer(run, self.raw_model, env.rank, device)
        self.scheduler = build_scheduler(run, self.optimizer, self.total_steps, env.rank)
        if self.parallel.info.param_dtype == "bf16":
            self.precision = "bf16"  # FSDP's blocks compute in bf16 (parallel.param_dtype), whatever autocast does
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.parallel.autocast)
        # the generator dropout draws from; reseeding it alone costs ~1 us, torch.manual_seed ~190 us
        self.dropout_rng = torch.cuda.default_generators[device.index] if cuda else torch.default_generator
        self.start_step, self.segments = checkpoints.restore(self.raw_model, self.optimizer, self.scheduler)
        if self.start_step and env.rank == 0:
            log.info("resumed from %s at step %d", checkpoints.loaded, self.start_step)
        self._counted = ({}, {})  # the FSDP clock's collectives at the end of the warm-up (per-step figures)
        self.first_step_at: float | None = None
        self.finite = FiniteCheck(run.trainer.finite_check_every, device, env.world_size)
        self._make_observers(folders[1])

    # ------------------------------------------------------------------------------------------ set-up steps
    def _plan_steps(self) -> None:
        """The sampler (its order a function of seed and epoch), steps per epoch and the steps to take."""
        t, env = self.run.trainer, self.env
        self.sampler = DistributedSampler(range(len(self.work.train_set)), num_replicas=env.world_size,
                                          rank=env.rank, shuffle=True, seed=t.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the train split has {len(self.work.train_set)} samples: {len(self.sampler)} per rank over "
                f"{env.world_size} ranks, fewer than one per-rank batch of {self.batch}. Lower trainer.batch_size "
                f"(weak scaling) or trainer.global_batch_size (strong scaling), or use fewer ranks."
            )
        epochs_steps = t.epochs * self.steps_per_epoch
        self.total_steps = min(epochs_steps, t.max_steps) if t.max_steps else epochs_steps

    def _make_batches(self, model: torch.nn.Module) -> FastPath:
        """The batch source: the split in memory (on the GPU when it fits) when the dataset offers its arrays and
        loader.kind allows, else torch's DataLoader. Returns the fast-path choices made."""
        t, loader, cuda, train = self.run.trainer, self.run.loader, self.device.type == "cuda", self.work.train_set
        has_arrays = callable(getattr(train, "arrays", None))
        if loader.kind == "memory" and not has_arrays:
            raise ValueError(f"rank {self.env.rank}: loader.kind=memory needs a dataset that offers its split as "
                             f"arrays (an arrays() method, as the built-in datasets have), and dataset._target_="
                             f"{target_of(self.run.dataset)} does not; use loader.kind=dataloader or auto")
        self.in_memory = has_arrays and loader.kind != "dataloader"
        # NHWC helps convolutions; a dense model would only pay for the copy back in its flatten
        images = np.ndim(self.work.items.split(train[0]).inputs) == 3
        convolutional = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
        # FSDP shards contiguous parameters only: NHWC is off under it (refused at launch when asked for)
        auto = cuda and convolutional and self.run.parallel.kind == "ddp"
        channels_last = images and (t.channels_last if t.channels_last is not None else auto)
        # the batch shape is fixed (drop_last), so cuDNN's timing of its algorithms, once per shape, pays off
        cudnn_benchmark = cuda and (t.cudnn_benchmark if t.cudnn_benchmark is not None else convolutional)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if self.in_memory:
            held = [a for d in (train, self.work.test_set) if d is not None and hasattr(d, "arrays")
                    for a in d.arrays()]
            self.on_device = holds_on_device(t.data_on_device, sum(np.asarray(a).nbytes for a in held),
                                             torch.cuda.mem_get_info(self.device)[0] if cuda else 0)
            pinned = cuda and not self.on_device
        else:
            self.on_device, pinned = False, loader.pin_memory if loader.pin_memory is not None else cuda
        self.spec = BatchSpec(size=self.run.micro_batch, device=self.device, items=self.work.items,
                              channels_last=channels_last, pinned=pinned, collate_fn=self.work.collate_fn)
        self.batches = self._source(train, persistent=loader.persistent_workers)
        if not self.in_memory:
            check_workers(loader, torch.get_num_threads(), self.env)
        self.loader_info = loader_info("memory" if self.in_memory else "dataloader", loader, pinned)
        prefetch = cuda and not self.on_device and (t.prefetch if t.prefetch is not None else True)
        return FastPath(data_on_device=self.on_device, channels_last=channels_last, compile=t.compile,
                        pinned_memory=pinned, cudnn_benchmark=cudnn_benchmark, prefetch=prefetch)

    def _source(self, dataset, persistent: bool) -> InMemoryBatches | LoaderBatches:
        """A split's batches: in memory when the training's are and the split offers its arrays, else through the
        DataLoader (its workers kept between passes when `persistent`)."""
        if self.in_memory and callable(getattr(dataset, "arrays", None)):
            return InMemoryBatches(dataset, self.spec, self.on_device)
        loader = replace(self.run.loader, persistent_workers=persistent)
        return LoaderBatches(dataset, self.spec, loader, worker_seed=self.run.trainer.seed * 1000 + self.env.rank)

    def _wrap_model(self, model: torch.nn.Module) -> Parallel:
        """The model on its device (NHWC if chosen), spread over the ranks (pipeline.job.parallel); the timer marks
        the comm phase when there are several ranks: DDP's from its gradients, FSDP's from its collectives."""
        if self.fast_path.channels_last:
            model.to(memory_format=torch.channels_last)
        parallel = parallelize(model, self.run, self.device, self.precision, self.fast_path.compile)
        if self.env.world_size > 1:  # one rank communicates with nobody: no comm phase to mark (StepTimer.watch)
            if parallel.sharded:
                self.timer.clock = parallel.clock
            else:
                self.timer.watch(parallel.raw)
        return parallel

    def _make_observers(self, tensorboard_dir: Path) -> None:
        """Rank 0's TensorBoard writer; the profiler's and NVTX's named ranges around the phases."""
        run, cuda = self.run, self.device.type == "cuda"
        self.metrics = make_logger(run.trainer.tensorboard, self.env.rank == 0, tensorboard_dir)
        p = run.profiler
        self.phases = Phases(profiling=p.enabled and (p.ranks is None or self.env.rank in p.ranks), nvtx=p.nvtx,
                             cuda=cuda)
        if self.phases.profiling or self.phases.nvtx:
            self.timer.on_grads_ready = self.phases.begin_wait

    # ------------------------------------------------------------------------------------ before and after
    def sample_batch(self, n: int = 2) -> Batch:
        """The first `n` training samples as a batch on the device, collated as the DataLoader would."""
        items = [self.work.train_set[i] for i in range(min(n, len(self.work.train_set)))]
        spec = self.spec
        return to_device(collate(items, spec.items, spec.collate_fn), spec.device, False, spec.memory_format)

    def check_on_samples(self) -> None:
        """The model and the loss on two training samples, before training: the first time they meet the data, so
        a misfit is reported here, naming them (and where the logits are is found: the record's io)."""
        batch = self.sample_batch(2)
        try:
            with torch.no_grad(), self.autocast:
                self.io.loss_and_logits(self.raw_model, batch)
            self.parallel.reshard()
        except Exception as e:
            x, y = batch.inputs, batch.targets
            extra = f", and {', '.join(batch.extra)} as keywords" if batch.extra else ""
            hint = ""
            if self.io.own_loss and isinstance(e, TypeError) and "argument" in str(e):
                given = self.work.loss_fn.targets_as
                hint = (f" (loss=model passes the targets as the keyword loss.targets_as={given}: set it to the "
                        "name the model's forward takes, or null to pass them positionally)" if given else
                        " (loss=model passes the targets positionally after the input, loss.targets_as=null)")
            raise RuntimeError(f"rank {self.env.rank}: model._target_={target_of(self.run.model)} and loss._target_="
                               f"{target_of(self.run.loss)} could not train on a batch of dataset._target_="
                               f"{target_of(self.run.dataset)} (inputs {tuple(x.shape)} {x.dtype}, targets "
                               f"{tuple(y.shape)} {y.dtype}{extra}): {type(e).__name__}: {e}{hint}") from e

    def count_flops(self) -> float:
        """FLOPs per training sample (forward and backward, torch's flop counter), on two samples."""
        from pipeline.job.flops import flops_per_sample

        batch = self.sample_batch(2)
        return flops_per_sample(self.raw_model, lambda: self.io.loss_and_logits(self.raw_model, batch)[0],
                                len(batch.inputs), self.autocast)

    def weights(self) -> dict:
        """The trained model's state_dict on the CPU: it loads with a plain torch.load into the model as built, on
        any machine (a login node, a laptop), not only where there is a GPU. A sharded model's is gathered whole on
        rank 0 (every rank takes part; the others get {})."""
        self.parallel.sync_buffers()
        if self.parallel.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.raw_model, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}

    def tokens_per_sample(self) -> int | None:
        """A token model's tokens per sample: the input's length when inputs are integer token ids."""
        x = torch.as_tensor(self.work.items.split(self.work.train_set[0]).inputs)
        return None if x.is_floating_point() or x.dim() != 1 else int(x.numel())

    # ------------------------------------------------------------------------------------------ training
    def save_checkpoint(self, step: int) -> Path:
        """The checkpoint at a step boundary (rank 0's under DDP, every rank's share under FSDP); returns its
        path."""
        self.parallel.sync_buffers()
        self.checkpoints.save(model=self.raw_model, optimizer=self.optimizer, scheduler=self.scheduler, step=step,
                              segments=[*self.segments, segment(self.start_step, self.timer.phases())])
        return self.checkpoints.path

    def fit(self, stop: StopSignal | None = None) -> TrainOutcome:
        """Train from the start (or resumed) step to the last; raises Interrupted on rank 0 at the first step
        boundary after `stop` caught its signal. A loss that is not finite ends training on every rank at the next
        finite check: the outcome then says where it diverged."""
        self._announce()
        self.model.train()
        p = self.run.profiler
        profiler = make_profiler(self.phases.profiling, self.env.rank, self.run.trainer.warmup_steps, p.steps,
                                 self.point_dir)
        loss = torch.zeros((), device=self.device)
        self._window = (time.perf_counter(), self.start_step)  # where the next logged rate is measured from
        self._progress_at = -PROGRESS_EVERY_S
        batches, done = self._batches(), self.start_step
        self.timer.start()
        try:
            with profiler or contextlib.nullcontext():
                while True:
                    with self.phases.range("data"):
                        step_batch = next(batches, None)
                    if step_batch is None:
                        break
                    step, epoch, batch = step_batch
                    loss = self.train_step(step, batch)
                    if profiler is not None:
                        profiler.step()
                    done = step + 1
                    self._after_step(done, epoch, loss, stop)
        except Diverged as e:
            log.error("%s", e)
            return self._finish(done, None, diverged_at=e.step)
        except RuntimeError as e:
            if "find_unused_parameters=True" in str(e) and not self.run.ddp.find_unused_parameters:
                raise RuntimeError(f"rank {self.env.rank}: some parameters of model._target_="
                                   f"{target_of(self.run.model)} got no gradient in step {done}: set "
                                   "ddp.find_unused_parameters=true (DDP then looks for them every step), or make "
                                   f"the loss use them. DDP said: {e}") from e
            raise
        return self._finish(done, loss)

    def _announce(self) -> None:
        if self.env.rank == 0:
            log.info("training %d steps (%d per epoch), per-rank batch %d, global batch %d, %d ranks, batches from %s",
                     self.total_steps, self.steps_per_epoch, self.batch, self.run.global_batch, self.env.world_size,
                     "the DataLoader" if self.loader_info.kind == "dataloader" else "memory")

    def _batches(self):
        """(step, epoch, micro-batches) for every step still to take, on the device. A step takes the next
        `self.batch` samples of the sampler's order for (seed, epoch), in `self.accum` micro-batches, so a run
        resumed at any step takes the batches an uninterrupted one would, and in strong scaling every world size
        takes the same samples in a step (only which rank takes which changes)."""
        step = self.start_step
        while step < self.total_steps:
            epoch, first = divmod(step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)[first * self.batch:self.steps_per_epoch * self.batch]
            micro = []
            for batch in self._ahead(self.batches.batches(order, drop_last=True)):
                micro.append(batch)
                if len(micro) < self.accum:
                    continue
                yield step, epoch, micro
                micro = []
                step += 1
                if step == self.total_steps:
                    return

    def _ahead(self, batches):
        """The batches, the next one's copy to the GPU on a side stream while this one trains (fast_path.prefetch)."""
        return prefetched(batches, self.device) if self.fast_path.prefetch else batches

    def train_step(self, step: int, micro_batches: list[Batch]) -> torch.Tensor:
        """One optimizer step on its micro-batches, each loss scaled by 1 / their number (equal sizes: the mean
        over the step's samples), the gradients reduced on the last only (Parallel.sync); the timer marks the
        step's phases. Returns the loss (the mean over the micro-batches)."""
        phase, n = self.phases.range, len(micro_batches)
        self.dropout_rng.manual_seed(dropout_seed(self.run.trainer.seed, self.env.rank, step, self.env.world_size))
        self.timer.data_ready()
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            with self.parallel.sync(last):
                with phase("forward"), self.autocast:
                    loss, _ = self.io.loss_and_logits(self.model, batch)
                if n > 1:
                    self.timer.backward_begins(last)
                    loss = loss / n
                with phase("backward"):  # DDP waits for the gradient all-reduce before backward() returns
                    loss.backward()
                    self.phases.end_wait()
            total = loss.detach() if total is None else total + loss.detach()
        loss = total
        self.timer.backward_done()
        with phase("optimizer"):
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        self.timer.step_done()
        self.finite.note(step, loss)
        return loss

    def _after_step(self, done: int, epoch: int, loss: torch.Tensor, stop: StopSignal | None) -> None:
        """After `done` steps: note the first step's time; every rank: stop if a loss was not finite; rank 0: stop
        if asked, checkpoint, report."""
        if self.first_step_at is None:
            self.first_step_at = time.time()
        if done == self.start_step + self.run.trainer.warmup_steps and self.parallel.clock is not None:
            self._counted = (dict(self.parallel.clock.calls), dict(self.parallel.clock.bytes))
        sharded, caught = self.parallel.sharded, stop.received if stop is not None else None
        # a sharded checkpoint is every rank's: they agree at each finite check whether any caught the stop signal
        # (Slurm signals every task, not at the same step), and save together; DDP's rank 0 saves alone, at once
        signum = None if sharded else caught
        if self.finite.due(done, self.total_steps):
            bad, agreed = self.finite.check(caught if sharded else None)
            if bad is not None:
                raise Diverged(bad)
            signum = agreed if sharded else signum
        t = self.run.trainer
        checkpointing = sharded or self.env.rank == 0
        if checkpointing and signum:
            raise Interrupted(done, signum)
        if checkpointing and t.checkpoint_every and done % t.checkpoint_every == 0 and done < self.total_steps:
            self.save_checkpoint(done)
        if self.env.rank != 0:
            return
        if done % t.log_every == 0 or done == self.total_steps:
            self._report(done, epoch, loss)

    def _parallel_info(self, steps: int) -> ParallelInfo:
        """The record's parallel part, with rank 0's collectives per timed step where they were counted."""
        info, clock = self.parallel.info, self.parallel.clock
        timed = steps - self.start_step - self.run.trainer.warmup_steps
        if clock is None or timed <= 0:
            return info
        calls, sizes = per_step(clock.calls, self._counted[0], timed), per_step(clock.bytes, self._counted[1], timed)
        planned = {c.op: c for c in info.collectives}
        return replace(info, measured=[CollectiveVolume(op=op, group=planned[op].group if op in planned else "shard",
                                                        ranks=planned[op].ranks if op in planned else 0,
                                                        calls=calls[op], bytes=sizes[op]) for op in sorted(calls)])

    def _memory(self, missing: dict[str, str]) -> Memory | None:
        try:
            return measure_memory(self.raw_model, self.optimizer, self.device, self.work.baseline_rss)
        except Exception as e:  # /proc unreadable, a device query that fails: the record is written regardless
            missing["memory"] = f"{type(e).__name__}: {e}"[:500]
            return None

    def _finish(self, steps: int, loss: torch.Tensor | None, diverged_at: int | None = None) -> TrainOutcome:
        """The last step's loss averaged over ranks, the evaluation (not of a diverged model), and what the record
        needs of this rank's training."""
        missing, final_loss, evaluation = {}, None, None
        # before evaluating: the last step's gradients are still held, and the clock has counted training only
        memory, parallel = self._memory(missing), self._parallel_info(steps)
        if loss is not None:
            summed = loss.detach().float().clone()
            dist.all_reduce(summed)
            final_loss = summed.item() / self.env.world_size
        if diverged_at is not None:
            missing["evaluation"] = f"not evaluated: the run diverged at step {diverged_at}"
        else:
            evaluation = self._evaluation(steps, missing)
        return TrainOutcome(
            steps=steps, start_step=self.start_step, steps_per_epoch=self.steps_per_epoch, phases=self.timer.phases(),
            final_train_loss=final_loss if final_loss is not None and math.isfinite(final_loss) else None,
            evaluation=evaluation, segments=self._earlier_segments(), precision=self.precision,
            fast_path=self.fast_path, loader=self.loader_info, io=self.io.info(),
            optimizer=optimizer_info(self.optimizer),
            model_parameters=sum(p.numel() for p in self.raw_model.parameters()),
            gradient_bytes=gradient_bytes(self.raw_model), parameters_sha256=parameters_digest(self.raw_model),
            tokens_per_sample=self.tokens_per_sample(), first_step_at=self.first_step_at,
            parallel=parallel, memory=memory, diverged_at_step=diverged_at, missing=missing)

    def _earlier_segments(self) -> list[Segment]:
        """Rank 0's throughput in each stretch before a restart (each after its own warm-up)."""
        out, warmup, global_batch = [], self.run.trainer.warmup_steps, self.run.global_batch
        for seg in self.segments:
            phases = seg["phases"].numpy()
            timed = phases[warmup:, 0]
            out.append(Segment(start_step=seg["start_step"], steps=len(phases), timed_steps=len(timed),
                               throughput_samples_per_s=float(global_batch * len(timed) / timed.sum()) if len(timed)
                               else None))
        return out

    def _evaluation(self, steps: int, missing: dict[str, str]) -> Evaluation | None:
        """The evaluation, logged to TensorBoard; a failure is recorded as missing (the record is still written)."""
        try:
            evaluation = self.evaluate()
        except EvaluationFailed as e:
            missing["evaluation"] = str(e)
            return None
        if evaluation is not None:
            self.metrics.log({f"test/{evaluation.metric}": evaluation.value, "test/loss": evaluation.loss}, steps)
        return evaluation

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
                           loss=value if math.isfinite(value) else None)
            self._progress_at = now
        self._window = (now, step)

    def close_metrics(self, hparams: dict, figures: dict[str, float]) -> None:
        """TensorBoard's HParams view (the run's overrides beside its final figures), then the writer closed."""
        self.metrics.hparams(hparams, figures)
        self.metrics.close()

    def close(self) -> None:
        """Stop what outlives training: DataLoader worker processes (persistent ones wait for the next epoch)."""
        if isinstance(self.batches, LoaderBatches):
            self.batches.close()

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Evaluation | None:
        """The held-out split (its first trainer.eval_samples samples, if set), every world_size-th sample on each
        rank, through the training's batching code; the sums are reduced over ranks. Accuracy when the logits
        score classes per sample (or per position) against integer labels, perplexity = exp(mean token loss) when
        they score a dataset's vocabulary at every position (a language model), else the loss alone. Targets of
        -100 are skipped, as torch's and Hugging Face's losses skip them. A failure on any rank is raised on every
        rank as EvaluationFailed (none waits for another in a collective)."""
        test = self.work.test_set
        if test is None:
            return None
        self.parallel.sync_buffers()
        self.model.eval()
        n = min(len(test), self.run.trainer.eval_samples) if self.run.trainer.eval_samples else len(test)
        # loss x targets, targets, correct, scored (classifier), scored (language model), failed
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        error = ""
        try:
            shard = range(self.env.rank, n, self.env.world_size)
            for batch in self._ahead(self._source(test, persistent=False).batches(shard, drop_last=False)):
                with self.autocast:
                    loss, logits = self.io.loss_and_logits(self.raw_model, batch)
                self._score(sums, loss, logits, batch.targets, getattr(test, "vocab_size", None))
        except Exception as e:
            log.error("rank %d: evaluation failed: %s: %s", self.env.rank, type(e).__name__, e)
            error = f"evaluation failed on rank {self.env.rank}: {type(e).__name__}: {e}"[:500]
            sums.zero_()
            sums[5] = 1
        self.parallel.reshard()
        dist.all_reduce(sums)
        if sums[5] > 0:
            raise EvaluationFailed(error or f"evaluation failed on {int(sums[5])} other rank(s) (their logs say why)")
        mean_loss = (sums[0] / sums[1]).item() if sums[1] > 0 else math.nan
        if sums[4] > 0 and sums[3] == 0:
            metric, value = "perplexity", math.exp(mean_loss) if mean_loss < 700 else math.inf
        elif sums[3] > 0 and sums[4] == 0:
            metric, value = "accuracy", (sums[2] / sums[3]).item()
        else:
            metric, value = "loss", mean_loss
        if not (math.isfinite(mean_loss) and math.isfinite(value)):
            raise EvaluationFailed(f"the evaluation's {metric} is not finite ({value})")
        return Evaluation(split="test", samples=n, loss=mean_loss, metric=metric, value=value)

    @staticmethod
    def _score(sums: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor | None, y: torch.Tensor,
               vocab: int | None) -> None:
        """Add one batch to the evaluation's sums (see evaluate)."""
        valid = y != IGNORE_INDEX if not y.is_floating_point() else torch.ones_like(y, dtype=torch.bool)
        count = valid.sum()
        sums[0] += loss.double() * count
        sums[1] += count
        if logits is None or y.is_floating_point() or logits.dim() != y.dim() + 1 or logits.shape[:-1] != y.shape:
            return
        if vocab is not None and y.dim() >= 2 and logits.shape[-1] >= vocab:
            sums[4] += count
        else:
            sums[2] += ((logits.argmax(dim=-1) == y) & valid).sum()
            sums[3] += count

