"""Per-rank log files, named the same in local debug mode and on Slurm: POINT_DIR/logs/node{N}-rank{R}.log
(N the node's index in the job, R the global rank; Slurm's srun patterns node%n-rank%t.log)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

LOG_DIR = "logs"
SRUN_PATTERN = "node%n-rank%t.log"


def rank_log_path(point_dir: Path, node: int, rank: int) -> Path:
    return Path(point_dir) / LOG_DIR / f"node{node}-rank{rank}.log"


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
