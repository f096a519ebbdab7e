"""What rank 0 shows while a run goes on: a log line, its figures (TensorBoard's scalars and the run folder's
metrics.jsonl) and a progress file every trainer.log_every steps (`Reporter`), and torch.profiler traces with the
training phases as named ranges (NVTX too, for Nsight Systems, when asked)."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import uuid
from pathlib import Path

import torch

from pipeline.job.context import Job
from pipeline.job.timing import StepTimer
from pipeline.job.tracking import make_trackers
from pipeline.result import Evaluation
from pipeline.rundir import METRICS_NAME, PROFILE_DIR, TENSORBOARD_DIR, MetricsRow, Point, Progress, utc_now

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 1.0


class NullLogger:
    def start(self, step: int) -> None:
        pass

    def log(self, metrics: dict, step: int) -> None:
        pass

    def failures(self) -> dict[str, str]:
        """What the sink could not write, and why: the record's `missing`."""
        return {}

    def hparams(self, hparams: dict, metrics: dict) -> None:
        pass

    def end(self, status: str, figures: dict[str, float], files: list[Path]) -> None:
        """The run has ended as `status` (the record's, or failed, preempted): its final figures and files."""

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    def __init__(self, folder: Path):
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.summary = SummaryWriter(str(folder)), Summary

    def log(self, metrics: dict, step: int) -> None:
        """All of a step's scalars as one event: a quarter of add_scalar's cost per scalar (one event each), which
        a fast step notices (benchmarks/step_costs.py)."""
        values = [self.summary.Value(tag=name, simple_value=float(value)) for name, value in metrics.items()]
        self.writer._get_file_writer().add_summary(self.summary(value=values), step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """The run's overrides and final figures, for TensorBoard's HParams view (a sweep's runs side by side),
        into this run's own folder (SummaryWriter.add_hparams would open another)."""
        from torch.utils.tensorboard.summary import hparams as summaries

        for summary in summaries(hparams, metrics):
            self.writer._get_file_writer().add_summary(summary)
        self.log(metrics, 0)

    def close(self) -> None:
        self.writer.close()


class MetricsFile(NullLogger):
    """POINT_DIR/metrics.jsonl: every figure the run reports, a line per report (MetricsRow), appended and never
    rewritten, across restarts: complete whatever tracker is configured, or none. A line that cannot be written (a
    full disk) ends the file's writing, with a warning and the record's missing.metrics; training goes on."""

    def __init__(self, point_dir: Path):
        self.path, self.segment, self.start_step, self.file = point_dir / METRICS_NAME, uuid.uuid4().hex[:12], 0, None
        self.failed: str | None = None

    def start(self, step: int) -> None:
        self.start_step = step
        try:
            self.file = open(self.path, "ab")
            if self.file.tell() and self.path.read_bytes()[-1:] != b"\n":  # an earlier process killed mid-line
                self.file.write(b"\n")
        except OSError as e:
            log.warning("%s cannot be written: %s; the run's figures go to TensorBoard only", self.path, e)
            self.failed = f"{self.path} could not be written: {e}"

    def log(self, metrics: dict, step: int) -> None:
        if self.file is None:
            return
        try:
            self.file.write(MetricsRow(step=step, segment=self.segment, start_step=self.start_step, unix=time.time(),
                                       values={k: float(v) for k, v in metrics.items()}).line())
            self.file.flush()
        except OSError as e:
            log.warning("%s: a line could not be written (%s): no more are", self.path, e)
            self.failed = f"{self.path}: the line of step {step} and those after could not be written: {e}"
            self.close()

    def failures(self) -> dict[str, str]:
        return {"metrics": self.failed} if self.failed else {}

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None


class Loggers(NullLogger):
    """Every sink of the run's figures, each told the same."""

    def __init__(self, sinks: list[NullLogger]):
        self.sinks = sinks

    def start(self, step: int) -> None:
        for sink in self.sinks:
            sink.start(step)

    def log(self, metrics: dict, step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        for sink in self.sinks:
            sink.hparams(hparams, metrics)

    def end(self, status: str, figures: dict[str, float], files: list[Path]) -> None:
        for sink in self.sinks:
            sink.end(status, figures, files)

    def failures(self) -> dict[str, str]:
        """What every sink could not write; two trackers' under one key (`tracking`), both said."""
        out: dict[str, str] = {}
        for sink in self.sinks:
            for key, why in sink.failures().items():
                out[key] = f"{out[key]}; {why}" if key in out else why
        return out

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def tensorboard_dir(point: Point, point_dir: Path) -> Path:
    """SWEEP_DIR/tensorboard/<the point's overrides>: `tensorboard --logdir SWEEP_DIR/tensorboard` names each run
    by what differs between them (a single run's sweep folder is its own)."""
    name = ",".join(o for o in point.overrides if not o.startswith(("hydra.", "hydra/"))) or "defaults"
    name = re.sub(r"[^A-Za-z0-9_.,=+@:\-\[\]]", "_", name)[:150]
    return Path(point.sweep_dir or point_dir) / TENSORBOARD_DIR / f"{point.point:03d}_{name}"


def hparams_of(point: Point) -> dict:
    """The point's overrides as TensorBoard hyperparameters (numbers where they read as numbers)."""
    out = {}
    for o in point.overrides:
        key, _, value = o.lstrip("+~").partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def make_logger(enabled: bool, is_rank0: bool, folder: Path) -> NullLogger:
    """Rank 0's TensorBoard writer when asked for and installed; otherwise one that writes nothing."""
    if not (enabled and is_rank0):
        return NullLogger()
    try:
        return TensorBoardLogger(folder)
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard curves for this run "
                    "(pip install 'pipeline[tensorboard]', or set trainer.tensorboard=false to silence this)")
        return NullLogger()


def make_loggers(job: Job, tensorboard: Path) -> NullLogger:
    """Rank 0's sinks of the run's figures: the run folder's metrics.jsonl always, TensorBoard when asked for, each
    tracker of tracking=[...]."""
    if not job.is_rank0:
        return NullLogger()
    return Loggers([MetricsFile(job.point_dir), make_logger(job.run.trainer.tensorboard, True, tensorboard),
                    *make_trackers(job)])


def write_progress(point_dir: Path, *, step: int, total: int, samples_per_s: float, eta_s: float,
                   loss: float) -> None:
    """Rank 0's latest position, for `launch ... wait=true` and `pipeline.status` to show without ssh."""
    Progress(step=step, total_steps=total, samples_per_s=samples_per_s, eta_s=eta_s, loss=loss, updated_at=utc_now(),
             updated_unix=time.time()).write(point_dir, durable=False)


class Reporter:
    """Rank 0's account of a run as it goes: at the start what it trains, then every trainer.log_every steps (and the
    last) a log line, TensorBoard scalars (loss, samples/s, learning rate, the step's phases) and the progress file,
    the evaluation's figures, and at the end TensorBoard's HParams view. On the other ranks it says nothing."""

    def __init__(self, job: Job, tensorboard: Path):
        self.job = job
        self.metrics = make_loggers(job, tensorboard)
        self.total_steps, self.window, self.progress_at = 0, (0.0, 0), -PROGRESS_EVERY_S

    def start(self, start_step: int, total_steps: int, steps_per_epoch: int | None, loader: str) -> None:
        """Training begins at `start_step`: the next rate is measured from now."""
        run = self.job.run
        self.total_steps, self.window = total_steps, (time.perf_counter(), start_step)
        self.metrics.start(start_step)
        if self.job.is_rank0:
            epochs = f"{steps_per_epoch} per epoch" if steps_per_epoch else "each epoch to the stream's end"
            source = {"dataloader": "the DataLoader", "stream": "a stream (StatefulDataLoader)"}.get(loader, "memory")
            log.info("training %d steps (%s), per-rank batch %d, global batch %d, %d ranks, batches from %s",
                     total_steps, epochs, run.per_rank_batch, run.global_batch, self.job.world_size, source)

    def due(self, step: int) -> bool:
        return self.job.is_rank0 and (step % self.job.run.trainer.log_every == 0 or step == self.total_steps)

    def step(self, step: int, epoch: int, loss: torch.Tensor, lr: float, timer: StepTimer) -> None:
        """After `step` steps, when `due`: the samples/s since the last report, the ETA and the loss (its .item()
        waits for the step: a report's only sync)."""
        now, (since, since_step) = time.perf_counter(), self.window
        global_batch = self.job.run.global_batch
        rate = (step - since_step) * global_batch / (now - since)
        eta = (self.total_steps - step) * global_batch / rate
        value = loss.item()
        log.info("step %d/%d epoch %d loss %.4f %.0f samples/s ETA %.0f s", step, self.total_steps, epoch, value,
                 rate, eta)
        recent = timer.phases(last=step - since_step).mean(axis=0) * 1e3
        self.metrics.log({"train/loss": value, "train/samples_per_s": rate, "train/lr": lr,
                          "time/step_ms": recent[0], "time/data_ms": recent[1], "time/compute_ms": recent[2],
                          "time/comm_ms": recent[3]}, step)
        # the progress file's readers poll every few seconds: rewriting it more often than each second is waste (a
        # fast step notices, benchmarks/step_costs.py)
        if now - self.progress_at >= PROGRESS_EVERY_S or step == self.total_steps:
            write_progress(self.job.point_dir, step=step, total=self.total_steps, samples_per_s=rate, eta_s=eta,
                           loss=value if math.isfinite(value) else None)
            self.progress_at = now
        self.window = (now, step)

    def evaluation(self, evaluation: Evaluation, step: int) -> None:
        self.metrics.log({f"test/{evaluation.metric}": evaluation.value, "test/loss": evaluation.loss}, step)

    def end(self, status: str, figures: dict[str, float], files: list[Path]) -> None:
        """The run's end, as its record says (or failed, preempted): the trackers' runs end so."""
        self.metrics.end(status, figures, files)

    def close(self, hparams: dict, figures: dict[str, float]) -> None:
        """TensorBoard's HParams view (the run's overrides beside its final figures), then the writer closed."""
        self.metrics.hparams(hparams, figures)
        self.metrics.close()


class Phases:
    """Named ranges around the phases of a step, for torch.profiler (record_function) and Nsight Systems (NVTX).
    When neither is on, `range` is a no-op context, so an unprofiled step pays only a function call.

    `allreduce_wait` is opened when the last gradient is accumulated (the timer's hook; DDP launches its last
    bucket then) and closed when backward() returns: the same interval as the `comm` phase, nested in `backward`.
    On CUDA gradient hooks run on autograd's device thread, so there it is an NVTX range only (NVTX start/end may
    cross threads)."""

    WAIT = "allreduce_wait"

    def __init__(self, profiling: bool, nvtx: bool, cuda: bool):
        self.profiling, self.nvtx, self.cuda = profiling, nvtx and torch.cuda.is_available(), cuda
        self._wait = None

    def begin_wait(self) -> None:
        if self.nvtx:
            self._wait = ("nvtx", torch.cuda.nvtx.range_start(self.WAIT))
        elif self.profiling and not self.cuda:
            self._wait = ("profiler", torch.profiler.record_function(self.WAIT).__enter__())

    def end_wait(self) -> None:
        if self._wait is None:
            return
        kind, handle = self._wait
        if kind == "nvtx":
            torch.cuda.nvtx.range_end(handle)
        else:
            handle.__exit__(None, None, None)
        self._wait = None

    @contextlib.contextmanager
    def _ranges(self, name: str):
        with torch.profiler.record_function(name) if self.profiling else contextlib.nullcontext():
            if self.nvtx:
                torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                if self.nvtx:
                    torch.cuda.nvtx.range_pop()

    def range(self, name: str):
        return self._ranges(name) if (self.profiling or self.nvtx) else _NO_RANGE


_NO_RANGE = contextlib.nullcontext()  # reusable: an unprofiled step makes no context objects


def make_profiler(profiled: bool, rank: int, skip: int, steps: int, point_dir: Path):
    """A torch.profiler over `steps` steps after the first `skip` (the warm-up), on a profiled rank; its trace
    (Kineto JSON: TensorBoard's profiler plugin, Perfetto, Holistic Trace Analysis, which reads the rank and world
    size torch writes into it) goes to POINT_DIR/profile/rank{R}.*.pt.trace.json. None where not profiling."""
    if not profiled:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=max(skip - 1, 0), warmup=1 if skip else 0, active=steps, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(point_dir / PROFILE_DIR),
                                                                worker_name=f"rank{rank}"),
        record_shapes=False,
    )
