"""How long `python -m pipeline.launch -m ... cluster=slurm` takes to return, on a real Slurm (SLURM_CONF set, e.g.
after `slurm/local-cluster.sh up --nodes 4`), and how many times it calls sbatch.

    python benchmarks/launch_speed.py [--repeats 5] [--seeds 500]

Two sweeps, each launched `--repeats` times: `-m nodes=1,2,4` (3 points, 3 allocations) and
`-m trainer.seed=range(SEEDS) nodes=1,2` (2 x SEEDS points, 2 allocations). The jobs are submitted to start an
hour later (`sbatch --begin`) and cancelled at once, so nothing runs. Prints the median, min and max wall time
from process start to exit, and the sbatch calls of the last repeat (counted by a shim in front of sbatch).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOLD = ["+cluster.sbatch_extra.begin=now+1hour"]  # submitted, never started


def shim(folder: Path) -> dict:
    """`sbatch` on PATH that counts its calls into folder/calls, then runs the real one."""
    real = shutil.which("sbatch")
    (folder / "bin").mkdir()
    (folder / "bin/sbatch").write_text(f'#!/bin/sh\necho "$*" >> {folder}/calls\nexec {real} "$@"\n')
    (folder / "bin/sbatch").chmod(0o755)
    return {**os.environ, "PATH": f"{folder / 'bin'}:{os.environ['PATH']}"}


def launch(args: list[str], env: dict, folder: Path) -> tuple[float, list[str]]:
    (folder / "calls").unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.launch", "-m", *args, "cluster=slurm", *HOLD,
                    f"hydra.sweep.dir={folder / 'sweep'}"], check=True, cwd=folder, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    manifest = json.loads((folder / "sweep/manifest.json").read_text())
    jobs = {job["job_id"].split("_")[0] for point in manifest["points"].values() for job in point["jobs"]}
    subprocess.run(["scancel", *sorted(jobs)], check=False)  # the sweep's own jobs, nobody else's
    shutil.rmtree(folder / "sweep")
    return elapsed, (folder / "calls").read_text().splitlines()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=500)
    args = parser.parse_args()
    if not os.environ.get("SLURM_CONF") or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        sys.exit("no Slurm reachable: start one (slurm/local-cluster.sh up --nodes 4) and source its env.sh")
    sweeps = {"3 points (-m nodes=1,2,4)": ["nodes=1,2,4"],
              f"{2 * args.seeds} points (-m trainer.seed=range({args.seeds}) nodes=1,2)":
                  [f"trainer.seed=range({args.seeds})", "nodes=1,2"]}
    with tempfile.TemporaryDirectory() as tmp:
        env = shim(Path(tmp))
        for name, sweep in sweeps.items():
            times, calls = [], []
            for _ in range(args.repeats):
                elapsed, calls = launch(sweep, env, Path(tmp))
                times.append(elapsed)
            submissions = [c for c in calls if "--test-only" not in c]
            print(f"{name}: launch to exit median {statistics.median(times):.2f} s (min {min(times):.2f}, max "
                  f"{max(times):.2f}, {args.repeats} repeats); sbatch calls {len(submissions)} submissions + "
                  f"{len(calls) - len(submissions)} preflights", flush=True)


if __name__ == "__main__":
    main()
