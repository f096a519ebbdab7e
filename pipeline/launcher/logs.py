"""Reading the per-rank logs (POINT_DIR/logs/node{N}-rank{R}.log, named in pipeline.rundir) and failure records:
the rank that failed first and its last lines, for local mode's failure message and for status."""

from __future__ import annotations

from collections import deque
from pathlib import Path

from pipeline.rundir import LOG_DIR, Failure, rank_log_path


def tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip()
    except OSError:
        return "(no output)"


def first_failed_log(point_dir: Path) -> Path | None:
    """The log of the rank that failed first: the earliest failure record (a rank writes one the moment it
    raises, before the others can fail because of it); without records, the log that shows a Python traceback
    and was written to first (the others are stopped by srun --kill-on-bad-exit or the local launcher)."""
    failures = Failure.read_all(point_dir)
    if failures:
        return rank_log_path(point_dir, failures[0].node_rank, failures[0].rank)
    failed = [p for p in (Path(point_dir) / LOG_DIR).glob("*.log") if "Traceback (most recent call last)" in
              p.read_text(errors="replace")]
    return min(failed, key=lambda p: p.stat().st_mtime) if failed else None
