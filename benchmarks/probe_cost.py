"""What the fabric probe costs a job: its seconds before training, on 2 and 4 local gloo ranks (local debug mode),
and the curve it measured.

    python benchmarks/probe_cost.py [--repeats 3] [--ranks 2 4]

Each repeat is a short run of the default workload (the seed MLP: a 407,080-byte gradient, so the probe goes up to
2 MiB); the probe's own clock (`fabric.seconds` in the record) is its cost. Prints the median and range per rank
count, and the last repeat's curve (bytes, time, algbw, busbw) with the fitted latency and bandwidth.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def probed(ranks: int, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "pipeline.launch", f"nodes={ranks}", "trainer.max_steps=6",
                    "trainer.log_every=1000", "dataset.train_size=2048", "dataset.test_size=64",
                    f"hydra.run.dir={out}"], check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())["fabric"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            fabrics = [probed(ranks, Path(tmp) / f"{ranks}-{r}") for r in range(args.repeats)]
            seconds = [f["seconds"] for f in fabrics]
            last = fabrics[-1]
            print(f"{ranks} gloo ranks (local, simulated nodes): probe {statistics.median(seconds):.2f} s median "
                  f"(min {min(seconds):.2f}, max {max(seconds):.2f}, {args.repeats} repeats); fit: latency "
                  f"{last['latency_us']:.1f} us per ring step, bandwidth {last['bandwidth_gb_s'] or 0:.3g} GB/s")
            for p in last["points"]:
                print(f"  {p['bytes']:>10} B  {p['time_s'] * 1e6:10.1f} us  algbw {p['algbw_gb_s']:8.4f} GB/s  "
                      f"busbw {p['busbw_gb_s']:8.4f} GB/s")


if __name__ == "__main__":
    main()
