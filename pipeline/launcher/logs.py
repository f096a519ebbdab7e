"""Reading the per-rank logs (POINT_DIR/logs/node{N}-rank{R}.log, named in pipeline.rundir): the rank that
failed first and its last lines, for local mode's failure message and for status."""

from __future__ import annotations

from collections import deque
from pathlib import Path

from pipeline.rundir import LOG_DIR


def tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip()
    except OSError:
        return "(no output)"


def first_failed_log(point_dir: Path) -> Path | None:
    """The rank log that shows a Python traceback and was written to first: the rank that failed first (the
    others are then stopped by srun --kill-on-bad-exit or the local launcher, without a traceback of their own)."""
    failed = [p for p in (Path(point_dir) / LOG_DIR).glob("*.log") if "Traceback (most recent call last)" in
              p.read_text(errors="replace")]
    return min(failed, key=lambda p: p.stat().st_mtime) if failed else None
