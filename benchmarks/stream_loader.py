"""A stream against the same data held in memory and through torch's DataLoader: the pipeline three ways on one
dataset, side by side in one run.

    python benchmarks/stream_loader.py [--workload mlp gpt] [--ranks 2] [--workers 1] [--repeats 5] [--aa]

Paths (loader.*):
  memory      the built-in dataset's arrays, batches indexed from memory (the default for it)
  dataloader  torch's DataLoader over the same dataset by index (DistributedSampler, `--workers` per rank)
  stream      the same samples as a stream (AsStream below: an IterableDataset of the dataset's items that shares
              itself out by rank and DataLoader worker and keeps its position), through torchdata's
              StatefulDataLoader with `--workers` per rank: the position every batch, the ranks' agreement on the
              epoch's end every step (loader.epoch_samples null)

Rows (workloads): mlp, the seed MLP on MNIST-shaped synthetic data (fast steps: the data path shows); gpt, the tiny
GPT on synthetic tokens (context 64), AdamW. Each repeat runs the three in a rotating order, each as its own launch
of `ranks` gloo processes in local debug mode; evaluation off. Prints each repeat's samples/s (global batch x steps
after warm-up / the slowest rank's time: the record's throughput) and the ranks' largest peak resident set, then
per row the median ratios stream/memory and stream/dataloader with their quartiles. --aa: memory against memory
(a second memory run in the stream's place), this machine's noise for the same ratios.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

REPO = Path(__file__).resolve().parents[1]
WARMUP = 20
# workload: (the model and its data's overrides, the dataset's target and arguments, per-rank batch, steps)
WORKLOADS = {
    "mlp": (["model=mlp"], "pipeline.workloads.datasets.Synthetic", "synthetic", 64, 1500),
    "gpt": (["model=gpt_tiny", "dataset=synthetic_tokens", "optimizer=adamw"],
            "pipeline.workloads.datasets.SyntheticTokens", "synthetic_tokens", 16, 300),
}
FACTS = ("input_shape", "num_classes", "vocab_size", "seq_len")


class AsStream(IterableDataset):
    """A map-style dataset's items as a stream: this rank's every world_size-th item, split among its DataLoader
    workers the same way; its state, the items this worker has yielded. The dataset's facts (its shapes, classes,
    vocabulary) are its own."""

    def __init__(self, inner, rank: int = 0, world_size: int = 1):
        self.inner, self.rank, self.world_size = inner, rank, world_size
        self.yielded, self.resume = 0, 0

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        self.yielded, self.resume = self.resume, 0
        for i in range(slot + self.yielded * slots, len(self.inner), slots):
            self.yielded += 1
            yield self.inner[i]

    def state_dict(self) -> dict:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.resume = state["yielded"]

    def __getattr__(self, name: str):
        if name in FACTS:
            return getattr(self.__dict__["inner"], name)
        raise AttributeError(name)


def config_dir(tmp: Path) -> Path:
    """dataset/<name>_stream.yaml for each workload's dataset: AsStream around it, with its built-in schema's
    defaults (what the memory and dataloader paths build it from), the token dataset's seq_len the model's context."""
    from pipeline.workloads.datasets import SyntheticConfig, SyntheticTokensConfig

    for workload, (_, target, name, _, _) in WORKLOADS.items():
        schema = SyntheticConfig() if workload == "mlp" else SyntheticTokensConfig(seq_len=64)
        arguments = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in vars(schema).items() if not k.startswith("_"))
        path = tmp / "conf" / "dataset" / f"{name}_stream.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"_target_: benchmarks.stream_loader.AsStream\ninner:\n  _target_: {target}\n{arguments}")
    return tmp / "conf"


def launch(workload: str, path: str, ranks: int, workers: int, out: Path, conf: Path) -> tuple[float, int]:
    """One launch: (throughput, the ranks' largest peak RSS in bytes)."""
    overrides, _, name, batch, steps = WORKLOADS[workload]
    paths = {"memory": ["loader.kind=memory"],
             "dataloader": ["loader.kind=dataloader", f"loader.num_workers={workers}"],
             "stream": [f"dataset={name}_stream", f"loader.num_workers={workers}"]}
    subprocess.run([sys.executable, "-m", "pipeline.launch", f"cluster.tasks_per_node={ranks}", *overrides,
                    *paths[path], f"trainer.max_steps={steps}", "trainer.epochs=1000", f"trainer.batch_size={batch}",
                    f"trainer.warmup_steps={WARMUP}", "evaluate.enabled=false", "trainer.tensorboard=false",
                    f"hydra.searchpath=[file://{conf}]", f"hydra.run.dir={out}"],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    record = json.loads((out / "result.json").read_text())
    return record["throughput_samples_per_s"], max(r["memory"]["peak_bytes"] for r in record["ranks"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank (dataloader, stream)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, help="steps per run, for every workload (default: each row's own)")
    parser.add_argument("--aa", action="store_true", help="memory in the stream's place: the noise of the ratios")
    args = parser.parse_args()
    if args.steps:
        for name, row in WORKLOADS.items():
            WORKLOADS[name] = (*row[:4], args.steps)
    print(f"torch {torch.__version__}, {args.ranks} rank(s), {args.workers} worker(s) per rank, {os.cpu_count()} "
          f"CPU(s){', A/A: memory in the stream place' if args.aa else ''}", flush=True)
    paths = ["memory", "dataloader", "stream"]
    with tempfile.TemporaryDirectory() as tmp:
        conf = config_dir(Path(tmp))
        for workload in args.workload:
            print(f"{workload}:", flush=True)
            ratios = {"stream/memory": [], "stream/dataloader": []}
            for r in range(args.repeats):
                order = paths[r % 3:] + paths[:r % 3]
                got = {p: launch(workload, "memory" if args.aa and p == "stream" else p, args.ranks, args.workers,
                                 Path(tmp) / f"{workload}{r}-{p}", conf) for p in order}
                ratios["stream/memory"].append(got["stream"][0] / got["memory"][0])
                ratios["stream/dataloader"].append(got["stream"][0] / got["dataloader"][0])
                print("  repeat {}: ".format(r + 1) + "   ".join(
                    f"{p} {got[p][0]:9.1f} samples/s ({got[p][1] / 2**20:.0f} MiB)" for p in paths), flush=True)
            for name, values in ratios.items():
                q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
                print(f"  {name}: median {statistics.median(values):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}, "
                      f"{len(values)} repeats)", flush=True)


if __name__ == "__main__":
    main()
