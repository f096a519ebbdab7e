"""What the health check costs a job before training: its seconds (`health.seconds` in the record, and its parts),
on 2 and 4 local gloo ranks (local debug mode: simulated nodes on this one machine, so its compute step runs node by
node), and the A/A noise: the same configuration measured twice, interleaved, the difference of the two medians.

    python benchmarks/health_cost.py [--repeats 3] [--nodes 2 4]

Each repeat is a short run of the default workload with one thread per rank. Prints, per node count, the median and
range of the check's cost and of each part (compute, links, confirm), the A/A difference, and the last run's figures
of every node.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checked(nodes: int, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "pipeline.launch", f"nodes={nodes}", "trainer.max_steps=6",
                    "trainer.warmup_steps=1", "trainer.log_every=1000", "dataset.train_size=2048",
                    "dataset.test_size=64", "trainer.tensorboard=false", f"hydra.run.dir={out}"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((out / "result.json").read_text())["health"]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s median (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in args.nodes:
            a, b = [], []
            for r in range(args.repeats):  # A and A' interleaved: what the machine's drift does to one median
                a.append(checked(nodes, Path(tmp) / f"{nodes}-a{r}"))
                b.append(checked(nodes, Path(tmp) / f"{nodes}-b{r}"))
            every = a + b
            print(f"{nodes} nodes ({every[-1]['mode']}, {every[-1]['machines']} machine(s)), {len(every)} runs: "
                  f"health check {summary([h['seconds'] for h in every])}")
            for phase in every[-1]["phases"]:
                print(f"  {phase:8} {summary([h['phases'][phase] for h in every])}")
            aa = statistics.median(h["seconds"] for h in a) - statistics.median(h["seconds"] for h in b)
            print(f"  A/A: median of {args.repeats} minus median of {args.repeats} identical runs: {aa:+.2f} s")
            for n in every[-1]["nodes"]:
                print(f"  {n['node']}: GEMM {n['gemm_gflops'] or 0:.1f} GFLOP/s (CPU share {n['cpu_share'] or 0:.2f}),"
                      f" best link {n['link_gb_s'] or 0:.2f} GB/s, latency {n['latency_us'] or 0:.0f} us")
            for note in every[-1]["notes"]:
                print(f"  note: {note}")


if __name__ == "__main__":
    main()
