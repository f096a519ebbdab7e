"""The pipeline's trainer against a hand-written DDP (or FSDP2) loop doing the same work: same model, data, data path
(in-memory indexing or a DataLoader with the same settings), optimizer, batch, ranks, steps and backend.

    python benchmarks/overhead.py [--workload mlp|loader|resnet|gpt|gpt_fsdp ...] [--ranks 2] [--repeats 11]
    python benchmarks/overhead.py --aa [...]          the hand-written loop against itself: this machine's noise
    python benchmarks/overhead.py --tracking mlflow [--aa] [...]   the pipeline logging to a tracker against the
                                                      pipeline without (--aa: without against without)

Rows (workloads):
  mlp     the seed MLP on MNIST-shaped synthetic data, batches indexed from memory
  loader  the same through torch's DataLoader (DistributedSampler, 1 worker process per rank)
  resnet  ResNet-18 (CIFAR stem) on CIFAR-shaped synthetic data, from memory
  gpt     the tiny GPT on synthetic tokens (context 64), AdamW, from memory
  gpt_fsdp  the same under parallel=fsdp, against a hand-written FSDP2 loop: fully_shard on each block, then on the
          root, the optimizer made after

Each repeat runs both, alternating which goes first, as separate process trees of `ranks` gloo processes: the
pipeline through `python -m pipeline.launch` in local debug mode (its logging, TensorBoard and timing as users
run it), the hand-written loop as this file's `--worker` mode. Both report throughput the same way: global batch
x steps after warm-up / the slowest rank's time from the end of warm-up to the end of its last step. Prints each
pair, their ratio, and per row the median ratio with its quartiles.

--tracking mlflow|wandb: the pipeline with tracking=[that] (every trainer.log_every report through rank 0's queue
to its background thread) against the same pipeline without. MLflow: a local `mlflow server` this benchmark starts
(SQLite store, on loopback, at nice 19: it stands in for a server elsewhere, and takes what the ranks leave of this
machine's cores); W&B: offline mode, its own service process (wandb-core) writing the run files, as on a compute
node. With as many ranks as cores, what the tracker's process does is taken from the ranks; with --ranks 1 a core
is left for it, as a node's spare cores would be.
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 20
# workload: (pipeline overrides, per-rank batch, steps); the hand-written loop builds the same (hand_written below)
WORKLOADS = {
    "mlp": (["model=mlp"], 64, 3000),
    "loader": (["model=mlp", "loader.kind=dataloader", "loader.num_workers=1"], 64, 1500),
    "resnet": (["model=resnet18", "dataset.image_shape=[3,32,32]", "dataset.train_size=2048"], 8, 60),
    "gpt": (["model=gpt_tiny", "dataset=synthetic_tokens", "optimizer=adamw"], 16, 300),
    "gpt_fsdp": (["model=gpt_tiny", "dataset=synthetic_tokens", "optimizer=adamw", "parallel=fsdp"], 16, 300),
}


def hand_written(workload: str, steps: int, batch: int) -> None:
    """What a user writes by hand: DistributedSampler order, batches indexed from memory (or a DataLoader), forward,
    loss, backward, step."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from pipeline.workloads.datasets import Synthetic, SyntheticTokens
    from pipeline.workloads.models import GPT, MLP, GPTConfig, MLPConfig, ResNet, ResNetConfig
    from pipeline.workloads.registry import defaults

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    if workload.startswith("gpt"):
        dataset = SyntheticTokens(256, 64, 4096, 16, 4, 0)
        model = GPT(256, **defaults(GPTConfig))
    else:
        shape = (3, 32, 32) if workload == "resnet" else (1, 28, 28)
        dataset = Synthetic(shape, 10, 2048 if workload == "resnet" else 8192, 16, 6.0, 0, distinct=0)
        model = (ResNet(shape, 10, **defaults(ResNetConfig)) if workload == "resnet"
                 else MLP(shape, 10, **defaults(MLPConfig)))
    if workload == "gpt_fsdp":  # torchtitan's order: each block, then the root (embeddings, tied head)
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model, reshard_after_forward=False)  # torchtitan's and the pipeline's: backward needs it first
    else:
        model = DistributedDataParallel(model)
    # made after wrapping: FSDP's sharded parameters are not the ones the model was built with
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01) if workload.startswith("gpt")
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    sampler = DistributedSampler(range(len(dataset)), num_replicas=world, rank=rank, shuffle=True, seed=0,
                                 drop_last=True)
    x, y = (torch.as_tensor(a) for a in dataset.arrays())  # the split made before any worker forks
    if workload == "loader":
        loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=1)
    per_epoch, step = len(sampler) // batch, 0
    while step < steps:
        sampler.set_epoch(step // per_epoch)
        if workload == "loader":
            batches = iter(loader)
        else:
            order = torch.as_tensor(list(sampler))
            batches = ((x[order[i * batch:(i + 1) * batch]], y[order[i * batch:(i + 1) * batch]])
                       for i in range(per_epoch))
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb).flatten(0, -2), yb.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == WARMUP:
                start = time.perf_counter()
            if step == steps:
                break
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"throughput": batch * world * (steps - WARMUP) / elapsed.item()}))
    dist.barrier()  # as the pipeline does: no rank tears the group down while another still uses it
    dist.destroy_process_group()


