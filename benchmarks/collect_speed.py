"""How long `pipeline.collect` takes on a large collection: 10,000 records, each rank with 100 step times.

    python benchmarks/collect_speed.py [--records 10000] [--repeats 3]

Generates the records in a temporary folder, then times the collector in a fresh process (as a user runs it):
reading, aggregating, fitting, writing the tables and report, with `--no-plots` and then with the plots (4 figures
per 4 groups: 20 figures for the 20 groups here). Prints the wall time of each repeat.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.records_factory import make_record, write_record  # noqa: E402


def generate(root: Path, n: int) -> None:
    """n records: 20 experiment groups (model x batch x precision) x 4 node counts (1, 2, 4, 8; a rank per node)
    x repeats, each rank with 100 step times."""
    groups = [(m, b, p) for m in ("mlp", "cnn") for b in (16, 32, 64, 128, 256) for p in ("fp32", "bf16")][:25]
    for i in range(n):
        model, batch, precision = groups[i % len(groups)]
        nodes = (1, 2, 4, 8)[(i // len(groups)) % 4]
        tpn = 1
        rec = make_record(nodes=nodes, tasks_per_node=tpn, throughput=1000.0 * nodes ** 0.9 * (1 + (i % 7) / 100),
                          per_rank_batch=batch, model=model, precision=precision, steps=100)
        write_record(root / f"sweep{i // 1000}" / str(i), rec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        generate(root / "runs", args.records)
        size = sum(p.stat().st_size for p in (root / "runs").rglob("result.json")) / 1e6
        print(f"generated {args.records} records ({size:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        for repeat in range(args.repeats):
            for label, extra in (("without plots", ["--no-plots"]), ("with plots", [])):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "pipeline.collect", str(root / "runs"), "--out",
                                str(root / f"out{repeat}"), *extra], check=True, stdout=subprocess.DEVNULL)
                print(f"collect {label}, repeat {repeat + 1}: {time.perf_counter() - t0:.2f} s (process start to exit)")


if __name__ == "__main__":
    main()
