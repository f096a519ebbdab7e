"""How the health check's ranks talk: through the rendezvous store, per-rank keys that rank 0 collects against
deadlines, so a rank that fails is named instead of hanging the job. Every rank catches its own errors and posts
them, and never leaves mid-check (srun --kill-on-bad-exit would take rank 0 down before it reports); rank 0
publishes what the others wait for (the go of each turn and round, the verdict). A store client blocks for ever when
the store's host (rank 0) is stopped, whatever its timeout says, so each rank has a watchdog that names the phase it
is stuck in and the store's host, and ends the rank."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from typing import Callable

import torch.distributed as dist


class Watchdog:
    """Ends this rank when the check outlives `seconds`: a store client blocks for ever in get/check/wait when the
    store's host is stopped, and a Python thread still runs then (those calls release the GIL)."""

    def __init__(self, seconds: float, said: Callable[[str], None], store_host: str):
        self.phase = "start"
        self.seconds, self.said, self.store_host = seconds, said, store_host
        self.timer = threading.Timer(seconds, self._bark)
        self.timer.daemon = True
        self.timer.start()

    def _bark(self) -> None:
        self.said(f"health check still running after {self.seconds:.0f} s, in {self.phase}; the store it reports "
                  f"through is on rank 0 ({self.store_host}), which may not answer")
        os._exit(4)

    def stop(self) -> None:
        self.timer.cancel()


class Board:
    """The check's keys in the rendezvous store (under `health/`): each rank's answers under keys of its own, what
    rank 0 publishes under shared ones."""

    def __init__(self, store: dist.Store, me: int, answer_s: float, watchdog: Watchdog):
        self.store, self.me, self.answer_s, self.watchdog = dist.PrefixStore("health", store), me, answer_s, watchdog

    def post(self, key: str, value: dict) -> None:
        self.store.set(f"{key}/{self.me}", json.dumps(value))

    def collect(self, key: str, ranks: list[int], due_s: float) -> dict[int, dict]:
        """Rank 0: every rank's answer to `key` within due_s + health.answer_s; a rank that gave none gets an error."""
        got, end = {}, time.monotonic() + due_s + self.answer_s
        while True:
            for r in ranks:
                if r not in got and self.store.check([f"{key}/{r}"]):
                    got[r] = json.loads(self.store.get(f"{key}/{r}"))
            if len(got) == len(ranks) or time.monotonic() > end:
                break
            time.sleep(0.01)
        for r in ranks:
            got.setdefault(r, {"error": f"no answer within {due_s + self.answer_s:.0f} s"})
        return got

    def publish(self, key: str, value) -> None:
        self.store.set(key, json.dumps(value))

    def read(self, key: str):
        """Wait for what rank 0 publishes (no deadline of its own: the watchdog bounds it)."""
        self.store.wait([key], timedelta(seconds=self.watchdog.seconds))
        return json.loads(self.store.get(key))
