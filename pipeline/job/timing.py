"""Per-step phase timing, and the summary figures a record shows.

Each training step is cut at four marks; the end of one step is the start of the next, so the steps of a
run tile its wall time with no gaps:

    start -> data ready -> gradients computed -> backward returned -> optimizer done (= next start)

    data    = data ready - start                 batch indexing and host->device copy, plus anything between steps
    compute = (gradients computed - data ready)  forward and backward compute
            + (optimizer done - backward returned)  optimizer step
    comm    = backward returned - gradients computed

Under FSDP (parallel=fsdp|hsdp) communication is spread over the step (each block's parameters all-gathered in
forward and backward, its gradients reduce-scattered in backward), so there is no one moment it starts. There

    comm    = the time the step waits on FSDP's collectives (the exposed communication), timed around each of them
              (pipeline.job.parallel.CommClock): on a CPU FSDP2 issues them all synchronously, so the time inside
              them is the time the step waits; the other intervals are as above, forward and backward compute
              being the rest of their interval

and on CUDA, where they run on their own streams and the calls return at once, it is not measured (0: the
record's `missing` says so).

"Gradients computed" is when the last parameter's gradient is accumulated (a post-accumulate-grad hook on every
parameter counts them); that gradient completes DDP's last bucket, which DDP then hands to the all-reduce.
backward() returns only once every bucket's all-reduce has finished. So `comm` is the all-reduce time that
backward compute did not hide: how long the rank waited on gradient communication. (DDP keeps its own C++
all-reduce: a Python comm hook cost measurably more per step.)

On CUDA the marks are CUDA events on the compute stream (the GPU's timeline), read only when a step is long
finished (or when the figures are asked for), so the loop gains no synchronisation; on CPU they are
`time.perf_counter()`.
"""

import time

import numpy as np
import torch

from pipeline.result import PhaseSplit, RankTiming, RunTiming, StepTime

PHASES = ("data", "compute", "comm")


class StepTimer:
    # steps whose marks are read in one go, once twice as many are waiting: a CUDA event of a step that many
    # steps back has long been reached, so reading it does not wait, and the events in hand stay bounded
    READ_EVERY = 256

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._marks: list[tuple] = []  # steps not read yet
        self._read: list[np.ndarray] = []  # (steps, 4) intervals between a step's 5 marks, in seconds
        self._start = self._data = self._grads = self._backward = None
        self._params = self._expected = self._pending = self._fired = 0
        self.on_grads_ready = None
        self.clock = None  # FSDP's CommClock on a CPU: the comm phase is the time spent in its collectives
        self._spare: list = []  # CUDA events already read, recorded again rather than made anew every step

    def _now(self):
        if self._cuda:
            event = self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def watch(self, model: torch.nn.Module) -> None:
        """Count gradient accumulations, to mark the moment the step's last one is done. Not watched (a run of one
        rank, which communicates with nobody), the comm phase is 0: what DDP does between the last gradient and
        backward's return is then its own bookkeeping, counted as compute."""
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._accumulated)
                self._params += 1
        self._expected = self._params

    def _accumulated(self, param: torch.Tensor) -> None:
        self._fired += 1
        self._pending -= 1
        if self._pending == 0:
            self.grads_ready()

    def grads_ready(self) -> None:
        """All gradients are computed; `on_grads_ready`, if set, is called at that moment too."""
        self._grads = self._now()
        if self.on_grads_ready is not None:
            self.on_grads_ready()

    def start(self) -> None:
        self._start = self._now()

    def data_ready(self) -> None:
        self._data = self._now()
        self._grads, self._pending, self._fired = None, self._expected, 0
        if self.clock is not None:
            self.clock.reset()

    def backward_begins(self, last: bool) -> None:
        """With gradient accumulation: only the last micro-batch's backward communicates, so only its last
        gradient marks the comm phase (the others' gradients are counted, never reaching the mark)."""
        self._grads, self._pending, self._fired = None, (self._expected if last else -1), 0

    def backward_done(self) -> None:
        self._backward = self._now()

    def step_done(self) -> None:
        end = self._now()
        grads = self._grads if self._grads is not None else self._backward  # no hook ran: no communication
        if self.clock is not None:  # FSDP: the waits on its collectives, wherever in the step they fell
            grads = self._backward - self.clock.blocked
        self._marks.append((self._start, self._data, grads, self._backward, end))
        self._start = end
        # parameters the loss did not use get no gradient (ddp.find_unused_parameters): the next step's last
        # gradient is the last of those that had one in this step
        self._expected = self._fired or self._params
        if len(self._marks) >= 2 * self.READ_EVERY:
            self._read_marks(self.READ_EVERY)

    def _read_marks(self, steps: int) -> None:
        marks, self._marks = self._marks[:steps], self._marks[steps:]
        if not marks:
            return
        if self._cuda:
            marks[-1][-1].synchronize()
            self._read.append(np.array([[a.elapsed_time(b) / 1e3 for a, b in zip(m, m[1:])] for m in marks]))
            # every event read is free again but the last one, the end of the last step read, which is the start
            # of the next (grads and backward may be one event: each is returned once)
            last = marks[-1][-1]
            self._spare += [e for e in {id(e): e for m in marks for e in m}.values() if e is not last]
        else:
            self._read.append(np.diff(np.array(marks, dtype=np.float64), axis=1))

    def phases(self, last: int | None = None) -> np.ndarray:
        """Seconds per step, shape (steps, 4): step, data, compute, comm; of the `last` steps only if given."""
        self._read_marks(len(self._marks))
        t = np.concatenate(self._read) if self._read else np.zeros((0, 4))
        self._read = [t]
        if last:
            t = t[-last:]
        # columns of t: data, forward+backward, comm, optimizer
        data, fwd_bwd, comm, opt = t[:, 0], t[:, 1], t[:, 2], t[:, 3]
        return np.stack([data + fwd_bwd + comm + opt, data, fwd_bwd + opt, comm], axis=1)


