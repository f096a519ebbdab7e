"""The rank's entry:

    python -m pipeline.worker POINT_DIR                          a point that `launch` froze (local debug mode,
                                                                 srun, slurm/ddp.sbatch)
    torchrun --nproc-per-node=N -m pipeline.worker [overrides]   no launch: rank 0 composes the config from
                                                                 Hydra overrides, as `launch` would, and freezes it
                                                                 into hydra.run.dir; every rank trains it
    python -m pipeline.worker --warm                             local debug mode's head start: import everything
                                                                 while the launcher composes the config, then read
                                                                 the point and this rank's variables from stdin

Rank 0 writes POINT_DIR/result.json. Once a rank has left the process group it exits at once (exit_now).
"""

import logging
import os
import sys
import traceback
from pathlib import Path

from submitit.helpers import Checkpointable

from pipeline.rundir import POINT_NAME, WarmStart
from pipeline.runlock import lock_for_job

# This module imports no torch itself: the launcher imports TrainingJob (below) to submit it. The job side is
# imported where a rank runs (main, TrainingJob.__call__).


def main(argv: list[str]) -> None:
    from pipeline.job.env import DistEnv  # torch: seconds, which a warm rank spends before its point arrives
    from pipeline.job.run import run_from_overrides, run_point

    if argv == ["--warm"]:
        start = WarmStart.receive(sys.stdin)
        if start is None:  # the launcher did not need this rank after all
            return
        os.environ.update(start.env)
        argv = [start.point_dir]
    if len(argv) == 1 and (Path(argv[0]) / POINT_NAME).is_file():
        with lock_for_job(Path(argv[0]), DistEnv.detect().rank):
            run_point(argv[0])
    else:
        run_from_overrides(argv)  # rank 0 claims the folder it freezes the point into


class TrainingJob(Checkpointable):
    """What submitit runs on every task. On the preemption / time-limit signal the worker saves a checkpoint at
    a step boundary and then calls submitit's handler, which calls `checkpoint` (inherited: resubmit this same
    call) and requeues the job; the requeued run finds the checkpoint and resumes."""

    def __call__(self, point_dir: str) -> str:
        from pipeline.job.env import DistEnv  # torch is imported on the compute node only
        from pipeline.job.run import run_point

        with lock_for_job(Path(point_dir), DistEnv.detect().rank):  # rank 0 holds the folder for the job's life
            try:
                return str(run_point(point_dir))
            except Exception as e:
                if not hasattr(e, "exit_code"):
                    raise
                # a stop of its own (a bad node): its exit code, past submitit, which would exit 1
                print(f"pipeline.worker: {e}", file=sys.stderr, flush=True)
                raise SystemExit(e.exit_code) from None


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of torch: most of a second that does nothing for the run, and on
    a failure, where the traceback still holds DDP, a destructor that can join gloo's threads under the GIL."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    from pipeline.job.lifeline import follow_launcher  # torch-free

    follow_launcher()  # before importing torch (seconds): a launcher killed meanwhile takes this rank along
    try:
        main(sys.argv[1:])
    except SystemExit as e:  # as the interpreter would: a message goes to stderr with status 1
        if isinstance(e.code, int) or e.code is None:
            exit_now(e.code or 0)
        print(e.code, file=sys.stderr)
        exit_now(1)
    except BaseException as e:
        if hasattr(e, "exit_code"):  # a stop of its own, said by it (a bad node: its exit code, no traceback)
            print(f"pipeline.worker: {e}", file=sys.stderr)
            exit_now(e.exit_code)
        traceback.print_exc()
        exit_now(1)
    exit_now(0)
