"""Where a training step's time goes beyond a bare DDP step: the pipeline's per-step additions, each added in
turn to a hand-written step, in one process (1 gloo rank, 1 thread), interleaved over repeats.

    python benchmarks/step_costs.py [--workload mlp|gpt] [--steps 2000] [--repeats 9]

Rows are cumulative: each adds one of the pipeline's per-step pieces to the row above, as the trainer runs it.
Prints the median microseconds per step of each row and its difference from the row above; the first row is
measured twice ("bare, again"), and that difference is the noise floor to read the others against.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29613")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

from pipeline.job.data import BatchSpec, InMemoryBatches, ItemFormat  # noqa: E402
from pipeline.job.observe import Phases, make_logger, write_progress  # noqa: E402
from pipeline.job.timing import StepTimer  # noqa: E402
from pipeline.job.trainer import dropout_seed  # noqa: E402
from pipeline.workloads.datasets import Synthetic, SyntheticTokens  # noqa: E402
from pipeline.workloads.losses import CrossEntropy  # noqa: E402
from pipeline.workloads.models import GPT, MLP, GPTConfig, MLPConfig  # noqa: E402
from pipeline.workloads.registry import defaults  # noqa: E402

ROWS = ["bare", "bare, again", "+ loss module (flattening)", "+ dropout reseed", "+ timer marks",
        "+ gradient hooks (comm mark)", "+ batches from InMemoryBatches, phase ranges", "+ report every 50 steps"]
LOG_EVERY = 50


def make(workload: str):
    torch.manual_seed(0)
    if workload == "gpt":
        return SyntheticTokens(256, 64, 4096, 16, 4, 0), GPT(256, **defaults(GPTConfig)), 16
    mlp = MLP((1, 28, 28), 10, **defaults(MLPConfig))
    return Synthetic((1, 28, 28), 10, 8192, 16, 6.0, 0, distinct=0), mlp, 64


def run(row: int, workload: str, steps: int, folder: Path) -> float:
    """Seconds per step with the first `row` additions."""
    dataset, raw, batch = make(workload)
    model = DistributedDataParallel(raw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = DistributedSampler(range(len(dataset)), num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    x, y = (torch.as_tensor(a) for a in dataset.arrays())
    loss_fn = CrossEntropy() if row >= 2 else (lambda out, t: F.cross_entropy(out.flatten(0, -2), t.flatten()))
    timer = StepTimer(torch.device("cpu"))
    if row >= 5:
        timer.watch(raw)
    source = InMemoryBatches(dataset, BatchSpec(size=batch, device=torch.device("cpu"), items=ItemFormat("x", "y")),
                             on_device=False)
    phase = Phases(profiling=False, nvtx=False, cuda=False).range
    metrics = make_logger(True, True, folder) if row >= 7 else None

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            if row >= 6:
                yield from (b[:2] for b in source.batches(list(sampler), drop_last=True))
            else:
                order = torch.as_tensor(list(sampler))
                for i in range(len(order) // batch):
                    idx = order[i * batch:(i + 1) * batch]
                    yield x[idx], y[idx]
            epoch += 1

    it, rng = batches(), torch.default_generator
    timer.start()
    t0 = time.perf_counter()
    for step in range(steps):
        if row >= 6:
            with phase("data"):
                xb, yb = next(it)
        else:
            xb, yb = next(it)
        if row >= 3:
            rng.manual_seed(dropout_seed(0, 0, step, 1))
        if row >= 4:
            timer.data_ready()
        with phase("forward") if row >= 6 else _null:
            loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if row >= 4:
            timer.backward_done()
        opt.step()
        if row >= 4:
            timer.step_done()
        if metrics is not None and (step + 1) % LOG_EVERY == 0:
            value = loss.item()
            recent = timer.phases(last=LOG_EVERY).mean(axis=0) * 1e3
            metrics.log({"train/loss": value, "time/step_ms": recent[0], "time/data_ms": recent[1],
                         "time/compute_ms": recent[2], "time/comm_ms": recent[3]}, step)
            write_progress(folder, step=step, total=steps, samples_per_s=1.0, eta_s=1.0, loss=value)
    elapsed = time.perf_counter() - t0
    if metrics is not None:
        metrics.close()
    return elapsed / steps


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_null = _Null()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=("mlp", "gpt"), default="mlp")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    times: dict[int, list[float]] = {r: [] for r in range(len(ROWS))}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for row in range(len(ROWS)):
                times[row].append(run(row if row != 1 else 0, args.workload, args.steps, Path(tmp)))
    dist.destroy_process_group()
    print(f"{args.workload}, 1 gloo rank, 1 thread, {args.steps} steps x {args.repeats} repeats (medians)")
    previous = None
    for row, name in enumerate(ROWS):
        us = statistics.median(times[row]) * 1e6
        delta = "" if previous is None else f"{us - previous:+8.1f}"
        print(f"  {name:48s} {us:8.1f} us/step {delta}")
        previous = us
    bare, full = statistics.median(times[0]), statistics.median(times[len(ROWS) - 1])
    print(f"all additions: {(full - bare) * 1e6:+.1f} us/step, {full / bare - 1:+.2%} of the bare step")


if __name__ == "__main__":
    main()