def rank_timing(phases: np.ndarray, warmup: int) -> RankTiming:
    """One rank's figures over its timed (post-warm-up) steps."""
    timed = phases[warmup:]
    if not len(timed):
        return RankTiming(step_times_s=[], step_time_median_s=None, busy_time_median_s=None, data_mean_s=None,
                          compute_mean_s=None, comm_mean_s=None)
    data, compute, comm = (float(timed[:, i].mean()) for i in (1, 2, 3))
    return RankTiming(step_times_s=timed[:, 0].tolist(), step_time_median_s=float(np.median(timed[:, 0])),
                      # a step's time not spent waiting on communication; DDP's all-reduce evens out whole step
                      # times, so this is where a slow rank shows
                      busy_time_median_s=float(np.median(timed[:, 1] + timed[:, 2])),
                      data_mean_s=data, compute_mean_s=compute, comm_mean_s=comm)


def summarize(ranks: list[RankTiming], global_batch: int) -> RunTiming:
    """Job-wide figures from every rank's timing (their definitions: pipeline.definitions)."""
    steps = np.array([r.step_times_s for r in ranks])  # (ranks, timed steps)
    if steps.shape[1] == 0:
        return RunTiming(timed_steps=0, throughput_samples_per_s=None, step_time_s=None, breakdown_s=None,
                         breakdown_share=None)
    slowest_step = steps.max(axis=0)
    timed_wall = steps.sum(axis=1).max()
    throughput = global_batch * steps.shape[1] / timed_wall
    means = PhaseSplit(**{p: float(np.mean([getattr(r, f"{p}_mean_s") for r in ranks])) for p in PHASES})
    total = means.data + means.compute + means.comm
    return RunTiming(
        timed_steps=int(steps.shape[1]), timed_wall_s=float(timed_wall), throughput_samples_per_s=float(throughput),
        throughput_per_rank_samples_per_s=float(throughput / len(ranks)),
        step_time_s=StepTime(mean=float(slowest_step.mean()), median=float(np.median(slowest_step)),
                             p95=float(np.percentile(slowest_step, 95))),
        breakdown_s=means,
        breakdown_share=PhaseSplit(data=means.data / total, compute=means.compute / total,
                                   comm=means.comm / total) if total > 0 else None)
