"""Local debug mode: one sweep point as `nodes` simulated nodes x `tasks_per_node` processes on this machine.

Each process gets the variables a real multi-node Slurm step gives its tasks (job id, node list, node id,
proc id, local id, task counts, node name), so the worker runs the same rendezvous code as on a cluster. The
rendezvous address is exported explicitly (the simulated node names do not resolve). Every rank's output goes
to POINT_DIR/logs/node{N}-rank{R}.log. On a terminal a progress bar shows the point's position in the sweep,
step, samples/s and ETA; otherwise rank 0's log lines are echoed as they come. The first rank to fail ends
the point.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.cgroup import oom_kills
from pipeline.containers import host_env, start_for
from pipeline.launcher import forkserver
from pipeline.launcher.diagnose import STOPPED, MemoryWatch, how_it_ended, process_state
from pipeline.launcher.signals import GRACE_S, Process, stop_sessions
from pipeline.rundir import LAUNCHER_PID_VAR, LOG_DIR, Failure, Progress, rank_log_path
from pipeline.slurm import PORT_RANGE

log = logging.getLogger(__name__)

LEAVE_S = 10.0  # see _wait_all
TAIL_LINES = 20  # of the failed rank's output, in the failure message
RANK_HEADER = "pipeline: rank"  # the first line of each rank's log in local mode: see _copy


class RunFailed(RuntimeError):
    """A rank of the point failed; the message names it, its error (or its last lines) and its log file."""


@dataclass
class Rank:
    rank: int
    node: int
    log_path: Path
    proc: Process  # a subprocess.Popen, or a forkserver.ForkedRank
    # its last lines of output, for the failure message (kept here too: a full disk may have stopped its log)
    last_lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))


def simulated_slurm_env(job_id: str, nodes: int, tasks_per_node: int, node: int, local: int) -> dict:
    nodelist = f"local[1-{nodes}]" if nodes > 1 else "local1"
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node * tasks_per_node + local),
        "SLURM_LOCALID": str(local),
        "SLURMD_NODENAME": f"local{node + 1}",
    }


def _free_port() -> int:
    """A port free now in PORT_RANGE: the kernel's own choice (port 0) is an ephemeral port, which any outgoing
    connection may take before rank 0's store binds it (EADDRINUSE, seen in CI)."""
    draw = random.Random()
    for _ in range(100):
        port = draw.randint(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE[0]}-{PORT_RANGE[1]} on 127.0.0.1 after 100 tries")


def _copy(stream, rank: Rank, echo: bool, header: str) -> None:
    """A rank's output into its log file, after a header line that names its process (to signal it, or to look at
    it with py-spy); and onto the launcher's stdout, for rank 0 when that is no terminal. A log that cannot be
    written (a full disk) is given up, never the reading: a rank blocked on a full pipe would hang the run. A
    traceback is not echoed (its error is the launcher's failure line)."""
    log_file = _open_log(rank.log_path, header)
    for line in stream:
        rank.last_lines.append(line)
        if log_file is not None:
            try:
                log_file.write(line)
                log_file.flush()
            except OSError:
                log_file = None
        # a traceback goes to the log only: the launcher's failure line says the error and names the log
        echo = echo and not line.startswith("Traceback (most recent call last)")
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


def _open_log(path: Path, header: str):
    try:
        f = open(path, "w")
        f.write(header + "\n")
        f.flush()
        return f
    except OSError:
        return None


def prestart(argv: list[str]) -> None:
    """Start the fork server before the launcher's own work, when the command line can only mean local runs (one,
    or a sweep): no dry run, no other cluster, no experiment or config of the user's (which could say otherwise: a
    login node must not import torch for a Slurm launch). Otherwise it starts with the first local point."""
    for arg in argv:
        key, eq, _ = arg.partition("=")
        if arg in ("-m", "--multirun"):
            continue
        if arg.startswith("-") or not eq or key.startswith(("+", "~", "hydra.searchpath", "cluster", "dry_run")) \
                and arg != "cluster=local":
            return
    forkserver.start_early()


