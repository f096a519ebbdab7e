"""The allocation a search leaves idle: the same trials of mixed lengths, on the same number of nodes, searched by
Hydra's Optuna sweeper (batches of --workers trials, each batch waiting for its slowest) and by the built-in
search (search=optuna: --workers workers that never wait), side by side on a Slurm cluster:

    bash slurm/local-cluster.sh up --nodes 3 && source /tmp/pipeline-slurm/env.sh
    python benchmarks/search_idle.py [--workers 2] [--steps 300,1200,...] [--repeats 1]

Both try each of --steps (trainer.max_steps) once, through Optuna's grid sampler, so they train the same trials.
For each way it prints
    wall        launch to the last trial's record
    busy        the trials' own time, summed: each from its rank 0's process start to its record (the record's
                startup.ready + wall_time_s)
    idle        1 - busy / (workers x wall): allocation time spent in no trial (queueing and starting jobs,
                waiting for a batch's slowest trial, starting a trial's step)
and where the idle time fell, the trials laid out on `workers` slots in the order they started: before a slot's
first trial (the launch, queueing, starting a job), between trials, and after a slot's last trial while another
still trains; then the ratio of the walls. The A/A line runs the built-in search twice: the spread between its two
runs is the noise of these figures on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# mixed lengths, the longest 4x the shortest (on this machine, a CPU: 10 to 40 s each); the grid samplers draw
# them in their own order
STEPS = tuple(40 * s for s in (400, 1600, 800, 450, 1200, 500, 1500, 420, 900, 1100, 600, 1000))
RUN = ["trainer.epochs=1000", "dataset.train_size=4096", "dataset.test_size=256", "trainer.log_every=1000",
       "probe.enabled=false", "cluster.time=30"]


def trials_of(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]


def figures(records: list[dict], started: float, workers: int) -> dict:
    spans = []
    for r in records:
        end = datetime.fromisoformat(r["provenance"]["ended_at"]).timestamp()
        spans.append((end - r["wall_time_s"] - (r.get("startup") or {}).get("ready", 0.0), end))
    busy = sum(e - s for s, e in spans)
    wall = max(e for _, e in spans) - started
    return {"trials": len(records), "wall": wall, "busy": busy, "idle": 1 - busy / (workers * wall),
            **gaps(spans, started, started + wall, workers)}


def gaps(spans: list[tuple[float, float]], started: float, ended: float, workers: int) -> dict:
    """The idle time on `workers` slots, each trial (in the order they started) on the slot that freed last
    before it began (the earliest freed, where none had: clocks of two nodes may differ by a little)."""
    free, used = [started] * workers, [False] * workers
    out = {"first": 0.0, "between": 0.0, "last": 0.0}
    for s, e in sorted(spans):
        ready = [k for k in range(workers) if free[k] <= s]
        k = max(ready, key=lambda k: free[k]) if ready else min(range(workers), key=lambda k: free[k])
        out["between" if used[k] else "first"] += max(0.0, s - free[k])
        free[k], used[k] = e, True
    out["last"] = sum(ended - f for f in free)
    return out


def launch(args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline.launch", *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the launch failed (exit {out.returncode}):\n{out.stderr[-3000:]}")


def hydra_batches(folder: Path, steps: list[int], workers: int) -> dict:
    """Hydra's Optuna sweeper, grid sampler, batches of `workers` points; it returns when the last batch has."""
    started = time.time()
    launch(["-m", "cluster=slurm", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid",
            f"hydra.sweeper.n_trials={len(steps)}", f"hydra.sweeper.n_jobs={workers}",
            f"trainer.max_steps=choice({','.join(map(str, steps))})", *RUN, f"hydra.sweep.dir={folder}"])
    return figures(trials_of(folder), started, workers)


def built_in(folder: Path, steps: list[int], workers: int) -> dict:
    """search=optuna, grid sampler: the launch returns at once; done when every worker's job has left the queue."""
    started = time.time()
    launch(["search=optuna", "search.sampler=grid", f"search.trials={len(steps)}", f"search.workers={workers}",
            f'+search.space.trainer.max_steps="choice({",".join(map(str, steps))})"', "cluster=slurm", *RUN,
            f"hydra.run.dir={folder}"])
    jobs = [json.loads((w / "worker.json").read_text())["job_id"] for w in (folder / "workers").iterdir()]
    while subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i"], capture_output=True,
                         text=True).stdout.strip():
        time.sleep(1)
    return figures(trials_of(folder / "trials"), started, workers)


def show(name: str, f: dict) -> None:
    print(f"{name:<28} {f['trials']:>2} trials  wall {f['wall']:7.1f} s  busy {f['busy']:7.1f} s  "
          f"idle {f['idle']:6.1%}  (before first {f['first']:.1f} s, between {f['between']:.1f} s, after last "
          f"{f['last']:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="nodes, one trial on each at a time")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="the trials' trainer.max_steps")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="leave the runs in this folder (e.g. to collect them); default: "
                                                  "a temporary one, removed")
    args = parser.parse_args()
    if not os.environ.get("SLURM_CONF"):
        raise SystemExit("no Slurm cluster: set SLURM_CONF (bash slurm/local-cluster.sh up --nodes 3; "
                         "source /tmp/pipeline-slurm/env.sh)")
    steps = [int(s) for s in args.steps.split(",")]
    # one core per trial: a local cluster's nodes share this machine's cores, and each trial, alone in its job,
    # would take them all (two such trials at once ran 50x slower: their OpenMP threads spin against each other)
    os.environ["OMP_NUM_THREADS"] = "1"
    print(f"{len(steps)} trials (trainer.max_steps {min(steps)}-{max(steps)}), {args.workers} node(s), one trial "
          f"per node at a time; {args.repeats} repeat(s)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or tmp
        for r in range(args.repeats):
            batch = hydra_batches(Path(tmp) / f"hydra{r}", steps, args.workers)
            search = built_in(Path(tmp) / f"search{r}", steps, args.workers)
            again = built_in(Path(tmp) / f"search{r}-aa", steps, args.workers)
            show("Hydra's Optuna sweeper", batch)
            show("built-in search", search)
            show("built-in search (A/A)", again)
            print(f"wall ratio built-in / Hydra's: {search['wall'] / batch['wall']:.3f}; "
                  f"A/A: {again['wall'] / search['wall']:.3f}")


if __name__ == "__main__":
    main()
