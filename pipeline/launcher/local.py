"""Local debug mode: one sweep point as `nodes` simulated nodes x `tasks_per_node` processes on this machine.

Each process gets the variables a real multi-node Slurm step gives its tasks (job id, node list, node id,
proc id, local id, task counts, node name), so the worker runs the same rendezvous code as on a cluster. The
rendezvous address is exported explicitly (the simulated node names do not resolve). Every rank's output goes
to POINT_DIR/logs/node{N}-rank{R}.log. On a terminal a progress bar shows the point's position in the sweep,
step, samples/s and ETA; otherwise rank 0's log lines are echoed as they come. The first rank to fail ends
the point.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.launcher.logs import tail
from pipeline.rundir import LOG_DIR, Failure, Progress, rank_log_path

log = logging.getLogger(__name__)

GRACE_S = 5.0
# variables that would make a spawned rank believe it is part of some other job
_FOREIGN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


class RunFailed(RuntimeError):
    """A rank of the point failed; the message names it, its log file and its last lines."""


@dataclass
class Rank:
    rank: int
    node: int
    log_path: Path
    proc: subprocess.Popen


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _echo(stream, log_path: Path) -> None:
    with open(log_path, "w") as f:
        for line in stream:
            f.write(line)
            f.flush()
            sys.stdout.write(line)
            sys.stdout.flush()


def run_local(point_dir: Path, run: RunConfig, job_id: str, position: str) -> None:
    """Start every rank of the point, wait for all of them; raise RunFailed when one fails. `position` says
    which point of the sweep this is (e.g. "point 2 of 3"), for the progress bar."""
    tty = sys.stdout.isatty()
    tpn = run.cluster.tasks_per_node
    base = {k: v for k, v in os.environ.items() if not (k.startswith("SLURM") or k in _FOREIGN)}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")
    (point_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    ranks, echoes = [], []
    for node in range(run.nodes):
        for local in range(tpn):
            rank = node * tpn + local
            path = rank_log_path(point_dir, node, rank)
            env = {**base, **simulated_slurm_env(job_id, run.nodes, tpn, node, local)}
            cmd = [sys.executable, "-m", "pipeline.worker", str(point_dir)]
            if rank == 0 and not tty:
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                echoes.append(threading.Thread(target=_echo, args=(proc.stdout, path), daemon=True))
                echoes[-1].start()
            else:
                with open(path, "w") as out:
                    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            ranks.append(Rank(rank, node, path, proc))
    done = threading.Event()
    if tty:
        echoes.append(threading.Thread(target=_progress_bar, args=(point_dir, position, done), daemon=True))
        echoes[-1].start()
    try:
        failed = _wait_all(ranks)
    finally:
        done.set()
        _stop(ranks)
        for t in echoes:
            t.join(timeout=GRACE_S)
    if failed:
        raise RunFailed(_failure_message(first_failure(failed, ranks, point_dir)))


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
    """Wait until every rank has exited; return the first to exit non-zero (the others are then stopped)."""
    exits: queue.Queue[Rank] = queue.Queue()
    for r in ranks:
        threading.Thread(target=lambda r=r: (r.proc.wait(), exits.put(r)), daemon=True).start()
    for _ in ranks:
        r = exits.get()
        if r.proc.returncode != 0:
            return r
    return None


def first_failure(first_exit: Rank, ranks: list[Rank], point_dir: Path) -> Rank:
    """The rank that failed first. A rank that raised wrote a failure record at once; the others, failing because
    of it, write theirs later, but may exit sooner. A first exit without a record was a rank killed before it
    could raise (a signal, the OOM killer), or one that stopped on purpose (a preemption's checkpoint)."""
    failures = Failure.read_all(point_dir)
    if not failures or first_exit.rank not in {f.rank for f in failures}:
        return first_exit
    return next(r for r in ranks if r.rank == failures[0].rank)


def _stop(ranks: list[Rank]) -> None:
    alive = [r.proc for r in ranks if r.proc.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _failure_message(rank: Rank, lines: int = 20) -> str:
    return (f"rank {rank.rank} (simulated node {rank.node}) failed first, exit code {rank.proc.returncode}; "
            f"its log: {rank.log_path}\n--- last {lines} lines ---\n{tail(rank.log_path, lines)}")
