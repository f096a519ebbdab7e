"""Reading the per-rank logs (POINT_DIR/logs/node{N}-rank{R}.log, named in pipeline.rundir) and failure records:
the rank that failed first and its last lines, for local mode's failure message and for status."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pipeline.rundir import LOG_DIR, Failure, rank_log_path

TAIL_BYTES = 1 << 20  # how much of a log's end is read: enough for its last lines and its last traceback


def read_end(path: Path, size: int = TAIL_BYTES) -> str | None:
    """The last `size` bytes of a regular file, as text; None for anything else (missing, a FIFO, a device), which
    is never read: a log folder may hold anything."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: opening some devices has effects
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        f.seek(max(0, st.st_size - size))
        return f.read(size).decode(errors="replace")


def tail(path: Path, lines: int = 20) -> str:
    text = read_end(path)
    return "\n".join(text.rstrip().splitlines()[-lines:]) if text else "(no output)"


def first_failed_log(point_dir: Path) -> Path | None:
    """The log of the rank that failed first: the earliest failure record (a rank writes one the moment it
    raises, before the others can fail because of it); without records, the log that shows a Python traceback
    and was written to first (the others are stopped by srun --kill-on-bad-exit or the local launcher)."""
    failures = Failure.read_all(point_dir)
    if failures:
        return rank_log_path(point_dir, failures[0].node_rank, failures[0].rank)
    failed = [p for p in (Path(point_dir) / LOG_DIR).glob("*.log")
              if "Traceback (most recent call last)" in (read_end(p) or "")]
    return min(failed, key=lambda p: p.stat().st_mtime) if failed else None
