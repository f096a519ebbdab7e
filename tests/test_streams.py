"""Streams (IterableDatasets) through the real CLI on 2 local ranks x 2 DataLoader workers: every sample once an
epoch, none twice (checked by id, as the model saw them); a run stopped mid-epoch (USR2 to the ranks) and
relaunched takes the uninterrupted run's samples in its order and ends at its weights, bitwise; data several times
larger than the memory the ranks may use trains in a memory cgroup with the peak memory of a small set; bad
streams are refused. The same preemption on the real Slurm: tests/test_slurm.py."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.result import Result
from tests.conftest import REPO, wait_for_step
from tests.streams import stream_env as env
from tests.streams import user_folder, write_shards

COMMON = ["nodes=2", "model=noting", "io.input_key=x", "io.target_key=label", "trainer.batch_size=5",
          "loader.num_workers=2", "trainer.warmup_steps=1", "trainer.log_every=10", "trainer.tensorboard=false",
          "probe.enabled=false", "health.enabled=false", "trainer.finite_check_every=2"]
@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    return user_folder(tmp_path_factory.mktemp("stream-user"))


def command(user: Path, run_dir: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.launch", *COMMON, *args, f"hydra.searchpath=[file://{user / 'conf'}]",
            f"hydra.run.dir={run_dir}"]


def train(user: Path, name: str, args: list[str], prefix: list[str] = (), timeout: float = 300):
    """A launch to its end: (its process, its folder, the ids each rank's steps took: a list of batches)."""
    run_dir, notes = user / "runs" / name, user / "notes" / name
    r = subprocess.run([*prefix, *command(user, run_dir, args)], cwd=user, env=env(user, notes), text=True,
                       capture_output=True, timeout=timeout)
    return r, run_dir, noted(notes)


def noted(notes: Path) -> dict[int, list[list[int]]]:
    return {int(p.stem.split("-")[1]): [[int(i) for i in line.split()] for line in p.read_text().splitlines()]
            for p in sorted(notes.glob("rank-*.txt"))}


def preempted_and_resumed(user: Path, name: str, args: list[str], at_step: int):
    """The run stopped by USR2 to both ranks once rank 0 is past `at_step` (they checkpoint together at the next
    finite check), then launched again the same way, which resumes it."""
    run_dir, notes = user / "runs" / name, user / "notes" / name
    proc = subprocess.Popen(command(user, run_dir, args), cwd=user, env=env(user, notes), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for pid in wait_for_step(run_dir, at_step, proc, ranks=2):
        os.kill(pid, signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "result.json").exists(), err[-3000:]
    stopped = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    r = subprocess.run(command(user, run_dir, args), cwd=user, env=env(user, notes), text=True, capture_output=True,
                       timeout=300)
    return r, run_dir, noted(notes), stopped


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)


def epochs_of(batches: dict[int, list[list[int]]], steps_per_epoch: int) -> list[list[int]]:
    """The ids every rank took in each epoch, together."""
    n = len(batches[0]) // steps_per_epoch
    return [sorted(i for rank in batches.values() for b in rank[e * steps_per_epoch:(e + 1) * steps_per_epoch]
                   for i in b) for e in range(n)]


@pytest.mark.e2e
def test_a_stream_that_does_not_share_itself_gives_every_sample_once_an_epoch_and_resumes_exactly(user):
    """A plain IterableDataset (every rank and worker reads it whole and keeps its own positions, pipeline's
    Strided), no epoch length given: the ranks find its end together; 2 epochs of 20 steps."""
    args = ["dataset=numbered", "trainer.epochs=2", "trainer.max_steps=1000"]
    r, straight, ids = train(user, "numbered", args)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = Result.read(straight)
    assert (rec.status, rec.steps, rec.steps_per_epoch, rec.loader.kind) == ("completed", 40, 20, "stream")
    assert epochs_of(ids, 20) == [list(range(200))] * 2  # 4 slots (2 ranks x 2 workers): each sample once
    assert ids[0][:2] == [[0, 4, 8, 12, 16], [1, 5, 9, 13, 17]]  # rank 0's workers, taken in turn
    # stopped mid-epoch: the stream has no state of its own, so the resumed loader reads its share up to where it was
    r, resumed, again, stopped = preempted_and_resumed(user, "numbered-stopped", [*args, "model.delay_s=0.05"], 10)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 10 <= stopped["step"] < 40 and Result.read(resumed).resumed_from_step == stopped["step"]
    assert again == ids
    assert all(torch.equal(a, b) for a, b in zip(weights(straight).values(), weights(resumed).values()))


@pytest.mark.e2e
def test_a_hugging_face_stream_resumes_mid_epoch_to_the_same_samples_and_weights(user):
    """load_dataset("json", streaming=True) on 4 local shards: a rank's 2 shards, one to each of its workers, each
    worker's position in Hugging Face's own state_dict. 2 epochs of 40 steps; the held-out split streamed too."""
    args = ["dataset=hf_stream", "trainer.epochs=2", "trainer.max_steps=1000"]
    r, straight, ids = train(user, "hf", args)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = Result.read(straight)
    assert (rec.status, rec.steps, rec.steps_per_epoch, rec.loader.kind) == ("completed", 80, 40, "stream")
    assert epochs_of(ids, 40) == [list(range(400))] * 2
    assert rec.evaluation.split == "the dataset built with split='test'" and rec.evaluation.samples == 60
    r, resumed, again, stopped = preempted_and_resumed(user, "hf-stopped", [*args, "model.delay_s=0.02"], 50)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 50 <= stopped["step"] < 80 and [s["epoch"] for s in stopped["streams"]] == [1, 1]
    assert again == ids
    assert all(torch.equal(a, b) for a, b in zip(weights(straight).values(), weights(resumed).values()))


@pytest.mark.e2e
def test_the_docs_stream_recipe_trains_as_written(user):
    """docs/your-model.md's Hugging Face stream: its config file and its command, run in the user's folder (its
    data/shards), shortened to 40 steps."""
    doc = (REPO / "docs" / "your-model.md").read_text()
    section = doc[doc.index("## Streams: data larger than memory"):doc.index("## How it is evaluated")]
    (path, yaml), = re.findall(r"```yaml\n# myconf/(\S+)\n(.*?)```", section, re.S)
    (line,) = re.findall(r"```bash\n(python -m pipeline.launch .*?)\n```", section, re.S)
    (user / "myconf" / path).parent.mkdir(parents=True, exist_ok=True)
    (user / "myconf" / path).write_text(yaml)
    run_dir = user / "runs" / "docs"
    r = subprocess.run([sys.executable, *line.split()[1:], "trainer.max_steps=40", "trainer.warmup_steps=2",
                        "trainer.tensorboard=false", f"hydra.searchpath=[file://{user / 'myconf'}]",
                        f"hydra.run.dir={run_dir}"], cwd=user, env=env(user, user / "notes" / "docs"), text=True,
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = Result.read(run_dir)
    assert (rec.status, rec.steps, rec.loader.kind, rec.loader.num_workers) == ("completed", 40, "stream", 2)
    assert rec.evaluation.split == "the dataset built with split='test'" and rec.evaluation.samples == 60


@pytest.mark.e2e
def test_webdataset_tar_shards_train_from_yaml_alone(user):
    """Tar shards in WebDataset's layout through Hugging Face's reader: the input and target are the samples'
    files by extension (io.*), the shard's name and the sample's key (`__url__`, `__key__`) stay out of the model."""
    r, run_dir, _ = train(user, "tar", ["dataset=tar_shards", "io.input_key=x.npy", "io.target_key=label.cls",
                                        "evaluate.enabled=false", "trainer.epochs=2", "trainer.max_steps=1000"])
    assert r.returncode == 0, r.stderr[-3000:]
    rec = Result.read(run_dir)
    assert (rec.status, rec.steps, rec.steps_per_epoch, rec.loader.kind) == ("completed", 80, 40, "stream")
    assert rec.io.batch == "mappings: x.npy the input, label.cls the targets"


@pytest.mark.e2e
def test_a_stream_larger_than_memory_trains_in_a_memory_cgroup_with_a_small_ones_peak(user, memory_cgroup):
    """2 GB of shards (a stream that shares itself out and keeps its position) through ranks that may use 1.5 GB
    between them (the launch in a real memory cgroup): it trains to its end, each rank's peak resident memory
    within 64 MiB of a run over 32 MB of the same shards."""
    peaks = {}
    for name, rows in (("small", 1_000), ("large", 64_000)):
        write_shards(user / "data" / "f32", shards=8, rows=rows, features=1024)
        steps = 4 * rows // 1024  # a rank's 4 shards in batches of 1024
        args = ["dataset=shards", "model.features=1024", "trainer.batch_size=1024", "loader.num_workers=0",
                f"loader.epoch_samples={steps * 2048}", "trainer.epochs=1", "evaluate.enabled=false",
                "trainer.log_every=100"]
        join = ["sh", "-c", f'echo $$ > {memory_cgroup / "cgroup.procs"} && exec "$@"', "sh"]
        r, run_dir, _ = train(user, f"shards-{name}", args, prefix=join, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        rec = Result.read(run_dir)
        assert rec.status == "completed" and rec.steps == steps
        peaks[name] = max(x.memory.peak_bytes for x in rec.ranks)
    assert sum(p.stat().st_size for p in (user / "data" / "f32").iterdir()) > 1.3 * 1500 * 2**20
    assert peaks["large"] - peaks["small"] < 64 * 2**20, peaks


@pytest.mark.e2e
def test_bad_streams_are_refused_at_launch_or_named_by_the_rank(user):
    empty = user / "data" / "empty.jsonl"
    empty.write_text("")
    os.mkfifo(user / "data" / "fifo.jsonl")  # reading it would wait for a writer forever
    refused = [
        (["dataset.data_files.train=data/nowhere/*.jsonl"],
         "dataset.data_files.train='data/nowhere/*.jsonl' matches no file"),
        ([f"dataset.data_files.train={empty}"], "could not be built at launch: StopIteration: the data holds no rows"),
        (["dataset.data_files.train=data/fifo.jsonl"], "dataset.data_files.train='data/fifo.jsonl': data/fifo.jsonl "
                                                        "is a FIFO, not a file"),
        (["evaluate.holdout=0.1"], "evaluate.holdout=0.1: dataset._target_=datasets.load_dataset is a stream, whose "
                                   "rows cannot be held out by index"),
        (["trainer.max_steps=0"], "is a stream, with no length to plan the run by: set trainer.max_steps, or "
                                  "loader.epoch_samples"),
    ]
    for args, said in refused:
        r, run_dir, _ = train(user, "bad", ["dataset=hf_stream", "trainer.max_steps=20", *args], timeout=120)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert {p.name for p in run_dir.iterdir()} <= {"launch.log"}  # Hydra's log of the launch, nothing else
    r, _, _ = train(user, "indexed", ["model=mlp", "loader.epoch_samples=64"])
    assert r.returncode == 2 and "loader.epoch_samples=64 is for a stream (an IterableDataset), and dataset." \
        "_target_=pipeline.workloads.datasets.Synthetic is indexed" in r.stderr, r.stderr
    # known only once the ranks read it: the stream is shorter than the epoch asked for
    r, run_dir, _ = train(user, "short", ["dataset=hf_stream", "loader.epoch_samples=100000"])
    assert r.returncode == 1 and "its share of the stream ended 40 steps into epoch 0, before loader.epoch_samples=" \
        "100000 (10000 steps)" in r.stderr, r.stderr
