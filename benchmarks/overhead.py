"""The pipeline's trainer against a minimal hand-written DDP loop: same model, data, batch, ranks, steps, backend.

    python benchmarks/overhead.py [--ranks 2] [--steps 400] [--repeats 15] [--model mlp]

Each repeat runs both, alternating (pipeline first on even repeats, baseline first on odd ones), as separate
process trees of `ranks` gloo processes on this machine: the pipeline through `python -m pipeline.launch` in
local debug mode (its own logging, TensorBoard and timing as users run it), the baseline as this file's
`--worker` mode. Both report throughput the same way: global batch x steps after warm-up / the slowest rank's
time from the end of warm-up to the end of its last step. Prints each pair, their ratio, and the median ratio.

    python benchmarks/overhead.py --aa [...]

runs the hand-written loop against itself in the same pattern: the spread of its ratios is this machine's noise,
the yardstick for reading the real comparison.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 20


def minimal_loop(model_name: str, steps: int, batch: int) -> None:
    """What a user writes by hand: DistributedSampler order, index the in-memory tensors, forward, backward, step."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    from pipeline.workloads.datasets import Synthetic
    from pipeline.workloads.models import CNN, MLP

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shape = (1, 28, 28) if model_name == "mlp" else (3, 32, 32)
    x, y = (torch.from_numpy(a) for a in Synthetic(shape, 10, 8192, 16, 6.0, 0).load("train"))
    torch.manual_seed(0)
    model = DistributedDataParallel(MLP(shape, 10) if model_name == "mlp" else CNN(shape, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = DistributedSampler(range(len(y)), num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    per_epoch, step = len(sampler) // batch, 0
    while step < steps:
        sampler.set_epoch(step // per_epoch)
        order = torch.as_tensor(list(sampler))
        for i in range(min(per_epoch, steps - step)):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == WARMUP:
                start = time.perf_counter()
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"throughput": batch * world * (steps - WARMUP) / elapsed.item()}))
    dist.barrier()  # as the pipeline does: no rank tears down the group while another still uses it
    dist.destroy_process_group()


def run_baseline(ranks: int, steps: int, batch: int, model: str) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--model", model, "--steps", str(steps),
                                       "--batch", str(batch)], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO))
    outs = [p.communicate()[0] for p in procs]
    # rank 0 prints its figure before teardown; gloo's teardown now and then aborts a rank that is already done
    # ("terminate called without an active exception"), which leaves the measurement whole
    if not outs[0].strip():
        raise RuntimeError(f"baseline failed (exit codes {[p.returncode for p in procs]})")
    return json.loads(outs[0])["throughput"]


def run_pipeline(ranks: int, steps: int, batch: int, model: str, out: Path, extra: list[str]) -> float:
    shape = [] if model == "mlp" else ["model=cnn", "dataset.image_shape=[3,32,32]"]
    subprocess.run([sys.executable, "-m", "pipeline.launch", f"cluster.tasks_per_node={ranks}", f"model={model}",
                    *shape, f"trainer.max_steps={steps}", "trainer.epochs=1000", f"trainer.batch_size={batch}",
                    f"trainer.warmup_steps={WARMUP}", f"hydra.run.dir={out}", *extra],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())["throughput_samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--aa", action="store_true", help="the hand-written loop against itself (noise floor)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra overrides for the pipeline's run")
    args = parser.parse_args()
    if args.worker:
        return minimal_loop(args.model, args.steps, args.batch)
    first = "hand-written" if args.aa else "pipeline"  # --aa: the same loop on both sides
    print(f"{args.model}, {args.ranks} gloo ranks, per-rank batch {args.batch}, {args.steps} steps "
          f"({WARMUP} warm-up), {args.repeats} repeats{', A/A' if args.aa else ''}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = ("pipeline", "baseline") if r % 2 == 0 else ("baseline", "pipeline")
            got = {}
            for which in order:
                got[which] = (run_pipeline(args.ranks, args.steps, args.batch, args.model, Path(tmp) / str(r),
                                           args.overrides)
                              if which == "pipeline" and not args.aa else
                              run_baseline(args.ranks, args.steps, args.batch, args.model))
            ratios.append(got["pipeline"] / got["baseline"])
            print(f"repeat {r + 1}: {first} {got['pipeline']:9.0f} samples/s   hand-written {got['baseline']:9.0f} "
                  f"samples/s   ratio {ratios[-1]:.3f}")
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    print(f"median ratio {first} / hand-written: {statistics.median(ratios):.3f} "
          f"(quartiles {quartiles[0]:.3f} to {quartiles[2]:.3f}; min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
