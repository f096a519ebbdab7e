"""Collect result records into scaling tables, plots and a report:

    python -m pipeline.collect SWEEP_DIR... [--out DIR] [--baseline OLD/scaling.json] [--tolerance 0.1]
                               [--predict-at 8,16,64] [--track]

Reads every result.json under the given folders (any number of sweeps), groups the runs that differ only in
node count, and writes scaling.csv, scaling.json, report.md and PNG plots to --out (default: ./collect).
Exits 1 when --baseline is given and a group's throughput or efficiency fell by more than --tolerance, or when
--track could not log the collection to the sweeps' trackers.
Imports no torch: it runs on login nodes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from pipeline.collector.memory import parse_size
from pipeline.collector.forecast import PREDICT_AT
from pipeline.collector.nodes import find_bad_node_lists, node_histories
from pipeline.collector.records import Diverged, Pruned, load_runs
from pipeline.collector.report import Collected, load_baseline, terminal_table, write_report
from pipeline.collector.scaling import aggregate, regressions
from pipeline.collector.study import find_searches
from pipeline.tracking.sync import track_collection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep folders (searched recursively) or record files")
    parser.add_argument("--out", type=Path, default=Path("collect"), help="where the tables and report go")
    parser.add_argument("--baseline", type=Path, help="scaling.json of an earlier collection to compare against")
    parser.add_argument("--tolerance", type=tolerance, default=0.10,
                        help="relative drop in throughput or efficiency that counts as a regression (default 0.10)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--track", action="store_true",
                        help="log the collection (report, tables, forecast, plots) to each sweep's tracker: its MLflow "
                             "parent run, a W&B run of its group (the points' tracking=[...]; docs/tracking.md)")
    parser.add_argument("--device-memory", type=size_argument, metavar="SIZE",
                        help="the device memory the memory forecast fits to, e.g. 80GB or 80GiB (default: the "
                             "measured device's)")
    parser.add_argument("--predict-at", type=node_counts, default=PREDICT_AT, metavar="N,N,...",
                        help="the node counts to forecast, beside the measured ones (default "
                             f"{','.join(map(str, PREDICT_AT))})")
    args = parser.parse_args(argv)
    try:  # the options that name files, before any work: one line and exit 2 each
        baseline = load_baseline(args.baseline) if args.baseline else None
    except (OSError, ValueError) as e:
        print(f"pipeline.collect: --baseline {args.baseline}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    problem = unwritable(args.out)
    if problem:
        print(f"pipeline.collect: --out {args.out} cannot be written: {problem}", file=sys.stderr)
        return 2

    runs, problems = load_runs(args.paths)
    lists, unreadable = find_bad_node_lists(args.paths)
    for p in problems:
        kind = "diverged" if isinstance(p, Diverged) else "pruned" if isinstance(p, Pruned) else "skipped"
        print(f"{kind} {p.path}: {p.reason}", file=sys.stderr)
    for line in unreadable:
        print(f"skipped bad-node list {line}", file=sys.stderr)
    if not runs:
        print(f"no usable result records under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    rows, models = aggregate(runs, [p for p in problems if isinstance(p, Diverged)], args.predict_at,
                             args.device_memory)
    found = regressions(rows, baseline, args.tolerance) if baseline is not None else []
    collected = Collected(rows, models, problems, node_histories(runs, lists), find_searches(args.paths))
    report = write_report(args.out, collected, found, with_plots=not args.no_plots)
    print(terminal_table(rows))
    diverged, pruned = (sum(isinstance(p, kind) for p in problems) for kind in (Diverged, Pruned))
    print(f"\n{len(runs)} runs in {len({r.group for r in rows})} groups, {diverged} diverged, "
          + (f"{pruned} pruned, " if pruned else "") + f"{len(problems) - diverged - pruned} records skipped; "
          f"report: {report}")
    for line in found:
        print(f"REGRESSION {line}", file=sys.stderr)
    if args.track and not track(args.paths, args.out):
        return 1
    return 1 if found else 0


def track(paths: list[Path], out: Path) -> bool:
    """collect --track: the collection logged to the collected sweeps' trackers; False when one could not be."""
    try:
        said = track_collection(paths, out)
    except Exception as e:  # the tracker: unreachable, refusing; the collection itself is written
        print(f"--track: the collection could not be logged: {type(e).__name__}: {e}"[:1000], file=sys.stderr)
        return False
    print("\n".join(said) or "--track: no collected point was launched with tracking=[...]: nothing logged")
    return True


def unwritable(out: Path) -> str | None:
    """Why the output folder cannot be written (made where missing), or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    return None if os.access(out, os.W_OK | os.X_OK) else "no permission to write it (or a read-only file system)"


def tolerance(text: str) -> float:
    """--tolerance: a finite fraction in [0, 1): nan would turn the regression gate off, silently."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give the relative drop that counts as a "
                                         "regression, a number in [0, 1) (0.1: 10%)")
    return value


def size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def node_counts(text: str) -> tuple[int, ...]:
    """--predict-at's value: node counts, comma-separated, each at least 1."""
    try:
        counts = tuple(sorted({int(n) for n in text.split(",") if n.strip()}))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give node counts >= 1, comma-separated (3,6,12)")
    return counts


if __name__ == "__main__":
    sys.exit(main())
