"""Start-up cost: from `python -m pipeline.launch` to the first training step, and from the record being written to
the launcher's exit, in local debug mode with 1 and 2 ranks, against the floors measured in the same run; the
rank's start-up phases; the imports that cost most; and, when a Slurm cluster is reachable (SLURM_CONF set, e.g.
after `source /tmp/pipeline-slurm/env.sh`), from submission to the first step.

    python benchmarks/startup.py [--repeats 5] [--ranks 1 2]

Floors: `python -c "import torch"`; and torch's own training floor, `import torch` plus constructing an optimizer
(torch.optim's first use imports torch._dynamo, as DDP's constructor does: no training process can avoid it).
Times: the first step's is rank 0's (provenance.first_step_at_unix); the record's is result.json's mtime; the
phases are rank 0's (the record's `startup`: seconds from the rank process's start). On Slurm the submission time is
the launcher's own timestamp of its sbatch call (sacct's Submit, 1 s resolution, is printed beside it).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = ["trainer.max_steps=10", "trainer.warmup_steps=2", "trainer.log_every=1000"]
FLOORS = {"import torch": "import torch",
          "import torch + an optimizer": "import torch; torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)"}
TARGET_FIRST_STEP, TARGET_EXIT_S, TARGET_SLURM_S = 1.3, 0.2, 3.0


def timed(code: str) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return time.time() - t0


def local_run(out: Path, ranks: int) -> dict:
    """One local run: launch -> first step, record written -> launcher exit, rank 0's start-up marks."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "pipeline.launch", f"cluster.tasks_per_node={ranks}", *RUN,
                    f"hydra.run.dir={out}"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    exited = time.time()
    record = json.loads((out / "result.json").read_text())
    first = record["provenance"]["first_step_at_unix"]
    marks = record["startup"]
    return {"first_step": first - t0, "record_to_exit": exited - (out / "result.json").stat().st_mtime,
            "exit": exited - t0, "rank_started": first - marks["first_step"] - t0, "marks": marks}


def slurm_run(out: Path) -> dict:
    """One Slurm job: submit -> first step (by the launcher's timestamp and by sacct's), rank 0's start-up marks."""
    subprocess.run([sys.executable, "-m", "pipeline.launch", "cluster=slurm", "nodes=1", *RUN, "wait=true",
                    f"hydra.run.dir={out}"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    job = json.loads((out / "manifest.json").read_text())["points"]["0"]["jobs"][0]
    record = json.loads((out / "result.json").read_text())
    first, marks = record["provenance"]["first_step_at_unix"], record["startup"]
    submit = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job["job_id"], "-o", "Submit"], capture_output=True,
                            text=True, check=True).stdout.split()[0]
    submitted = datetime.fromisoformat(job["submitted_at"]).timestamp()
    return {"first_step": first - submitted, "by_sacct": first - datetime.fromisoformat(submit).timestamp(),
            "rank_started": first - marks["first_step"] - submitted, "marks": marks}


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):5.2f} s  (min {min(values):.2f}, max {max(values):.2f})"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def top_imports(module: str, n: int = 8) -> list[tuple[float, str]]:
    """What `import MODULE` loads one level down, by cumulative import time (python -X importtime)."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stderr
    rows = []
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if m and len(m.group(2)) == 2:  # imported by MODULE's own import (one level down), or first by a sibling
            rows.append((int(m.group(1)) / 1e6, m.group(3)))
    return sorted(rows, reverse=True)[:n]


def local_section(tmp: Path, repeats: int, ranks_list: list[int]) -> None:
    floors = {name: [] for name in FLOORS}
    runs = {ranks: [] for ranks in ranks_list}
    for r in range(repeats):  # interleaved, so that the machine's drift touches floors and runs alike
        for name, code in FLOORS.items():
            floors[name].append(timed(code))
        for ranks in ranks_list:
            runs[ranks].append(local_run(tmp / f"local{ranks}-{r}", ranks))
    floor = {name: statistics.median(v) for name, v in floors.items()}
    torch_floor, training_floor = floor["import torch"], floor["import torch + an optimizer"]
    print(f"local debug mode, {repeats} repeats, {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    for name, values in floors.items():
        print(f"  floor: {name:27s} {summary(values)}")
    for ranks, rows in runs.items():
        first = [row["first_step"] for row in rows]
        ratio, ratio_training = statistics.median(first) / torch_floor, statistics.median(first) / training_floor
        print(f"  {ranks} rank(s)")
        print(f"    launch -> first training step  {summary(first)}   {ratio:.2f}x import torch, "
              f"{ratio_training:.2f}x the training floor (target <= {TARGET_FIRST_STEP}x import torch: "
              f"{verdict(ratio <= TARGET_FIRST_STEP)})")
        record_to_exit = [row["record_to_exit"] for row in rows]
        print(f"    record written -> exit         {summary(record_to_exit)}   (target <= {TARGET_EXIT_S} s: "
              f"{verdict(statistics.median(record_to_exit) <= TARGET_EXIT_S)})")
        print(f"    launch -> exit (10 steps)      {summary([row['exit'] for row in rows])}")
        print_phases(rows, "launch")


def print_phases(rows: list[dict], origin: str) -> None:
    print(f"    rank 0's start-up, median seconds after {origin} (and each phase's own seconds):")
    previous = 0.0
    for mark in ["rank_started", "ready", "rendezvous", "datasets", "model", "trainer", "probe", "first_step"]:
        if mark != "rank_started" and mark not in rows[0]["marks"]:
            continue
        at = statistics.median(row["rank_started"] + (row["marks"][mark] if mark != "rank_started" else 0)
                               for row in rows)
        print(f"      {mark:12s} at {at:5.2f} s   (+{at - previous:.2f})")
        previous = at


def slurm_section(tmp: Path, repeats: int) -> None:
    reachable = os.environ.get("SLURM_CONF") and subprocess.run(["sinfo"], capture_output=True).returncode == 0
    if not reachable:
        print("Slurm: no cluster reachable (set SLURM_CONF, e.g. source /tmp/pipeline-slurm/env.sh)")
        return
    rows = [slurm_run(tmp / f"slurm{r}") for r in range(repeats)]
    first = [row["first_step"] for row in rows]
    print(f"Slurm, 1 node, 1 rank, {repeats} repeats")
    print(f"  submit -> first step            {summary(first)}   (target <= {TARGET_SLURM_S} s: "
          f"{verdict(statistics.median(first) <= TARGET_SLURM_S)})")
    print(f"  sacct Submit -> first step      {summary([row['by_sacct'] for row in rows])}   (whole seconds)")
    print_phases(rows, "submission")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-slurm", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        local_section(Path(tmp), args.repeats, args.ranks)
        print("imports of a rank (python -X importtime -c 'import pipeline.job.run'), cumulative:")
        for seconds, name in top_imports("pipeline.job.run"):
            print(f"  {seconds:5.2f} s  {name}")
        if not args.no_slurm:
            slurm_section(Path(tmp), args.repeats)


if __name__ == "__main__":
    main()
