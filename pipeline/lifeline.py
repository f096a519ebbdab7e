"""A rank of local debug mode lives and dies with its launcher, however the launcher ends.

The launcher stops its ranks on every signal it can catch (pipeline/launcher/signals.py); for the one it cannot
(SIGKILL, or a crash), each rank asks Linux for a parent-death signal, `prctl(PR_SET_PDEATHSIG)`, as process
supervisors do: when the launcher exits, the kernel kills the rank. The rank's DataLoader workers notice their
parent is gone within torch's watchdog interval (5 s) and exit too.

Local ranks are forked from one process that imported torch once (pipeline/launcher/forkserver.py). So that each is
still the launcher's own child (its exit status read with waitpid, its death tied to the launcher's), the launcher
becomes a child subreaper, `prctl(PR_SET_CHILD_SUBREAPER)`: a rank forked by a short-lived intermediate is
re-parented to it, as init systems and container runtimes take their descendants. Torch-free: the launcher uses
it, and the worker calls it before its imports.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from pipeline.rundir import LAUNCHER_PID_VAR

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PR_SET_CHILD_SUBREAPER = 36


def follow_launcher() -> None:
    """In local debug mode (the launcher's pid in the environment), die when the launcher does. Elsewhere (srun,
    torchrun) the scheduler or agent owns the process: nothing to do."""
    launcher = os.environ.get(LAUNCHER_PID_VAR)
    if not launcher or not sys.platform.startswith("linux"):
        return
    if not _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL):
        print(f"pipeline: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}): this rank will not "
              "stop by itself if its launcher is killed", file=sys.stderr)
    if os.getppid() != int(launcher):  # the launcher died before the line above: nobody is left to train for
        os._exit(1)


def adopt_descendants() -> bool:
    """Make this process (the launcher) the parent of every orphaned descendant: the ranks that the fork server's
    intermediates fork. False where Linux refuses (then ranks are started one process each)."""
    return sys.platform.startswith("linux") and _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _prctl(option: int, value: int) -> bool:
    return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
