"""Throughput on one GPU. The seed models: a naive loop, then the pipeline with each fast-path option added. The
models worth scaling (ResNet-50 on 224x224 images, GPT-2 small on 1024-token sequences): a hand-written bf16
loop against the pipeline with the same settings, with MFU.

    python benchmarks/gpu_throughput.py [--steps 300] [--batch 512] [--models mlp cnn]
        [--large resnet50 gpt2_small gpt2_small_fsdp] [--large-steps 120] [--warmup 20]
    python benchmarks/gpu_throughput.py --device cpu --steps 22 --large-steps 22 --models cnn --large resnet50 \
        gpt2_small --large-batch 2 --image-size 32 --context 32 --no-compile --tiny  # a smoke run of the same code

benchmarks/gpu_check.sh runs the essential rows of it, sized for a short lease of a GPU machine.

naive: the usual hand-written loop, a DataLoader over a TensorDataset in host memory (shuffled, per-sample
collation), fp32, batches copied to the GPU every step. The other rows run the pipeline itself (one rank,
local debug mode) and read throughput from its record; each row adds one option to the row above. Throughput
excludes the first `--warmup` steps (20: warm-up, and compilation for torch.compile). Prints a table with each
row's ratio to the naive loop, the device name and the date.

Large rows: both sides hold a pool of synthetic samples on the GPU (256 images, or token sequences), train in
bf16 autocast with torch.compile (unless --no-compile), and run `--large-steps` steps; the hand-written loop is
the usual one (no DDP wrapper, as on one GPU). MFU = FLOPs per sample (torch's flop counter, forward and
backward) x samples/s / the GPU's dense bf16 peak (pipeline/job/flops.py); tokens/s = samples/s x context.
`gpt2_small_fsdp` is the pipeline's GPT-2 small under parallel=fsdp (bf16 parameters through FSDP2's
MixedPrecisionPolicy) beside the same hand-written loop; every large row prints the pipeline's peak memory per rank
(CUDA's max_memory_allocated; a CPU's peak resident set). `--tiny`, for smoke runs on a CPU: the large models' own
layouts at a fraction of their size (ResNet-50's blocks at width 8, GPT-2 small's at 2 layers of width 64), said
in each row's heading; the code that runs is the same.
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
# This checkout's pipeline, installed or not: imported from REPO here, run with REPO as the working folder and
# with REPO's conf/ as the primary config (installed, conf/ is the package pipeline.conf that launch.py names)
sys.path.insert(0, str(REPO))
LAUNCH = [sys.executable, "-m", "pipeline.launch", f"--config-path={REPO / 'conf'}"]
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


def naive(model_name: str, steps: int, warmup: int, batch: int, device: str, train_size: int) -> float:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.workloads.datasets import Synthetic
    from pipeline.workloads.models import CNN, MLP, CNNConfig, MLPConfig
    from pipeline.workloads.registry import defaults

    shape = SHAPES[model_name]
    x, y = (torch.from_numpy(a) for a in Synthetic(shape, 10, train_size, 16, 6.0, 0, distinct=0).arrays())
    torch.manual_seed(0)
    model = (MLP(shape, 10, **defaults(MLPConfig)) if model_name == "mlp"
             else CNN(shape, 10, **defaults(CNNConfig))).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True)
    step = 0
    while step < steps:
        for xb, yb in loader:
            if step == warmup:
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
    return batch * (steps - warmup) / (time.perf_counter() - start)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def pipeline_run(model: str, overrides: list[str], steps: int, warmup: int, batch: int, device: str,
                 train_size: int, out: Path) -> float:
    shape = "[1,28,28]" if model == "mlp" else "[3,32,32]"
    subprocess.run([*LAUNCH, f"model={model}", f"dataset.image_shape={shape}",
                    f"dataset.train_size={train_size}", f"trainer.batch_size={batch}", f"trainer.max_steps={steps}",
                    "trainer.epochs=1000", f"trainer.warmup_steps={warmup}", "trainer.log_every=100000",
                    f"trainer.device={device}", *overrides, f"hydra.run.dir={out}"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())["throughput_samples_per_s"]


LARGE = {
    "resnet50": ["model=resnet50", "dataset=synthetic", "dataset.num_classes=1000", "dataset.distinct=256",
                 "dataset.train_size=100000", "dataset.test_size=256", "optimizer=sgd", "optimizer.lr=0.1"],
    "gpt2_small": ["model=gpt2_small", "dataset=synthetic_tokens", "dataset.vocab_size=50304",
                   "dataset.train_size=4096", "dataset.test_size=64", "optimizer=adamw", "optimizer.lr=0.0006"],
}
# the same under FSDP2 (each block, then the root; bf16 parameters through FSDP's MixedPrecisionPolicy), on one
# rank: FSDP's own cost and memory beside DDP's, against the same hand-written loop
LARGE["gpt2_small_fsdp"] = [*LARGE["gpt2_small"], "parallel=fsdp"]
# --tiny: the same layouts, smaller (the hand-written loop's models and the pipeline's alike)
TINY = {"resnet": {"width": 8}, "gpt": {"layers": 2, "heads": 2, "width": 64}}


def large_hand_written(name: str, steps: int, warmup: int, batch: int, device: str, image_size: int, context: int,
                       compile_: bool, tiny: bool) -> tuple[float, float]:
    """(samples/s, FLOPs per sample) of the usual bf16 loop: data on the device, autocast, compiled model."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.workloads.datasets import Synthetic, SyntheticTokens
    from pipeline.workloads.models import GPT, ResNet, ResNetConfig
    from pipeline.workloads.registry import defaults

    torch.manual_seed(0)
    if name == "resnet50":
        shape = (3, image_size, image_size)
        x, y = (torch.as_tensor(a).to(device) for a in Synthetic(shape, 1000, 256, 16, 6.0, 0, distinct=0).arrays())
        model = ResNet(shape, 1000, **{**defaults(ResNetConfig), "depth": 50, **(TINY["resnet"] if tiny else {})}).to(
            device, memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        x, y = (torch.as_tensor(a).to(device) for a in SyntheticTokens(50304, context, 256, 16, 4, 0).arrays())
        size = TINY["gpt"] if tiny else {"layers": 12, "heads": 12, "width": 768}
        model = GPT(50304, **size, context_length=context, dropout=0.0).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step(xb, yb):
        with autocast:
            loss = F.cross_entropy(run(xb).flatten(0, -2), yb.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        with autocast:
            F.cross_entropy(model(x[:2]).flatten(0, -2), y[:2].flatten()).backward()
    flops = counter.get_total_flops() / 2
    run = torch.compile(model) if compile_ else model
    for i in range(steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        idx = torch.randint(0, len(x), (batch,), device=device)
        step(x[idx], y[idx])
    sync(device)
    return batch * (steps - warmup) / (time.perf_counter() - start), flops


def large_pipeline(name: str, steps: int, warmup: int, batch: int, device: str, image_size: int, context: int,
                   compile_: bool, tiny: bool, out: Path) -> dict:
    size = [f"dataset.image_shape=[3,{image_size},{image_size}]"] if name == "resnet50" else \
        [f"model.context_length={context}", f"dataset.seq_len={context}"]
    if tiny:
        size += [f"model.{k}={v}" for k, v in TINY["resnet" if name == "resnet50" else "gpt"].items()]
    subprocess.run([*LAUNCH, *LARGE[name], *size, f"trainer.batch_size={batch}",
                    f"trainer.max_steps={steps}", "trainer.epochs=1000", f"trainer.warmup_steps={warmup}",
                    "trainer.log_every=100000", "trainer.eval_samples=16", f"trainer.device={device}",
                    f"trainer.compile={str(compile_).lower()}", "trainer.precision=" + ("bf16" if device == "cuda"
                                                                                       else "fp32"),
                    f"hydra.run.dir={out}"], check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--train-size", type=int, default=16384)
    parser.add_argument("--models", nargs="*", default=["mlp", "cnn"], choices=list(SHAPES))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--large", nargs="*", default=list(LARGE), choices=list(LARGE))
    parser.add_argument("--large-steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of every row's throughput")
    parser.add_argument("--large-batch", type=int, default=None, help="default: 128 images, 8 sequences")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="the large models' layouts at a smoke size (CPU)")
    args = parser.parse_args()
    steps, large_steps = (max(n, args.warmup + 2) for n in (args.steps, args.large_steps))
    print(f"{device_name(args.device)}, {date.today()}, per-step batch {args.batch}, {steps} steps "
          f"({args.warmup} warm-up excluded)")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            base = naive(model, steps, args.warmup, args.batch, args.device, args.train_size)
            print(f"\n{model}\n  {'loop':48} {'images/s':>12} {'x naive':>8}")
            print(f"  {'naive: DataLoader from host memory, fp32':48} {base:12.0f} {1.0:8.2f}")
            overrides: list[str] = []
            for i, (name, extra) in enumerate(ROWS):
                if name == "+ channels_last" and model == "mlp":
                    continue
                overrides += extra
                rate = pipeline_run(model, overrides, steps, args.warmup, args.batch, args.device,
                                    args.train_size, Path(tmp) / f"{model}{i}")
                print(f"  {name:48} {rate:12.0f} {rate / base:8.2f}")
        hand_written: dict[str, tuple[float, float]] = {}  # the FSDP row's loop is the DDP row's: run once
        for name in args.large:
            batch = args.large_batch or (128 if name == "resnet50" else 8)
            loop = name.removesuffix("_fsdp")
            if loop not in hand_written:
                hand_written[loop] = large_hand_written(loop, large_steps, args.warmup, batch, args.device,
                                                        args.image_size, args.context, not args.no_compile, args.tiny)
            hand, flops = hand_written[loop]
            rec = large_pipeline(name, large_steps, args.warmup, batch, args.device, args.image_size, args.context,
                                 not args.no_compile, args.tiny, Path(tmp) / name)
            print_large(name, batch, hand, flops, rec, args.device, args.context, args.tiny)


def print_large(name: str, batch: int, hand: float, flops: float, rec: dict, device: str, context: int,
                tiny: bool) -> None:
    from pipeline.job.flops import peak_tflops

    peak = peak_tflops(device_name(device), "bf16")
    unit, per = ("tokens/s", context) if name.startswith("gpt2_small") else ("images/s", 1)
    pipe = rec["throughput_samples_per_s"]
    parallel = (rec.get("parallel") or {}).get("kind", "ddp")
    memory = rec["ranks"][0].get("memory") or {}
    # the pipeline's peak: CUDA's max_memory_allocated, or on a CPU the process's peak resident set
    held = f"{memory['peak_bytes'] / 2**30:.2f} GiB" if memory.get("peak_bytes") else "-"
    size = f" (tiny: {', '.join(f'{k} {v}' for k, v in TINY['resnet' if name == 'resnet50' else 'gpt'].items())})"
    print(f"\n{name}{size if tiny else ''}, batch {batch}, {rec['precision']}, compile {rec['fast_path']['compile']}, "
          f"{parallel}\n"
          f"  {'loop':48} {unit:>12} {'MFU':>8} {'peak memory':>12}")
    for label, rate, fl, mem in (("hand-written", hand, flops, "-"),
                                 ("pipeline", pipe, rec["flops_per_sample"], held)):
        mfu = f"{fl * rate / 1e12 / peak:8.1%}" if peak else f"{'-':>8}"
        print(f"  {label:48} {rate * per:12.0f} {mfu} {mem:>12}")
    print(f"  pipeline / hand-written: {pipe / hand:.3f}")


if __name__ == "__main__":
    main()
