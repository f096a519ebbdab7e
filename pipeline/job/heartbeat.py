"""A heartbeat through the rendezvous store, so that a rank that times out waiting for the others can name the
one that stopped answering, on Slurm as in local mode (where the launcher also reads the ranks' process states).

Every rank adds 1 to its counter in the store (`heartbeat/<rank>`) every BEAT_S, from a thread of its own, for as
long as it runs. A rank that is stopped (SIGSTOP), hung holding the interpreter, or whose node is gone stops
counting; the ranks waiting for it in a collective go on (the collective waits outside the interpreter). When a
rank fails with a timeout, it watches the counters for WATCH_S: those that did not move are the silent ranks.
Counters, not timestamps, so the nodes' clocks need not agree.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from pipeline.job.env import DistEnv

BEAT_S = 1.0
WATCH_S = 3 * BEAT_S


def _key(rank: int) -> str:
    return f"heartbeat/{rank}"


def start_heartbeat(store: dist.Store, rank: int) -> None:
    """Beat for the rest of this process's life (a daemon thread; it stops when the store stops answering)."""
    def beat() -> None:
        while True:
            try:
                store.add(_key(rank), 1)
            except Exception:  # the store's host (rank 0) has gone: nobody is left to tell
                return
            time.sleep(BEAT_S)

    threading.Thread(target=beat, name="pipeline-heartbeat", daemon=True).start()


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
