"""The rank's entry:

    python -m pipeline.worker POINT_DIR                          a point that `launch` froze (srun,
                                                                 slurm/ddp.sbatch, local mode without a fork server)
    torchrun --nproc-per-node=N -m pipeline.worker [overrides]   no launch: rank 0 composes the config from
                                                                 Hydra overrides, as `launch` would, and freezes it
                                                                 into hydra.run.dir; every rank trains it
    python -m pipeline.worker --fork-server FD                   local debug mode: import the job side once, then
                                                                 fork each rank the launcher asks for on socket FD

Rank 0 writes POINT_DIR/result.json. Once a rank has left the process group it exits at once (exit_now).
"""

import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from submitit.helpers import Checkpointable

from pipeline.lifeline import follow_launcher
from pipeline.rundir import POINT_NAME, RankStart
from pipeline.runlock import lock_for_job

# This module imports no torch itself: the launcher imports TrainingJob (below) to submit it. The job side is
# imported where a rank runs (train_point, TrainingJob.__call__) or where ranks are forked (serve_forks).


def main(argv: list[str]) -> None:
    if argv[:1] == ["--fork-server"]:
        serve_forks(socket.socket(fileno=int(argv[1])))
    elif len(argv) == 1 and (Path(argv[0]) / POINT_NAME).is_file():
        train_point(argv[0])
    else:
        from pipeline.job.run import run_from_overrides

        run_from_overrides(argv)  # rank 0 claims the folder it freezes the point into


def train_point(point_dir: str) -> None:
    from pipeline.job.env import DistEnv  # torch: seconds, paid once by a fork server for all its ranks
    from pipeline.job.run import run_point

    with lock_for_job(Path(point_dir), DistEnv.detect().rank):
        run_point(point_dir)


def serve_forks(sock: socket.socket) -> None:
    """Local debug mode's fork server: import what every rank imports (torch, the job side, and torch._dynamo,
    which torch imports on the first optimizer and in DDP's constructor) once, then fork one rank per request of
    the launcher until it closes the socket. Started before the launcher composes the config, it imports
    meanwhile; a sweep's ranks are all forked from it. Forking after importing torch is what torch's own
    DataLoader workers do; no rank may be forked once this process has started threads of its own (it starts none)."""
    import torch._dynamo  # noqa: F401

    import pipeline.job.run  # noqa: F401

    # CUDA's driver, once initialised, does not work in a forked child: a rank could not use its GPU
    unusable = "CUDA's driver was loaded while importing" if _cuda_driver_loaded() else None
    while (request := RankStart.receive(sock)) is not None:
        start, output = request
        sys.stdout.flush()  # nothing of this process's output may be written again by the rank
        sys.stderr.flush()
        try:
            reply = f"not forking: {unusable}" if unusable else str(_fork_rank(start, output, sock))
        except OSError as e:  # out of processes or memory: the launcher starts this rank on its own
            reply = f"{type(e).__name__}: {e}"
        finally:
            os.close(output)
        sock.send(reply.encode())


def _cuda_driver_loaded() -> bool:
    with open("/proc/self/maps") as maps:
        return any("libcuda.so" in line for line in maps)


def _fork_rank(start: RankStart, output: int, sock: socket.socket) -> int:
    """Fork the rank through a short-lived intermediate, whose exit re-parents the rank to the launcher (a child
    subreaper: pipeline/lifeline.py), so that the launcher waits on it as on any child. Returns the rank's pid, once
    it is the launcher's."""
    read_pid, write_pid = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        try:
            middle = os.getpid()
            rank = os.fork()
            if rank == 0:
                os.close(read_pid)
                os.close(write_pid)
                _become_rank(start, output, sock, middle)
            os.write(write_pid, str(rank).encode())
        finally:
            os._exit(0)
    os.close(write_pid)
    with os.fdopen(read_pid) as f:
        pid = f.read()
    os.waitpid(intermediate, 0)
    if not pid:
        raise OSError(f"the intermediate process {intermediate} could not fork the rank")
    return int(pid)


def _become_rank(start: RankStart, output: int, sock: socket.socket, intermediate: int) -> None:
    """In the forked rank: a session of its own (as a rank the launcher starts itself), its output into the pipe,
    its variables, its life tied to the launcher's once it is the launcher's child; then train. Never returns.
    (`intermediate` is given, not read: it may have exited, and this process been re-parented, already.)"""
    try:
        sock.close()
        os.setsid()
        for fd in (1, 2):
            os.dup2(output, fd)
        os.close(output)
        with open(os.devnull) as devnull:
            os.dup2(devnull.fileno(), 0)
        os.environ.update(start.env)
        while os.getppid() == intermediate:  # it exits at once; its exit makes this the launcher's child
            time.sleep(0.001)
        follow_launcher()
    except BaseException:
        traceback.print_exc()
        exit_now(1)
    exit_as_a_rank(lambda: train_point(start.point_dir))


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


def exit_as_a_rank(body: Callable[[], None]) -> None:
    """Run `body`, then exit with its status: as the interpreter would (a SystemExit's message to stderr, a
    traceback for an error), or a stop of its own with its exit code and its line, no traceback (a bad node)."""
    try:
        body()
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            exit_now(e.code or 0)
        print(e.code, file=sys.stderr)
        exit_now(1)
    except BaseException as e:
        if hasattr(e, "exit_code"):
            print(f"pipeline.worker: {e}", file=sys.stderr)
            exit_now(e.exit_code)
        traceback.print_exc()
        exit_now(1)
    exit_now(0)


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of torch: most of a second that does nothing for the run, and on
    a failure, where the traceback still holds DDP, a destructor that can join gloo's threads under the GIL."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    follow_launcher()  # before importing torch (seconds): a launcher killed meanwhile takes this rank along
    exit_as_a_rank(lambda: main(sys.argv[1:]))
