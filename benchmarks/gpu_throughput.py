"""Images/s of the seed models on one GPU: a naive loop, then the pipeline with each fast-path option added.

    python benchmarks/gpu_throughput.py [--steps 300] [--batch 512] [--models mlp cnn]
    python benchmarks/gpu_throughput.py --device cpu --steps 20      # a smoke run of the same code on a CPU

naive: the usual hand-written loop, a DataLoader over a TensorDataset in host memory (shuffled, per-sample
collation), fp32, batches copied to the GPU every step. The other rows run the pipeline itself (one rank,
local debug mode) and read throughput from its record; each row adds one option to the row above. Throughput
excludes the first 20 steps (warm-up, and compilation for torch.compile). Prints a table with each row's ratio
to the naive loop, the device name and the date.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 20
SHAPES = {"mlp": (1, 28, 28), "cnn": (3, 32, 32)}
# cumulative: each row adds its overrides to the previous row's
ROWS = [
    ("pipeline: fp32, data on host (pinned)", ["trainer.precision=fp32", "trainer.data_on_device=false",
                                               "trainer.channels_last=false"]),
    ("+ dataset held on the GPU", ["trainer.data_on_device=true"]),
    ("+ bf16 autocast", ["trainer.precision=bf16"]),
    ("+ channels_last", ["trainer.channels_last=true"]),
    ("+ DDP gradient_as_bucket_view, static_graph", ["ddp.gradient_as_bucket_view=true", "ddp.static_graph=true"]),
    ("+ torch.compile", ["trainer.compile=true"]),
]


def naive(model_name: str, steps: int, batch: int, device: str, train_size: int) -> float:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.workloads.datasets import Synthetic
    from pipeline.workloads.models import CNN, MLP

    shape = SHAPES[model_name]
    x, y = (torch.from_numpy(a) for a in Synthetic(shape, 10, train_size, 16, 6.0, 0).load("train"))
    torch.manual_seed(0)
    model = (MLP(shape, 10) if model_name == "mlp" else CNN(shape, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True)
    step = 0
    while step < steps:
        for xb, yb in loader:
            if step == WARMUP:
                sync(device)
                start = time.perf_counter()
            loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    sync(device)
    return batch * (steps - WARMUP) / (time.perf_counter() - start)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def pipeline_run(model: str, overrides: list[str], steps: int, batch: int, device: str, train_size: int,
                 out: Path) -> float:
    shape = "[1,28,28]" if model == "mlp" else "[3,32,32]"
    subprocess.run([sys.executable, "-m", "pipeline.launch", f"model={model}", f"dataset.image_shape={shape}",
                    f"dataset.train_size={train_size}", f"trainer.batch_size={batch}", f"trainer.max_steps={steps}",
                    "trainer.epochs=1000", f"trainer.warmup_steps={WARMUP}", "trainer.log_every=100000",
                    f"trainer.device={device}", *overrides, f"hydra.run.dir={out}"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())["throughput_samples_per_s"]


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--train-size", type=int, default=16384)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=list(SHAPES))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    print(f"{device_name(args.device)}, {date.today()}, per-step batch {args.batch}, {args.steps} steps "
          f"({WARMUP} warm-up excluded)")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            base = naive(model, args.steps, args.batch, args.device, args.train_size)
            print(f"\n{model}\n  {'loop':48} {'images/s':>12} {'x naive':>8}")
            print(f"  {'naive: DataLoader from host memory, fp32':48} {base:12.0f} {1.0:8.2f}")
            overrides: list[str] = []
            for i, (name, extra) in enumerate(ROWS):
                if name == "+ channels_last" and model == "mlp":
                    continue
                overrides += extra
                rate = pipeline_run(model, overrides, args.steps, args.batch, args.device, args.train_size,
                                    Path(tmp) / f"{model}{i}")
                print(f"  {name:48} {rate:12.0f} {rate / base:8.2f}")


if __name__ == "__main__":
    main()
