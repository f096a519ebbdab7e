"""What the local launcher can tell of its ranks from outside, to say why a run failed: a rank's process state (a
stopped one is the rank the others waited for until their timeout), its memory use while it ran (a SIGKILL after
a high peak is the OOM killer's mark; whether it ran in this launch's cgroup, pipeline.cgroup says). Linux's /proc
files; where they cannot be read, less is said.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_S = 0.5
STOPPED = {"T": "stopped (SIGSTOP or Ctrl-Z)", "t": "stopped by a debugger"}


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R running, S sleeping, T stopped, Z zombie, ...); None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class Memory:
    resident: int  # bytes, when last seen
    peak: int  # the process's high-water mark (VmHWM)
    seen_at: float  # time.monotonic()


def memory_of(pid: int) -> Memory | None:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith(("VmRSS", "VmHWM")))
        return Memory(int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024,
                      time.monotonic())
    except (OSError, KeyError, ValueError):
        return None


class MemoryWatch:
    """Each rank's memory, sampled every SAMPLE_S while the point runs: what it was before it died."""

    def __init__(self, pids: list[int]):
        self.last: dict[int, Memory] = {}
        self._pids, self._done = pids, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            for pid in self._pids:
                seen = memory_of(pid)
                if seen is not None:
                    self.last[pid] = seen
            if self._done.wait(SAMPLE_S):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def how_it_ended(returncode: int | None, memory: Memory | None, oom_killer_ran: bool, ended_at: float) -> str:
    """'exit code 1', 'killed by SIGSEGV', or for SIGKILL what points to the OOM killer (`ended_at`: when its
    exit was seen, time.monotonic()); for one that has not exited even when killed, that."""
    if returncode is None:
        return "it did not exit, even when killed (a process the kernel cannot stop at once)"
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if -returncode != signal.SIGKILL:
        return f"killed by {name}"
    hints = ["the kernel's OOM killer ran in this launch's cgroup"] if oom_killer_ran else []
    if memory is not None:
        hints.append(f"its memory: {_gib(memory.peak)} at its peak, {_gib(memory.resident)} "
                     f"{max(0.0, ended_at - memory.seen_at):.1f} s before it died")
    return f"killed by SIGKILL (out of memory? {'; '.join(hints) or 'its memory use was not seen'})"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
