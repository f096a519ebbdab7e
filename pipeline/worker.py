"""The rank's entry:

    python -m pipeline.worker POINT_DIR                          a point that `launch` froze (local debug mode,
                                                                 srun, slurm/ddp.sbatch)
    torchrun --nproc-per-node=N -m pipeline.worker [overrides]   no launch: rank 0 composes the config from
                                                                 Hydra overrides, as `launch` would, and freezes it
                                                                 into hydra.run.dir; every rank trains it

Rank 0 writes POINT_DIR/result.json.
"""

import sys
from pathlib import Path

from pipeline.job.run import run_from_overrides, run_point
from pipeline.rundir import POINT_NAME


def main(argv: list[str]) -> None:
    if len(argv) == 1 and (Path(argv[0]) / POINT_NAME).is_file():
        run_point(argv[0])
    else:
        run_from_overrides(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
