"""Send run folders to their experiment trackers from the login node:  python -m pipeline.track sync PATH...

For compute nodes without internet (tracking.wandb.mode=offline, or an MLflow server the nodes cannot reach), a
tracker that was down or slow during the run, and a run killed before its tracker had everything: each point
folder at or under PATH (a sweep, a search, a point) sends its trackers the figures of its metrics.jsonl they do not
hold, and ends their runs as its record says. The tracked run is the one the point has logged to (tracking.json),
and what a tracker holds is not sent again: a second sync creates no run and no step. docs/tracking.md.
Imports no torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.checks import ConfigError
from pipeline.config import MlflowTrackingConfig, TrackingConfig
from pipeline.tracking.sync import end_sweeps, point_dirs, sync_point
from pipeline.tracking.trackers import check_tracking

PROGRAM = "pipeline.track"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROGRAM}", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="send point folders' figures and ends to their trackers")
    sync.add_argument("paths", nargs="+", type=Path, help="sweep, search or point folders (searched recursively)")
    sync.add_argument("--mlflow-uri", help="send to this MLflow tracking URI instead of the trackers the points "
                                           "were launched with")
    sync.add_argument("--mlflow-experiment", default=MlflowTrackingConfig.experiment,
                      help="with --mlflow-uri: the experiment (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROGRAM}: %(message)s")
    try:
        if args.mlflow_uri is not None and not args.mlflow_uri.strip():
            raise ConfigError("--mlflow-uri='' is not allowed: give an MLflow tracking URI (http://host:5000, "
                              "file:///path), or leave the option out to send to the points' own trackers")
        tracking = TrackingConfig(mlflow=MlflowTrackingConfig(uri=args.mlflow_uri, experiment=args.mlflow_experiment)
                                  ) if args.mlflow_uri else None
        if tracking is not None:
            check_tracking(tracking)
        points = [p for path in args.paths for p in point_dirs(check_path(path))]
    except ConfigError as e:
        print(f"{PROGRAM}: {e}", file=sys.stderr)
        return 2
    failed = 0
    for point_dir in points:
        try:
            print("\n".join(sync_point(point_dir, tracking)))
        except ConfigError as e:
            print(f"{PROGRAM}: {point_dir}: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # the point's files, or the tracker (unreachable, refusing): the next point goes on
            print(f"{PROGRAM}: {point_dir}: not synced: {type(e).__name__}: {e}"[:1000], file=sys.stderr)
            failed += 1
    try:
        print("\n".join(end_sweeps(points, tracking)))
    except Exception as e:
        print(f"{PROGRAM}: a sweep's parent run could not be updated: {type(e).__name__}: {e}"[:1000], file=sys.stderr)
        failed += 1
    return 1 if failed else 0


def check_path(path: Path) -> Path:
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder: give a sweep, search or point folder")
    if not point_dirs(path):
        raise ConfigError(f"{path} holds no point folder (point.json): nothing to sync")
    return path


if __name__ == "__main__":
    sys.exit(main())
