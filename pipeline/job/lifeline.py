"""A rank of local debug mode dies with its launcher, however the launcher ends.

The launcher stops its ranks on every signal it can catch (pipeline/launcher/signals.py); for the one it cannot
(SIGKILL, or a crash), each rank asks Linux for a parent-death signal, `prctl(PR_SET_PDEATHSIG)`, as process
supervisors do: when the launcher exits, the kernel kills the rank. The rank's DataLoader workers notice their
parent is gone within torch's watchdog interval (5 s) and exit too. Imports no torch: the worker calls this
first, before its imports, so that a warm rank (started before the launcher composed its config) is covered too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from pipeline.rundir import LAUNCHER_PID_VAR

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def follow_launcher() -> None:
    """In local debug mode (the launcher's pid in the environment), die when the launcher does. Elsewhere (srun,
    torchrun) the scheduler or agent owns the process: nothing to do."""
    launcher = os.environ.get(LAUNCHER_PID_VAR)
    if not launcher or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        print(f"pipeline: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}): this rank will not "
              "stop by itself if its launcher is killed", file=sys.stderr)
    if os.getppid() != int(launcher):  # the launcher died before the line above: nobody is left to train for
        os._exit(1)
