"""Preemption and time limits: Slurm signals every task (`--signal=USR2@90`) before it ends the job. The signal
is deferred to the next step boundary, where rank 0 checkpoints; then the job is requeued and resumes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from typing import NoReturn

import torch.distributed as dist

from pipeline.job.context import Job
from pipeline.rundir import LOG_DIR, REQUEUE_MARK
from pipeline.slurm import EXIT_REQUEUED, requeue

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """A stop was requested (preemption or time-limit signal); raised on rank 0 at a step boundary."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step} by {signal.Signals(signum).name}")
        self.step = step


class StopSignal:
    """Catches the preemption / time-limit signal and remembers it for the training loop to see.

    submitit has installed its own handler, which requeues the job and exits; that handler runs only after the
    checkpoint, from `hand_over`.
    """

    def __init__(self, rank: int):
        self.signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        self.received: int | None = None
        self._rank = rank
        self._previous = signal.signal(self.signum, self._catch)

    def _catch(self, sig, frame) -> None:
        self.received = sig
        if self._rank != 0:
            log.warning("stop signal received: training on until rank 0 checkpoints and the job is requeued")

    def hand_over(self, job: Job) -> NoReturn:
        """After the checkpoint: rank 0 lets submitit requeue the job, or requeues it itself under a plain sbatch,
        or, in a container (no scontrol there), leaves it to the batch script on the host; the other ranks (which
        took part in a sharded checkpoint) just stop."""
        runtime = job.run.cluster.container.runtime if job.run.cluster.container.image else None
        if runtime and job.on_slurm:  # no scontrol in the image: the batch script requeues, on the host
            if job.is_rank0:
                mark = REQUEUE_MARK.format(job=os.environ.get("SLURM_JOB_ID"), restart=job.env.restart_count)
                (job.point_dir / LOG_DIR / mark).touch()
                log.warning("checkpoint saved; the job's batch script requeues it (in a %s container)", runtime)
            if dist.is_initialized():
                dist.barrier()  # none leaves before the mark is there: srun would stop rank 0 at the first exit
            sys.exit(EXIT_REQUEUED)
        if not job.is_rank0:
            sys.exit(EXIT_REQUEUED)
        if callable(self._previous):
            self._previous(self.signum, None)  # submitit: resubmits the callable (it resumes from the checkpoint)
        if job.on_slurm and job.env.job_id and shutil.which("scontrol"):
            log.warning("checkpoint saved; requeueing job %s", job.env.job_id)
            requeue(job.env.job_id)
        sys.exit(EXIT_REQUEUED)
