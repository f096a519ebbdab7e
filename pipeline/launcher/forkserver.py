"""Local debug mode's rank processes, forked from one process that imported torch once.

Every rank process imports torch and the job side before it trains: seconds of CPU, paid by each rank of each
point on the same cores the ranks then train on. The launcher instead starts one fork server (`python -m
pipeline.worker --fork-server FD`, as multiprocessing's forkserver start method does for its workers) as soon as it
knows the run is local, which imports while the launcher composes the config, and asks it for each rank of each
point: a 4-rank point imports once, a sweep once. A forked rank is still this launcher's own child (re-parented to
it: pipeline/lifeline.py), leads a session of its own, writes its output into a pipe the launcher reads, and is
stopped, waited for and diagnosed like a rank the launcher starts itself, which is what it falls back to where the
fork server cannot serve (it failed to import: the rank started alone then says why in its own log).
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


from pipeline.launcher.signals import own, stop_sessions
from pipeline.lifeline import adopt_descendants
from pipeline.rundir import LAUNCHER_PID_VAR, RankStart

log = logging.getLogger(__name__)

# variables that would make a rank believe it is part of some other job
_FOREIGN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
POLL_S = 0.02  # how often a wait with a timeout looks again


def start_rank(point_dir: Path, env: dict[str, str], python: list[str] | None = None) -> subprocess.Popen | ForkedRank:
    """One rank of the point with these variables (on top of the launcher's own), its output on `.stdout`: forked
    by the fork server, started first if it is not yet; a process of its own where the server cannot fork, or
    where `python` says how (a container runtime's command: pipeline.containers)."""
    global _server
    rank = None
    if python is None:
        if _server is None:
            _server = ForkServer.start()
        rank = _server.fork(point_dir, env) if _server.alive else None
    if rank is None:
        return own(subprocess.Popen([*(python or [sys.executable]), "-m", "pipeline.worker", str(point_dir)],
                                    env={**base_env(), **env}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return own(rank)


def start_early() -> None:
    """Start the fork server now, so that it imports while the launcher composes the config."""
    global _server
    if _server is None:
        _server = ForkServer.start()


def base_env() -> dict[str, str]:
    """The launcher's environment, less what would make a rank believe it belongs to another job, plus the
    launcher's pid (a rank dies with its launcher: pipeline/lifeline.py)."""
    return {**{k: v for k, v in os.environ.items() if not (k.startswith("SLURM") or k in _FOREIGN)},
            "PYTHONUNBUFFERED": "1", LAUNCHER_PID_VAR: str(os.getpid())}


class ForkServer:
    """The launcher's end of the fork server: a SOCK_SEQPACKET socket (one request, one reply; RankStart) and the
    server's process, owned by this launch (stopped on its signals and at its exit). Its output (an import's
    warning, the error it died of) is kept, to be logged if it stops serving."""

    def __init__(self, proc: subprocess.Popen | None, sock: socket.socket | None):
        self.proc, self.sock = proc, sock
        self.output: collections.deque[str] = collections.deque(maxlen=20)
        if proc is not None:
            threading.Thread(target=self.output.extend, args=(proc.stdout,), daemon=True).start()
            atexit.register(self.stop)

    @classmethod
    def start(cls) -> ForkServer:
        """The server started, or an unusable one where Linux will not give this launcher the forked ranks (they
        must be its children) and each rank is started on its own."""
        if not adopt_descendants():
            return cls(None, None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            proc = own(subprocess.Popen(
                [sys.executable, "-m", "pipeline.worker", "--fork-server", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=base_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True), helper=True)
        return cls(proc, ours)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.sock is not None

    def fork(self, point_dir: Path, env: dict[str, str]) -> ForkedRank | None:
        """A rank forked (the first request waits for the server's imports), or None once the server cannot."""
        read, write = os.pipe()
        try:
            RankStart(point_dir=str(point_dir), env=env).send(self.sock, write)
            reply = self.sock.recv(256).decode()
        except OSError as e:
            reply = f"{type(e).__name__}: {e}"
        finally:
            os.close(write)
        if reply.isdigit():
            return ForkedRank(int(reply), open(read))
        os.close(read)
        self.proc.poll()
        said = "".join(self.output).strip()
        log.warning("the fork server (pid %d) stopped serving (%s)%s: each rank starts on its own from here",
                    self.proc.pid, reply or f"it ended, {self.proc.returncode}",
                    f"; its last lines:\n{said}" if said else "")
        self.stop()
        return None

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()  # the server's signal to end: it sees the socket closed
            self.sock = None
            stop_sessions([self.proc])


class ForkedRank:
    """A rank the fork server forked, now this launcher's child: what the launcher uses of a subprocess.Popen (pid,
    stdout, returncode, poll, wait, send_signal), on os.waitpid. As Popen does, one thread at a time waits in the
    kernel; a poll meanwhile returns None."""

    def __init__(self, pid: int, stdout):
        self.pid, self.stdout, self.returncode = pid, stdout, None
        self._waiting = threading.Lock()

    def poll(self) -> int | None:
        if self.returncode is None and self._waiting.acquire(blocking=False):
            try:
                self._reap(os.WNOHANG)
            finally:
                self._waiting.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            with self._waiting:
                self._reap(0)
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"rank process {self.pid}", timeout)
            time.sleep(POLL_S)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # reaped meanwhile by the thread waiting on it, as Popen allows (bpo-40550)
                pass

    def _reap(self, flags: int) -> None:
        if self.returncode is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere: its status is lost (as Popen says of such a child)
            self.returncode = 0
            return
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)


def reap_adopted(sessions: list[int]) -> None:
    """Reap the processes of these rank sessions (each led by its rank, whose own exit status its ForkedRank reads)
    that this launcher adopted when their rank ended before them (DataLoader workers) and that have ended since:
    nobody else will, and a long local sweep would pile them up."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if fields[0] == "Z" and int(fields[1]) == os.getpid() and int(fields[2]) in sessions and pid not in sessions:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


_server: ForkServer | None = None
