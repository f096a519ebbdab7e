"""How long `python -m pipeline.launch -m ... cluster=slurm` takes to return, on a real Slurm (SLURM_CONF set, e.g.
after `slurm/local-cluster.sh up --nodes 4`), and how many times it calls sbatch.

    python benchmarks/launch_speed.py [--repeats 5] [--seeds 500] [--python OTHER/.venv/bin/python ...]

Two sweeps, each launched `--repeats` times: `-m nodes=1,2,4` (3 points, 3 allocations) and
`-m trainer.seed=range(SEEDS) nodes=1,2` (2 x SEEDS points, 2 allocations). The jobs are submitted to start an
hour later (`sbatch --begin`) and cancelled at once, so nothing runs; the sweep folders go in a temporary folder
(TMPDIR). Prints the median, min and max wall time from process start to exit, the median CPU time (user + system,
the launch's and its sbatch calls': steadier than the wall time where other work shares the machine), and the sbatch
calls of the last repeat (counted by a shim in front of sbatch).

`--python` launches with other interpreters too (each the venv of another checkout, e.g. the code before a change),
interleaved repeat by repeat with this one, so that the load of a shared machine falls on each alike.
"""

import argparse
import json
import os
import resource
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


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(python: str, args: list[str], env: dict, folder: Path, sweep: Path) -> tuple[float, float, list[str]]:
    """(wall time, CPU time, the sbatch calls) of one launch into the new folder `sweep`."""
    (folder / "calls").unlink(missing_ok=True)
    t0, cpu0 = time.perf_counter(), cpu_of_children()
    subprocess.run([python, "-m", "pipeline.launch", "-m", *args, "cluster=slurm", *HOLD, f"hydra.sweep.dir={sweep}"],
                   check=True, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed, cpu = time.perf_counter() - t0, cpu_of_children() - cpu0
    manifest = json.loads((sweep / "manifest.json").read_text())
    jobs = {job["job_id"].split("_")[0] for point in manifest["points"].values() for job in point["jobs"]}
    subprocess.run(["scancel", *sorted(jobs)], check=False)  # the sweep's own jobs, nobody else's
    return elapsed, cpu, (folder / "calls").read_text().splitlines()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=500)
    parser.add_argument("--python", action="append", default=[], help="another interpreter to launch with, "
                        "interleaved with this one (repeatable)")
    args = parser.parse_args()
    if not os.environ.get("SLURM_CONF") or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        sys.exit("no Slurm reachable: start one (slurm/local-cluster.sh up --nodes 4) and source its env.sh")
    sweeps = {"3 points (-m nodes=1,2,4)": ["nodes=1,2,4"],
              f"{2 * args.seeds} points (-m trainer.seed=range({args.seeds}) nodes=1,2)":
                  [f"trainer.seed=range({args.seeds})", "nodes=1,2"]}
    pythons, launches = [sys.executable, *args.python], 0
    # every launch into a folder of its own, all removed at the end: ext4 makes a new file slow to create for a few
    # seconds after thousands were deleted nearby (it skips their inodes), which a sweep removed between repeats
    # would charge to the next launch
    with tempfile.TemporaryDirectory() as tmp:
        env = shim(Path(tmp))
        for name, sweep in sweeps.items():
            times, cpus, calls = {py: [] for py in pythons}, {py: [] for py in pythons}, {}
            for _ in range(args.repeats):
                for py in pythons:
                    launches += 1
                    elapsed, cpu, calls[py] = launch(py, sweep, env, Path(tmp), Path(tmp) / f"sweep-{launches}")
                    times[py].append(elapsed)
                    cpus[py].append(cpu)
            for py, t in times.items():
                who = f" [{py}]" if len(pythons) > 1 else ""
                submissions = [c for c in calls[py] if "--test-only" not in c]
                print(f"{name}{who}: launch to exit median {statistics.median(t):.2f} s (min {min(t):.2f}, max "
                      f"{max(t):.2f}, {args.repeats} repeats), CPU median {statistics.median(cpus[py]):.2f} s; sbatch "
                      f"calls {len(submissions)} submissions + {len(calls[py]) - len(submissions)} preflights",
                      flush=True)


if __name__ == "__main__":
    main()