def run_hand_written(workload: str, ranks: int) -> float:
    _, batch, steps = WORKLOADS[workload]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--workload", workload, "--steps",
                                       str(steps)], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO))
    outs = [p.communicate()[0] for p in procs]
    # rank 0 prints its figure before teardown; gloo's teardown now and then aborts a rank that is already done
    # ("terminate called without an active exception"), which leaves the measurement whole
    if not outs[0].strip():
        raise RuntimeError(f"hand-written loop failed (exit codes {[p.returncode for p in procs]})")
    return json.loads(outs[0])["throughput"]


def run_pipeline(workload: str, ranks: int, out: Path, tracking: tuple[str, ...] = ()) -> float:
    overrides, batch, steps = WORKLOADS[workload]
    subprocess.run([sys.executable, "-m", "pipeline.launch", f"cluster.tasks_per_node={ranks}", *overrides, *tracking,
                    f"trainer.max_steps={steps}", "trainer.epochs=1000", f"trainer.batch_size={batch}",
                    f"trainer.warmup_steps={WARMUP}", "trainer.eval_samples=64", f"hydra.run.dir={out}"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "result.json").read_text())["throughput_samples_per_s"]


def measure(workload: str, ranks: int, repeats: int, aa: bool, tmp: Path, tracking: tuple[str, ...] = ()
            ) -> list[float]:
    """`repeats` pairs, alternating which goes first: the pipeline (tracked, where `tracking` is given) against the
    hand-written loop (the untracked pipeline, where `tracking` is given); A/A: the baseline against itself."""
    if tracking:
        names = ("pipeline untracked" if aa else "pipeline tracked", "pipeline untracked")
        runs = {"first": lambda out: run_pipeline(workload, ranks, out, () if aa else tracking),
                "baseline": lambda out: run_pipeline(workload, ranks, out)}
    else:
        names = ("hand-written" if aa else "pipeline", "hand-written")
        runs = {"first": (lambda out: run_hand_written(workload, ranks)) if aa else
                (lambda out: run_pipeline(workload, ranks, out)),
                "baseline": lambda out: run_hand_written(workload, ranks)}
    ratios = []
    for r in range(repeats):
        got = {which: runs[which](tmp / f"{workload}{r}-{which}")
               for which in (("first", "baseline") if r % 2 == 0 else ("baseline", "first"))}
        ratios.append(got["first"] / got["baseline"])
        print(f"  repeat {r + 1}: {names[0]} {got['first']:9.1f} samples/s   {names[1]} {got['baseline']:9.1f} "
              f"samples/s   ratio {ratios[-1]:.3f}", flush=True)
    return ratios


@contextlib.contextmanager
def tracker(name: str | None, tmp: Path):
    """The overrides that log to `name` (none for None); MLflow's server started here, stopped at the end."""
    if name is None:
        yield ()
    elif name == "wandb":
        yield ("tracking=[wandb]", "tracking.wandb.mode=offline")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # niced: it stands in for a server on another machine, and takes what the ranks leave of this one's cores
        server = subprocess.Popen(["nice", "-n", "19", str(Path(sys.executable).parent / "mlflow"), "server",
                                   "--backend-store-uri",
                                   f"sqlite:///{tmp / 'mlflow.db'}", "--default-artifact-root", str(tmp / "artifacts"),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.3)
            yield ("tracking=[mlflow]", f"tracking.mlflow.uri=http://127.0.0.1:{port}")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, help="steps per run, for every workload (default: each row's own)")
    parser.add_argument("--aa", action="store_true", help="the hand-written loop against itself (noise floor); "
                                                          "with --tracking, the untracked pipeline against itself")
    parser.add_argument("--tracking", choices=("mlflow", "wandb"),
                        help="the pipeline logging to this tracker against the pipeline without")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps:
        for name, (overrides, batch, _) in WORKLOADS.items():
            WORKLOADS[name] = (overrides, batch, max(args.steps, WARMUP + 1))
    if args.worker:
        _, batch, steps = WORKLOADS[args.workload[0]]
        return hand_written(args.workload[0], steps, batch)
    if args.tracking:
        compared = "untracked / untracked" if args.aa else f"tracking=[{args.tracking}] / untracked"
    else:
        compared = f"{'hand-written' if args.aa else 'pipeline'} / hand-written"
    summary = []
    with tempfile.TemporaryDirectory() as tmp, tracker(args.tracking, Path(tmp)) as tracking:
        for workload in args.workload:
            _, batch, steps = WORKLOADS[workload]
            print(f"{workload}: {args.ranks} gloo ranks, per-rank batch {batch}, {steps} steps ({WARMUP} warm-up), "
                  f"{args.repeats} repeats{', A/A' if args.aa else ''}", flush=True)
            ratios = measure(workload, args.ranks, args.repeats, args.aa, Path(tmp), tracking)
            q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
            summary.append(f"{workload:7s} median ratio {compared}: {statistics.median(ratios):.3f} "
                           f"(quartiles {q[0]:.3f} to {q[2]:.3f}; min {min(ratios):.3f}, max {max(ratios):.3f})")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
