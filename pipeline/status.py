"""Where a sweep stands:  python -m pipeline.status SWEEP_DIR [--resubmit-failed] [--wait]
(and a search, search=optuna: its study's trials, the best so far and its workers)

Reconciles the sweep's manifest with Slurm and the result records, prints a line per point, points to the first
failed rank's log of each point that ended without a usable record, and resubmits those points if asked. A point
whose job stopped before training because its health check found a bad node (health.on_bad=exclude) is resubmitted
without it at once, at most health.max_resubmits times, and said so.
Imports no torch: it runs on login nodes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.launcher.logs import tail
from pipeline.launcher.status import PointStatus, format_table, sweep_status, wait_for_sweep
from pipeline.rundir import MANIFEST_NAME, SEARCH_NAME, Failure


def resubmit_bad_nodes(sweep_dir: Path, statuses: list[PointStatus]) -> list[str]:
    """The points whose job stopped for a bad node, resubmitted without it (pipeline.launcher.points, imported only
    then: Hydra and submitit); what was done, in words."""
    if not any(s.state == "bad node" for s in statuses):
        return []
    from pipeline.launcher.points import resubmit_without_bad_nodes

    return resubmit_without_bad_nodes(Path(sweep_dir), statuses)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--resubmit-failed", action="store_true",
                        help="resubmit the points that failed, timed out, were preempted or cancelled, never "
                             "started, or left a record that cannot be used")
    parser.add_argument("--include-diverged", action="store_true",
                        help="with --resubmit-failed: the points whose training diverged too")
    parser.add_argument("--wait", action="store_true", help="block until every point has ended")
    args = parser.parse_args(argv)
    if (args.sweep_dir / SEARCH_NAME).is_file():
        return search_status(args.sweep_dir)
    try:
        statuses = wait_for_sweep(args.sweep_dir, resubmit_bad_nodes) if args.wait else sweep_status(args.sweep_dir)
        said = [] if args.wait else resubmit_bad_nodes(args.sweep_dir, statuses)  # --wait resubmits as it goes
        if said:
            print("\n".join(said))
            statuses = sweep_status(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"pipeline.status: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # a manifest that is no regular file, truncated, corrupt, mistyped
        print(f"pipeline.status: {args.sweep_dir / MANIFEST_NAME} cannot be read: {e}", file=sys.stderr)
        return 2
    print(format_table(statuses))
    missing = [s.point for s in statuses if not s.has_record]
    print(f"points without a record: {', '.join(map(str, missing)) if missing else 'none'}")
    for s in statuses:
        if s.failed_log is not None:
            first = next(iter(Failure.read_all(s.dir)), None)  # in its own words (a full disk, a silent rank, ...)
            said = f" (rank {first.rank}: {first.error.splitlines()[0]})" if first else ""
            print(f"\npoint {s.point}: first failed rank's log {s.failed_log}{said}, last lines:\n{tail(s.failed_log)}")
    if args.resubmit_failed:
        from pipeline.launcher.points import resubmit_failed  # Hydra and submitit: imported only to resubmit

        for point, job in resubmit_failed(args.sweep_dir, statuses, args.include_diverged):
            print(f"point {point}: resubmitted as job {job}")
    return 0


def search_status(search_dir: Path) -> int:
    """A search's folder (search=optuna): its study and its workers (pipeline.search.summary)."""
    try:
        from pipeline.search.summary import study_lines

        print("\n".join(study_lines(search_dir)))
    except ImportError as e:
        print(f"pipeline.status: {search_dir} holds a search, read with Optuna, which cannot be imported ({e}): "
              "pip install 'pipeline[search]'", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"pipeline.status: {search_dir / SEARCH_NAME} or its study cannot be read: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