def sweep_threads(runs: list[RunConfig]) -> int | None:
    """CPU threads per rank for every point of a local sweep: this machine's cores over the largest point's ranks.
    Each point taking its own share would give a 1-rank point all the cores and a 2-rank point half each: runs that
    are no longer alike (the collector keeps threads per rank in the group key) and a speedup that measures the
    threads. None where the user set OMP_NUM_THREADS (the ranks keep it), or for no runs."""
    if "OMP_NUM_THREADS" in os.environ or not runs:
        return None
    return max(1, (os.cpu_count() or 1) // max(r.world_size for r in runs))


def run_local(point_dir: Path, run: RunConfig, job_id: str, position: str, threads: int | None = None,
              sweep_dir: Path | None = None) -> None:
    """Start every rank of the point (or hand a warm one its part), wait for all of them; raise RunFailed when one
    fails. `position` says which point of the sweep this is (e.g. "point 2 of 3"), for the progress bar; `threads`,
    each rank's CPU threads (None: its share of the cores, pipeline.job.placement). In a container
    (cluster.container), each rank starts through the runtime, with the sweep folder (`sweep_dir`) bound in."""
    tty = sys.stdout.isatty()
    python = start_for([run], sweep_dir or point_dir, name="local").python \
        if run.cluster.container.image is not None else None
    runtime_env = host_env() if python is not None else {}
    tpn = run.cluster.tasks_per_node
    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    (point_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    ranks, echoes = [], []
    for node in range(run.nodes):
        for local in range(tpn):
            rank = node * tpn + local
            path = rank_log_path(point_dir, node, rank)
            env = {**runtime_env, **master, **simulated_slurm_env(job_id, run.nodes, tpn, node, local),
                   **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
                   # Apptainer's starter stays the rank's parent: its death signal would follow the starter, and
                   # its check of the launcher's pid fail (pipeline/lifeline.py); the launcher's stop of the
                   # rank's session still reaches it
                   **({LAUNCHER_PID_VAR: ""} if run.cluster.container.runtime == "apptainer" else {})}
            proc = forkserver.start_rank(point_dir, env, python)
            header = f"{RANK_HEADER} {rank} (simulated node {node}) is process {proc.pid}"
            ranks.append(Rank(rank, node, path, proc))
            echoes.append(threading.Thread(target=_copy, args=(proc.stdout, ranks[-1], rank == 0 and not tty, header),
                                           daemon=True))
            echoes[-1].start()
    done = threading.Event()
    if tty:
        echoes.append(threading.Thread(target=_progress_bar, args=(point_dir, position, done), daemon=True))
        echoes[-1].start()
    oom_before, memory = oom_kills(), MemoryWatch([r.proc.pid for r in ranks])
    threading.Thread(target=_say_stopped, args=(ranks, run.cluster.stopped_s, run.cluster.timeout_s, done),
                     daemon=True).start()
    try:
        failed = _wait_all(ranks)
        ended_at = time.monotonic()
        if failed:
            _let_recorded_ranks_exit(ranks, point_dir)
        states = [(r, process_state(r.proc.pid)) for r in ranks if r.proc.poll() is None]
        stopped = [(r, state) for r, state in states if state in STOPPED]
    finally:
        memory.stop()
        done.set()
        _stop(ranks)
        forkserver.reap_adopted([r.proc.pid for r in ranks])
        for t in echoes:
            t.join(timeout=GRACE_S)
    if failed:
        first = first_failure(failed, ranks, point_dir)
        how = how_it_ended(first.proc.returncode, memory.last.get(first.proc.pid),
                           oom_kills() not in (None, oom_before), ended_at)
        raise RunFailed(_failure_message(first, how, point_dir, stopped))


def _say_stopped(ranks: list[Rank], stopped_s: float, timeout_s: float, done: threading.Event) -> None:
    """Name a rank stopped for cluster.stopped_s (SIGSTOP, Ctrl-Z, a debugger), once, while the others still wait
    for it: they would fail only after cluster.timeout_s, and until then nothing would be said."""
    since: dict[int, float] = {}
    said: set[int] = set()
    while not done.wait(min(1.0, stopped_s / 4)):
        now = time.monotonic()
        for r in ranks:
            state = process_state(r.proc.pid) if r.proc.poll() is None else None
            if state not in STOPPED:
                since.pop(r.rank, None)
                continue
            since.setdefault(r.rank, now)
            if now - since[r.rank] >= stopped_s and r.rank not in said:
                said.add(r.rank)
                log.warning("rank %d (simulated node %d, pid %d) has been %s for %.0f s: the other ranks wait for it "
                            "(they fail after cluster.timeout_s=%g s); resume it with kill -CONT %d, or stop the run",
                            r.rank, r.node, r.proc.pid, STOPPED[state], now - since[r.rank], timeout_s, r.proc.pid)


def _progress_bar(point_dir: Path, position: str, done: threading.Event, width: int = 30) -> None:
    """Rewrite one terminal line from rank 0's progress.json until the point ends."""
    while not done.wait(0.5):
        p = Progress.latest(point_dir)
        if p is None:
            line = f"{position}: starting"
        else:
            filled = width * p.step // max(p.total_steps, 1)
            line = (f"{position}: [{'#' * filled}{'.' * (width - filled)}] step {p.step}/{p.total_steps} "
                    f"{p.samples_per_s:.0f} samples/s ETA {p.eta_s:.0f} s")
        sys.stdout.write(f"\r\033[K{line}")
        sys.stdout.flush()
    sys.stdout.write("\r\033[K")


def _wait_all(ranks: list[Rank]) -> Rank | None:
    """Wait until every rank has exited; return the first to exit non-zero (the others are then stopped). Rank 0
    exits cleanly only after the record is written and every rank has left the process group (leave_together), so a
    rank still running LEAVE_S after that is stuck in its teardown: the run is done, and it is stopped, not waited
    for."""
    exits: queue.Queue[Rank] = queue.Queue()
    for r in ranks:
        threading.Thread(target=lambda r=r: (r.proc.wait(), exits.put(r)), daemon=True).start()
    deadline = None
    for _ in ranks:
        try:
            r = exits.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            log.warning("rank(s) %s still running %.0f s after rank 0 finished the run: stopped",
                        [r.rank for r in ranks if r.proc.poll() is None], LEAVE_S)
            return None
        if r.proc.returncode != 0:
            return r
        if r.rank == 0:
            deadline = time.monotonic() + LEAVE_S
    return None


def _let_recorded_ranks_exit(ranks: list[Rank], point_dir: Path) -> None:
    """The ranks that wrote a failure record exit on their own (for GRACE_S at most) before the rest are stopped:
    the one that failed first is named by its record, and stopped by the launcher it would be said to have been
    killed by SIGTERM, when another rank that failed because of it happened to exit sooner."""
    recorded = {f.rank for f in Failure.read_all(point_dir)}
    deadline = time.monotonic() + GRACE_S
    for r in ranks:
        if r.rank in recorded:
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return


def first_failure(first_exit: Rank, ranks: list[Rank], point_dir: Path) -> Rank:
    """The rank that failed first. A rank that raised wrote a failure record at once; the others, failing because
    of it, write theirs later, but may exit sooner. A first exit without a record was a rank killed before it
    could raise (a signal, the OOM killer), or one that stopped on purpose (a preemption's checkpoint)."""
    failures = Failure.read_all(point_dir)
    if not failures or first_exit.rank not in {f.rank for f in failures}:
        return first_exit
    return next(r for r in ranks if r.rank == failures[0].rank)


def _stop(ranks: list[Rank]) -> None:
    """Every rank and what it started (DataLoader workers), whether it exited or not; each rank's exit status known
    when this returns (stop_sessions counts a zombie as gone before the thread that waits on it has reaped it)."""
    stop_sessions([r.proc for r in ranks])
    for r in ranks:
        try:
            r.proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:  # a process the kernel cannot kill at once (waiting on a dead file server)
            pass


def last_error(lines) -> str | None:
    """The exception a rank's output ends with ("PermissionError: [Errno 1] ..."), for a rank that could not write
    its failure record (a folder turned read-only)."""
    for line in reversed([x.strip() for x in lines if x.strip()]):
        name = line.split(":", 1)[0]
        if name.isidentifier() and name.endswith(("Error", "Exception", "Interrupt")) and ":" in line:
            return line
    return None


def _failure_message(rank: Rank, how: str, point_dir: Path, stopped: list[tuple[Rank, str]]) -> str:
    """Which rank failed first and how (its exit, its error as its failure record says it, or else its last
    lines); ahead of that, any rank that was stopped: the one the others waited for until they timed out."""
    said = next((f.error for f in Failure.read_all(point_dir) if f.rank == rank.rank), None) or \
        last_error(rank.last_lines)
    lines = [f"rank {r.rank} (simulated node {r.node}, pid {r.proc.pid}) is {STOPPED[state]}: it did not arrive, "
             "and the run ended without it (its silence seen, cluster.silent_s, or the others timed out, "
             "cluster.timeout_s)" for r, state in stopped]
    lines.append(f"rank {rank.rank} (simulated node {rank.node}) failed first: {how}"
                 f"{f' ({said.splitlines()[0]})' if said else ''}; its log: {rank.log_path}")
    if said:  # its traceback is in its log, once: the user sees the error in one line, and where to read more
        return "\n".join(lines)
    output = "".join(rank.last_lines).rstrip() or "(no output)"
    return "\n".join(lines) + f"\n--- its last {TAIL_LINES} lines ---\n{output}"
