"""The rank's entry:  python -m pipeline.worker POINT_DIR

Every rank of a run starts here (local debug mode, `srun`, torchrun, `slurm/ddp.sbatch`); it reads the frozen
config `launch` wrote to POINT_DIR/point.json, trains, and rank 0 writes POINT_DIR/result.json.
"""

import sys

from pipeline.job.run import run_point

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pipeline.worker POINT_DIR")
    run_point(sys.argv[1])
