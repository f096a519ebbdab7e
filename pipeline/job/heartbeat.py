"""A heartbeat through the rendezvous store, so that a rank that times out waiting for the others can name the
one that stopped answering, on Slurm as in local mode (where the launcher also reads the ranks' process states).

Every rank adds 1 to its counter in the store (`heartbeat/<rank>`) every BEAT_S, from a thread of its own, for as
long as it runs. A rank that is stopped (SIGSTOP), hung holding the interpreter, or whose node is gone stops
counting; the ranks waiting for it in a collective go on (the collective waits outside the interpreter). When a
rank fails with a timeout, it watches the counters for WATCH_S: those that did not move are the silent ranks.
Counters, not timestamps, so the nodes' clocks need not agree. Rank 0 also watches the others' counters as it
beats (rank 1 watches rank 0's): one that stands still for cluster.silent_s, far less than cluster.timeout_s, is
named with its state, and the watcher ends the run (pipeline.job.run), so a frozen rank costs seconds, not the
collective's timeout.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from pipeline.job.env import DistEnv

BEAT_S = 1.0
WATCH_S = 3 * BEAT_S


def _key(rank: int) -> str:
    return f"heartbeat/{rank}"


def start_heartbeat(store: dist.Store, rank: int, world_size: int = 1, silent_s: float | None = None,
                    on_silent: Callable[[str], None] | None = None) -> None:
    """Beat for the rest of this process's life (a daemon thread; it stops when the store stops answering). Rank 0
    also watches every other rank's beat, and rank 1 rank 0's: one that stands still for `silent_s` is described
    (its node, process and state) to `on_silent`, once, which ends the run."""
    store.set(f"{_key(rank)}/where", f"{socket.gethostname()} {os.getpid()}")
    watched = [r for r in range(world_size) if r != rank] if rank == 0 else [0] if rank == 1 else []
    last = {r: (-1, time.monotonic()) for r in watched}  # each watched rank's count, and when it last moved

    def beat() -> None:
        while True:
            try:
                store.add(_key(rank), 1)
                now = time.monotonic()
                for r, count in zip(watched, store.multi_get([_key(r) for r in watched]) if watched else []):
                    if int(count or 0) != last[r][0]:
                        last[r] = (int(count or 0), now)
                silent = [r for r in watched if now - last[r][1] >= (silent_s or float("inf"))]
            except Exception:  # the store's host (rank 0) has gone: nobody is left to tell
                return
            if silent and on_silent is not None:
                on_silent("; ".join(describe(store, r, now - last[r][1]) for r in silent))
                return
            time.sleep(BEAT_S)

    threading.Thread(target=beat, name="pipeline-heartbeat", daemon=True).start()


STATES = {"T": "stopped (SIGSTOP, a debugger, Ctrl-Z)", "t": "stopped by a debugger", "D": "waiting on a disk",
          "Z": "a zombie: it has exited", "R": "running", "S": "sleeping"}


def describe(store: dist.Store, rank: int, silent_for: float) -> str:
    """A silent rank in words: how long, where, and its process's state when it runs on this node."""
    try:
        host, pid = store.get(f"{_key(rank)}/where").decode().split()
    except Exception:
        return f"rank {rank} silent for {silent_for:.0f} s"
    where = f"rank {rank} (process {pid} on {host}) silent for {silent_for:.0f} s"
    if host != socket.gethostname():
        return f"{where}: its state cannot be read from {socket.gethostname()}"
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return f"{where}: its process is gone"
    return f"{where}: {STATES.get(state, f'state {state}')}"


def silent_ranks(store: dist.Store | None, env: DistEnv, error: BaseException) -> list[int]:
    """The other ranks whose heartbeat stood still for WATCH_S, after `error` (only a timeout is looked into: a
    rank that failed otherwise was not waiting for anyone). Empty where the store cannot tell."""
    if store is None or env.world_size == 1 or "timed out" not in str(error).lower() and \
            "timeout" not in str(error).lower():
        return []
    try:
        store.set_timeout(timedelta(seconds=WATCH_S))  # a store whose host is gone must not hold up the report
        before = [store.add(_key(r), 0) for r in range(env.world_size)]
        time.sleep(WATCH_S)
        after = [store.add(_key(r), 0) for r in range(env.world_size)]
    except Exception:
        return []
    return [r for r in range(env.world_size) if r != env.rank and after[r] == before[r]]
