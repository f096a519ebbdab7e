"""Start-up cost: from `python -m pipeline.launch` to the first training step and to exit, in local debug mode,
against `python -c "import torch"` as the floor; and, when a Slurm cluster is reachable (SLURM_CONF set, e.g.
after `slurm/local-cluster.sh up`), from submission to the first step.

    python benchmarks/startup.py [--repeats 5] [--nodes 1]

The first step's time is the one the worker writes into the record (provenance.first_step_at_unix, rank 0);
on Slurm the submission time is sacct's Submit (1 s resolution) and the launcher's own submit timestamp.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = ["trainer.max_steps=10", "trainer.warmup_steps=2", "trainer.log_every=1000"]


def timed(cmd: list[str]) -> float:
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def local_run(out: Path, nodes: int) -> tuple[float, float]:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "pipeline.launch", f"nodes={nodes}", *RUN, f"hydra.run.dir={out}"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exit_s = time.time() - t0
    first = json.loads((out / "result.json").read_text())["provenance"]["first_step_at_unix"]
    return first - t0, exit_s


def slurm_run(out: Path, nodes: int) -> tuple[float, float]:
    subprocess.run([sys.executable, "-m", "pipeline.launch", "cluster=slurm", f"nodes={nodes}", *RUN, "wait=true",
                    f"hydra.run.dir={out}"], check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = json.loads((out / "manifest.json").read_text())["points"]["0"]["jobs"][0]
    first = json.loads((out / "result.json").read_text())["provenance"]["first_step_at_unix"]
    submit = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job["job_id"], "-o", "Submit"], capture_output=True,
                            text=True, check=True).stdout.split()[0]
    sacct_submit = datetime.fromisoformat(submit).timestamp()  # local time, as sacct prints it
    return first - sacct_submit, first - datetime.fromisoformat(job["submitted_at"]).timestamp()


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=1)
    args = parser.parse_args()
    floor, first, done = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            floor.append(timed([sys.executable, "-c", "import torch"]))
            f, d = local_run(Path(tmp) / f"local{r}", args.nodes)
            first.append(f)
            done.append(d)
        print(f"local debug mode, {args.nodes} node(s), {args.repeats} repeats")
        print(f"  python -c 'import torch'        {summary(floor)}")
        ratio = statistics.median(first) / statistics.median(floor)
        print(f"  launch -> first training step   {summary(first)}   ({ratio:.1f}x the floor)")
        print(f"  launch -> exit (10 steps, eval) {summary(done)}")
        reachable = os.environ.get("SLURM_CONF") and subprocess.run(["sinfo"], capture_output=True).returncode == 0
        if not reachable:
            print("Slurm: no cluster reachable (set SLURM_CONF, e.g. source /tmp/pipeline-slurm/env.sh)")
            return
        by_sacct, by_launcher = [], []
        for r in range(args.repeats):
            a, b = slurm_run(Path(tmp) / f"slurm{r}", args.nodes)
            by_sacct.append(a)
            by_launcher.append(b)
        print(f"Slurm, {args.nodes} node(s), {args.repeats} repeats")
        print(f"  sacct Submit -> first step      {summary(by_sacct)}")
        print(f"  launcher's submit -> first step {summary(by_launcher)}")


if __name__ == "__main__":
    main()
