"""The launcher owns the processes it starts. SIGTERM, SIGHUP and SIGINT (what `timeout`, a CI cancel, a dropped
SSH session and Ctrl-C send) stop every one of them and their children, and the launch then exits 128 + the signal
with one line saying so. Each rank is started as the leader of a session of its own, which its DataLoader workers
share, so stopping a rank's process group stops them too (and Ctrl-C at a terminal reaches the launcher alone).

A launcher killed outright (SIGKILL) can do none of this; its ranks then stop themselves (pipeline/lifeline.py:
Linux's parent-death signal), and so does the fork server they are forked from. On Slurm, Slurm owns the ranks;
what the launcher may own there is a fork server it started before it knew (see local.prestart).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
GRACE_S = 5.0  # SIGTERM first; whatever is left of a rank's session after this gets SIGKILL


class Process(Protocol):
    """What is used here of a process this launch started: a subprocess.Popen, or a rank forked for it
    (pipeline/launcher/forkserver.py)."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


P = TypeVar("P", bound=Process)
_owned: list[Process] = []  # every process this launch started, in the order it started them
_helpers: set[int] = set()  # the pids of those that are no rank (the fork server)


def own(proc: P, helper: bool = False) -> P:
    """Note a process (the leader of a session of its own) as this launch's to stop."""
    _owned.append(proc)
    if helper:
        _helpers.add(proc.pid)
    return proc


def install() -> None:
    """Stop what this launch started on SIGTERM, SIGHUP and SIGINT, then exit 128 + the signal."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_and_exit)


def _stop_and_exit(signum: int, frame) -> NoReturn:
    for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the stopping short
        signal.signal(sig, signal.SIG_IGN)
    running = [p for p in _owned if p.poll() is None and p.pid not in _helpers]
    stop_sessions(_owned)
    what = (f"stopped the {len(running)} rank process(es) this launch was running (pids "
            f"{', '.join(str(p.pid) for p in running)}) and their children" if running else "no rank was running")
    print(f"pipeline.launch: {signal.Signals(signum).name} received: {what}; exit {128 + signum}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)  # at once: the interpreter's teardown would wait on the threads copying rank output


def stop_sessions(procs: list[Process], grace_s: float = GRACE_S) -> None:
    """Stop each process and its session: SIGTERM (and SIGCONT, so that a stopped one takes it), then SIGKILL to
    whatever is left after `grace_s`. Returns once nothing of them is left (or, for a process the kernel cannot
    kill at once, one that waits in the kernel on a dead file server, `grace_s` after the SIGKILL)."""
    if not procs:
        return
    for sig in (signal.SIGTERM, signal.SIGCONT):
        _signal_all(procs, sig)
    if not _wait_gone(procs, grace_s):
        _signal_all(procs, signal.SIGKILL)
        _wait_gone(procs, grace_s)


def _signal_all(procs: list[Process], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
        # a rank leads its own process group; its children (DataLoader workers) may outlive it there
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(procs: list[Process], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while (left := _left(procs)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not left


def _left(procs: list[Process]) -> bool:
    """Whether any of the processes, or anything in their process groups, still runs. An exited process counts as
    gone once it is a zombie: whichever thread waits on it reaps it (poll reaps those nobody waits on)."""
    for p in procs:
        p.poll()
    running = live_processes()
    groups = set(running.values())
    return any((p.returncode is None and p.pid in running) or p.pid in groups for p in procs)


def live_processes() -> dict[int, int]:
    """{pid: process group} of every process that is not a zombie, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        if fields[0] != "Z":
            found[int(stat.parent.name)] = int(fields[2])
    return found
