"""The training loop: one rank's view, under DDP, FSDP or HSDP (pipeline.job.parallel). It takes every step in
`trainer.grad_accum_steps` micro-batches, times it, stops the run when a loss is not finite (all ranks together),
and evaluates the model on the held-out split at the end (pipeline.job.evaluate), and every trainer.eval_every steps
if set, where a search's pruner may stop it. What the trainer was set up with
(`TrainingSetup`) and what training produced (`TrainOutcome`) are the record's parts (pipeline.job.record)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import target_of
from pipeline.job.build import Workload, build_optimizer, build_scheduler, optimizer_info
from pipeline.job.checkpoint import Checkpoints, segment
from pipeline.job.context import Job
from pipeline.job.data import Batch, Batches
from pipeline.job.evaluate import EvaluationFailed, Evaluator
from pipeline.job.memory import measure as measure_memory
from pipeline.job.model_io import ModelIO
from pipeline.job.observe import Phases, Reporter, make_profiler
from pipeline.job.parallel import Parallel, gradient_bytes, parallelize, parameters_digest
from pipeline.job.preemption import Interrupted, StopSignal
from pipeline.job.stream import StreamOrder
from pipeline.job.timing import StepTimer
from pipeline.result import (Evaluation, FastPath, LoaderInfo, Memory, ModelIOInfo, OptimizerInfo, ParallelInfo,
                             Segment, StepEvaluation)

log = logging.getLogger(__name__)
# rank 0's judge of an evaluation during training (a search's pruner, pipeline.search.study.TrialJudge): True stops
# the training after that step
Judge = Callable[[int, Evaluation], bool]


@dataclass(frozen=True)
class TrainingSetup:
    """How this rank trains, as set up before its first step (the io's reading of the output once it has met one)."""

    precision: str  # what the steps run in: fp32 or bf16
    steps_per_epoch: int | None  # None: a stream whose first epoch's end the run did not reach
    fast_path: FastPath
    loader: LoaderInfo
    io: ModelIOInfo
    optimizer: OptimizerInfo
    model_parameters: int
    gradient_bytes: int
    tokens_per_sample: int | None


@dataclass(frozen=True)
class TrainOutcome:
    """What one rank's training produced."""

    steps: int  # steps done: the planned total, or fewer when the run diverged
    start_step: int  # > 0 when this run resumed from a checkpoint
    phases: np.ndarray  # (steps - start_step, 4) seconds: step, data, compute, comm
    final_train_loss: float | None  # the last step's, averaged over ranks; None when it was not finite
    evaluation: Evaluation | None  # None when the dataset holds nothing out, or it failed (see missing)
    segments: list[Segment]  # rank 0's throughput in the stretches before a restart (raw timings below)
    first_step_at: float | None  # unix time this process finished its first step
    parallel: ParallelInfo  # with the collectives as counted, where they were
    memory: Memory | None  # None when it could not be read (see missing)
    parameters_sha256: str
    evaluations: list[StepEvaluation] = field(default_factory=list)  # during training (trainer.eval_every)
    diverged_at_step: int | None = None
    pruned_at_step: int | None = None
    missing: dict[str, str] = field(default_factory=dict)


class Diverged(Exception):
    """A loss that was not finite, seen by every rank at the same check."""

    def __init__(self, step: int):
        super().__init__(f"the loss was not finite (NaN or infinite) at step {step}: the run diverged")
        self.step = step


class Pruned(Exception):
    """A search's pruner judged the evaluation at `step` unpromising; every rank learnt it at the same step."""

    def __init__(self, step: int):
        super().__init__(f"the search's pruner stopped the trial after its evaluation at step {step}")
        self.step = step


def dropout_seed(seed: int, rank: int, step: int, world_size: int) -> int:
    """A distinct seed per (rank, step), so a resumed run draws the same dropout masks as an uninterrupted one."""
    return (seed * 0x9E3779B1 + step * world_size + rank) % (2**63)


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
        if self.first is not None and step - self.first == self.every:
            # a full window that nobody checked (train_step called on its own, not by fit): checked now
            bad, _ = self.check()
            if bad is not None:
                raise Diverged(bad)
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
    """One rank's training, built in named steps (the steps to take, the batches, the model spread over the ranks,
    its optimizer and schedule, the state to resume), then `fit` takes `train_step` until the last step, evaluates,
    and returns a TrainOutcome."""

    def __init__(self, job: Job, work: Workload, checkpoints: Checkpoints, reporter: Reporter):
        self.job, self.work, self.checkpoints, self.reporter = job, work, checkpoints, reporter
        t = job.run.trainer
        self.precision = t.precision if t.precision != "auto" else ("bf16" if job.cuda else "fp32")
        self.io = ModelIO(job.run.io, work.loss_fn, work.data.kind)
        self.batches = Batches(job, work.data, work.model)
        self.order = self.batches.order()
        self.timer = StepTimer(job.device)
        self.parallel = self._wrap_model(work.model)
        # after wrapping: FSDP's sharded parameters are not the ones the model was built with
        self.optimizer = build_optimizer(job.run, self.parallel.raw, job.rank, job.device)
        self.scheduler = build_scheduler(job.run, self.optimizer, self.order.total_steps, job.rank)
        if self.parallel.info.param_dtype == "bf16":
            self.precision = "bf16"  # FSDP's blocks compute in bf16 (parallel.param_dtype), whatever autocast does
        self.autocast = torch.autocast(job.device.type, dtype=torch.bfloat16, enabled=self.parallel.autocast)
        # the generator dropout draws from; reseeding it alone costs ~1 us, torch.manual_seed ~190 us
        self.dropout_rng = torch.cuda.default_generators[job.device.index] if job.cuda else torch.default_generator
        self.start_step, self.segments, streams = checkpoints.restore(self.parallel.raw, self.optimizer,
                                                                      self.scheduler)
        if isinstance(self.order, StreamOrder):
            self.order.restore(streams, self.start_step)
        # a sharded checkpoint, or a stream's positions, are every rank's: the ranks agree at each finite check
        # whether any caught the stop signal (Slurm signals every task, not at the same step), and save together.
        # In a container too: no rank can requeue the job there (no scontrol), so every rank stops at the same step
        # and exits to be continued, and the step's exit status tells the batch script, on the host, to requeue
        self.together = self.parallel.sharded or work.data.stream or job.run.cluster.container.image is not None
        if self.start_step and job.is_rank0:
            log.info("resumed from %s at step %d", checkpoints.loaded, self.start_step)
        self.finite = FiniteCheck(t.finite_check_every, job.device, job.world_size)
        self.phases = self._phases()
        self.evaluator = Evaluator(job, work.data.test_set, work.data.evaluation_source, self.batches, self.io,
                                   self.autocast)
        # the evaluations during training (trainer.eval_every): the earlier stretches' (kept in the checkpoint), then
        # this one's; one that failed is noted in `missed`
        self.evaluations = [StepEvaluation(**e) for seg in self.segments for e in seg.get("evaluations", [])]
        self.missed: dict[str, str] = {}
        self.first_step_at: float | None = None

    # ------------------------------------------------------------------------------------------ set-up steps
    def _wrap_model(self, model: torch.nn.Module) -> Parallel:
        """The model on its device (NHWC if chosen), spread over the ranks (pipeline.job.parallel); the timer marks
        the comm phase when there are several ranks: DDP's from its gradients, FSDP's from its collectives."""
        if self.batches.fast_path.channels_last:
            model.to(memory_format=torch.channels_last)
        parallel = parallelize(model, self.job.run, self.job.device, self.precision, self.batches.fast_path.compile)
        if self.job.world_size > 1:  # one rank communicates with nobody: no comm phase to mark (StepTimer.watch)
            if parallel.sharded:
                self.timer.clock = parallel.clock
            else:
                self.timer.watch(parallel.raw)
        return parallel

    def _phases(self) -> Phases:
        """The profiler's and NVTX's named ranges around the phases, on the ranks profiled."""
        p = self.job.run.profiler
        phases = Phases(profiling=p.enabled and (p.ranks is None or self.job.rank in p.ranks), nvtx=p.nvtx,
                        cuda=self.job.cuda)
        if phases.profiling or phases.nvtx:
            self.timer.on_grads_ready = phases.begin_wait
        return phases

    # ------------------------------------------------------------------------------------ before and after
    def check_on_samples(self) -> None:
        """The model and the loss on two training samples, before training: the first time they meet the data, so
        a misfit is reported here, naming them (and where the logits are is found: the record's io)."""
        batch = self.batches.sample(2)
        try:
            with torch.no_grad(), self.autocast:
                self.io.loss_and_logits(self.parallel.raw, batch)
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
            run = self.job.run
            raise RuntimeError(f"rank {self.job.rank}: model._target_={target_of(run.model)} and loss._target_="
                               f"{target_of(run.loss)} could not train on a batch of dataset._target_="
                               f"{target_of(run.dataset)} (inputs {tuple(x.shape)} {x.dtype}, targets "
                               f"{tuple(y.shape)} {y.dtype}{extra}): {type(e).__name__}: {e}{hint}") from e

    def count_flops(self) -> float:
        """FLOPs per training sample (forward and backward, torch's flop counter), on two samples."""
        from pipeline.job.flops import flops_per_sample

        batch, raw = self.batches.sample(2), self.parallel.raw
        return flops_per_sample(raw, lambda: self.io.loss_and_logits(raw, batch)[0], len(batch.inputs), self.autocast)

    def setup(self) -> TrainingSetup:
        raw = self.parallel.raw
        return TrainingSetup(precision=self.precision, steps_per_epoch=self.order.steps_per_epoch,
                             fast_path=self.batches.fast_path, loader=self.batches.info, io=self.io.info(),
                             optimizer=optimizer_info(self.optimizer),
                             model_parameters=sum(p.numel() for p in raw.parameters()),
                             gradient_bytes=gradient_bytes(raw), tokens_per_sample=self.batches.tokens_per_sample())

    def close(self) -> None:
        self.batches.close()

    # ------------------------------------------------------------------------------------------ training
    def save_checkpoint(self, step: int) -> Path:
        """The checkpoint at a step boundary (rank 0's under DDP, every rank's share under FSDP, with every rank's
        position in a stream, gathered to rank 0); returns its path."""
        self.parallel.sync_buffers()
        streams = None
        if isinstance(self.order, StreamOrder):
            streams = [None] * self.job.world_size if self.job.is_rank0 else None
            dist.gather_object(self.order.state(), streams, dst=0)
        alone = self.together and not self.parallel.sharded and dist.is_initialized()  # all here, rank 0 saves
        if alone and not self.job.is_rank0:
            dist.barrier()  # none leaves before rank 0 has saved: srun --kill-on-bad-exit would stop it mid-write
            return self.checkpoints.path
        self.checkpoints.save(model=self.parallel.raw, optimizer=self.optimizer, scheduler=self.scheduler, step=step,
                              segments=[*self.segments, segment(self.start_step, self.timer.phases(), [
                                  asdict(e) for e in self.evaluations if e.step > self.start_step])],
                              streams=streams)
        if alone:
            dist.barrier()
        return self.checkpoints.path

    def fit(self, stop: StopSignal | None = None, judge: Judge | None = None) -> TrainOutcome:
        """Train from the start (or resumed) step to the last; raises Interrupted on rank 0 at the first step
        boundary after `stop` caught its signal. A loss that is not finite ends training on every rank at the next
        finite check: the outcome then says where it diverged. Rank 0's `judge` sees each evaluation during
        training (trainer.eval_every) and may stop it there: the outcome then says where it was pruned."""
        job, order = self.job, self.order
        self.reporter.start(self.start_step, order.total_steps, order.steps_per_epoch, self.batches.info.kind)
        self.parallel.wrapped.train()
        profiler = make_profiler(self.phases.profiling, job.rank, job.run.trainer.warmup_steps,
                                 job.run.profiler.steps, job.point_dir)
        loss = torch.zeros((), device=job.device)
        steps, done = order.steps(self.start_step, self.batches), self.start_step
        self.timer.start()
        try:
            if done and self._evaluation_due(done) and all(e.step != done for e in self.evaluations):
                # resumed from a checkpoint saved before its step's evaluation (the stop signal came first)
                self._evaluate_during(done, judge)
            with profiler or contextlib.nullcontext():
                while True:
                    with self.phases.range("data"):
                        step_batch = next(steps, None)
                    if step_batch is None:
                        break
                    step, epoch, batch = step_batch
                    loss = self.train_step(step, batch)
                    if profiler is not None:
                        profiler.step()
                    done = step + 1
                    self._after_step(done, epoch, loss, stop)
                    if self._evaluation_due(done):
                        self._evaluate_during(done, judge)
        except Diverged as e:
            log.error("%s", e)
            return self._finish(done, None, diverged_at=e.step)
        except Pruned as e:
            log.warning("%s", e)
            # pruned at the evaluation a resumed run makes first: no step of its own, no loss
            return self._finish(done, loss if done > self.start_step else None, pruned_at=e.step)
        except RuntimeError as e:
            if "find_unused_parameters=True" in str(e) and not job.run.ddp.find_unused_parameters:
                raise RuntimeError(f"rank {job.rank}: some parameters of model._target_={target_of(job.run.model)} got "
                                   f"no gradient in step {done}: set ddp.find_unused_parameters=true (DDP then looks "
                                   f"for them every step), or make the loss use them. DDP said: {e}") from e
            raise
        return self._finish(done, loss)

    def train_step(self, step: int, micro_batches: list[Batch]) -> torch.Tensor:
        """One optimizer step on its micro-batches, each loss scaled by 1 / their number (equal sizes: the mean
        over the step's samples), the gradients reduced on the last only (Parallel.sync); the timer marks the
        step's phases. Returns the loss (the mean over the micro-batches)."""
        phase, n = self.phases.range, len(micro_batches)
        job = self.job
        self.dropout_rng.manual_seed(dropout_seed(job.run.trainer.seed, job.rank, step, job.world_size))
        self.timer.data_ready()
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            with self.parallel.sync(last):
                with phase("forward"), self.autocast:
                    loss, _ = self.io.loss_and_logits(self.parallel.wrapped, batch)
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
        """After `done` steps: note the first step's time; every rank: stop if a loss was not finite; the ranks that
        checkpoint: stop if asked, checkpoint when due; rank 0: report."""
        job, t = self.job, self.job.run.trainer
        if self.first_step_at is None:
            self.first_step_at = time.time()
        if done == self.start_step + t.warmup_steps:
            self.parallel.end_warmup()
        together, caught = self.together, stop.received if stop is not None else None
        # self.together: the ranks agree on the stop signal at each finite check and save together; otherwise
        # DDP's rank 0 saves alone, at once
        signum = None if together else caught
        if self.finite.due(done, self.order.total_steps):
            bad, agreed = self.finite.check(caught if together else None)
            if bad is not None:
                raise Diverged(bad)
            signum = agreed if together else signum
        checkpointing = together or job.is_rank0
        if checkpointing and signum:
            raise Interrupted(done, signum)
        if checkpointing and t.checkpoint_every and done % t.checkpoint_every == 0 and done < self.order.total_steps:
            self.save_checkpoint(done)
        if self.reporter.due(done):
            self.reporter.step(done, epoch, loss, self.optimizer.param_groups[0]["lr"], self.timer)

    def _evaluation_due(self, done: int) -> bool:
        every = self.job.run.trainer.eval_every
        return bool(every) and done % every == 0 and done < self.order.total_steps  # the last step's: _finish's

    def _evaluate_during(self, done: int, judge: Judge | None) -> None:
        """The evaluation after `done` steps, the step timer stopped meanwhile (no step's time includes it); rank 0's
        judge sees it, and every rank learns its verdict at once: Pruned stops them all at this step. One that
        fails is noted in the record's missing, and training goes on."""
        try:
            evaluation = self.evaluator.evaluate(self.parallel)
        except EvaluationFailed as e:
            log.warning("the evaluation after step %d failed: %s", done, e)
            self.missed["evaluations"] = f"the evaluation after step {done} failed: {e}"
            evaluation = None
        self.parallel.wrapped.train()
        if evaluation is not None:
            self._keep(evaluation, done)
        verdict = torch.tensor([float(judge is not None and evaluation is not None and judge(done, evaluation))],
                               device=self.job.device)
        dist.broadcast(verdict, src=0)
        self.timer.start()  # the next step's clock starts now, not at the last step's end
        if verdict.item():
            raise Pruned(done)

    def _keep(self, evaluation: Evaluation, step: int) -> None:
        self.evaluations.append(StepEvaluation(step=step, samples=evaluation.samples, loss=evaluation.loss,
                                               metric=evaluation.metric, value=evaluation.value))
        self.reporter.evaluation(evaluation, step)

    def _finish(self, steps: int, loss: torch.Tensor | None, diverged_at: int | None = None,
                pruned_at: int | None = None) -> TrainOutcome:
        """The last step's loss averaged over ranks, the evaluation (not of a diverged model; of a pruned one, the
        evaluation it was pruned after), and what the record needs of this rank's training."""
        missing, final_loss, evaluation = {**self.missed, **self.reporter.metrics.failures()}, None, None
        # before evaluating: the last step's gradients are still held, and the clock has counted training only
        memory = self._memory(missing)
        parallel = self.parallel.measured_info(steps - self.start_step - self.job.run.trainer.warmup_steps)
        if loss is not None:
            summed = loss.detach().float().clone()
            dist.all_reduce(summed)
            final_loss = summed.item() / self.job.world_size
        if diverged_at is not None:
            missing["evaluation"] = f"not evaluated: the run diverged at step {diverged_at}"
        elif pruned_at is not None:
            last = self.evaluations[-1]
            evaluation = Evaluation(split=self.evaluator.source or "test", samples=last.samples, loss=last.loss,
                                    metric=last.metric, value=last.value)
        else:
            evaluation = self._evaluation(steps, missing)
        return TrainOutcome(
            steps=steps, start_step=self.start_step, phases=self.timer.phases(),
            final_train_loss=final_loss if final_loss is not None and math.isfinite(final_loss) else None,
            evaluation=evaluation, segments=self._earlier_segments(), first_step_at=self.first_step_at,
            parallel=parallel, memory=memory, parameters_sha256=parameters_digest(self.parallel.raw),
            evaluations=list(self.evaluations), diverged_at_step=diverged_at, pruned_at_step=pruned_at,
            missing=missing)

    def _memory(self, missing: dict[str, str]) -> Memory | None:
        try:
            return measure_memory(self.parallel.raw, self.optimizer, self.job.device, self.work.baseline_rss)
        except Exception as e:  # /proc unreadable, a device query that fails: the record is written regardless
            missing["memory"] = f"{type(e).__name__}: {e}"[:500]
            return None

    def _evaluation(self, steps: int, missing: dict[str, str]) -> Evaluation | None:
        """The evaluation, reported; a failure is recorded as missing (the record is still written)."""
        try:
            evaluation = self.evaluator.evaluate(self.parallel)
        except EvaluationFailed as e:
            missing["evaluation"] = str(e)
            return None
        if evaluation is None and not self.job.run.evaluate.enabled:
            missing["evaluation"] = "not evaluated: evaluate.enabled=false"
        if evaluation is not None:
            if self.job.run.trainer.eval_every:
                self._keep(evaluation, steps)  # the history's last point
            else:
                self.reporter.evaluation(evaluation, steps)
        return evaluation

    def _earlier_segments(self) -> list[Segment]:
        """Rank 0's throughput in each stretch before a restart (each after its own warm-up)."""
        out, warmup, global_batch = [], self.job.run.trainer.warmup_steps, self.job.run.global_batch
        for seg in self.segments:
            phases = seg["phases"].numpy()
            timed = phases[warmup:, 0]
            out.append(Segment(start_step=seg["start_step"], steps=len(phases), timed_steps=len(timed),
                               throughput_samples_per_s=float(global_batch * len(timed) / timed.sum()) if len(timed)
                               else None))
        return out
