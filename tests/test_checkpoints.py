"""Checkpoints that survive faults: whole before they are renamed in, the one before kept, a truncated or corrupt
one (bytes overwritten inside a tensor, which torch.load would take) reported and passed over (never a loop),
another run's refused, the file loaded named; and a run resumed from the one before its truncated last
checkpoint still ends with the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.config import parse_run_config
from pipeline.job.checkpoint import Checkpoints
from pipeline.launcher.local import run_local
from pipeline.result import Result
from pipeline.rundir import Point, read_metrics
from tests.conftest import launch, rank_pid


def saved(folder, step, run_id="run-a", config=None, width=2):
    model = torch.nn.Linear(width, width)
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    Checkpoints(folder, run_id, config or {"x": 1}).save(model=model, optimizer=optimizer, scheduler=None, step=step,
                                                         segments=[])


def test_a_broken_checkpoint_falls_back_to_the_one_before_then_to_none(tmp_path, caplog):
    saved(tmp_path, 10)
    saved(tmp_path, 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    mine = Checkpoints(tmp_path, "run-a", {"x": 1})
    assert mine.load()["step"] == 20
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[:len(data) // 2])  # truncated, as by a full disk
    assert mine.load()["step"] == 10 and "cannot be read" in caplog.text
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"\x00" * 100)  # corrupt
    caplog.clear()
    assert mine.load() is None and "starts over from step 0" in caplog.text
    for _ in range(3):  # asked again (a requeue after a requeue): the same answer, no loop
        assert mine.load() is None


@pytest.mark.parametrize("damage", ["random 4 KiB in the middle", "one bit flipped"])
def test_a_corrupt_checkpoint_that_torch_would_load_is_refused_and_the_one_before_used(tmp_path, caplog, damage):
    saved(tmp_path, 10, width=64)
    saved(tmp_path, 20, width=64)
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())  # 33 KB, most of it the weight and its momentum
    assert torch.load(path, weights_only=True)["step"] == 20  # as written, torch reads it past its checksum
    middle = len(data) // 2
    if damage.startswith("random"):
        data[middle:middle + 4096] = os.urandom(4096)
    else:
        data[middle] ^= 0x10
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["step"] == 20  # torch alone would resume from it, on garbage
    mine = Checkpoints(tmp_path, "run-a", {"x": 1})
    assert mine.load()["step"] == 10 and mine.loaded == tmp_path / "checkpoint.prev.pt"
    assert f"checkpoint {path} cannot be read" in caplog.text and "does not match the SHA-256" in caplog.text


def test_another_runs_checkpoint_is_refused(tmp_path, caplog):
    saved(tmp_path, 30, run_id="run-b")
    assert Checkpoints(tmp_path, "run-a", {"x": 1}).load() is None and "belongs to another run" in caplog.text
    saved(tmp_path, 40, run_id="run-a", config={"x": 2})
    assert Checkpoints(tmp_path, "run-a", {"x": 1}).load() is None  # same run id, other config
    assert Checkpoints(tmp_path, "run-a", {"x": 2}).load()["step"] == 40


@pytest.mark.e2e
def test_a_truncated_last_checkpoint_resumes_from_the_one_before_to_the_same_weights(tmp_path):
    common = ["nodes=2", "trainer.epochs=40", "trainer.max_steps=500", "trainer.log_every=20", "model.dropout=0.1",
              "dataset.train_size=2048", "dataset.test_size=256", "health.enabled=false",  # the check is not this
              "trainer.eval_every=100"]
    r = launch(*common, f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "broken"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.launch", *common, "trainer.checkpoint_every=40",
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    progress = run_dir / "progress.json"
    while not (progress.is_file() and json.loads(progress.read_text())["step"] >= 200):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    for rank in (0, 1):
        os.kill(rank_pid(run_dir, rank), signal.SIGUSR2)
    proc.communicate(timeout=120)
    last = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    before = torch.load(run_dir / "checkpoint.prev.pt", weights_only=True)["step"]
    assert before < last
    data = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[:1000])
    run_local(run_dir, parse_run_config(Point.read(run_dir).config), job_id="local-again", position="again")
    rec = Result.read(run_dir)
    rank0 = (run_dir / "logs/node0-rank0.log").read_text()
    assert rec.resumed_from_step == before and "cannot be read" in rank0
    assert f"resumed from {run_dir / 'checkpoint.prev.pt'} at step {before}" in rank0
    straight, resumed = (torch.load(d / "model.pt", weights_only=True) for d in (tmp_path / "straight", run_dir))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # the evaluations during training, across the restart: each step's once, as the uninterrupted run's
    assert [e.step for e in rec.evaluations] == [100, 200, 300, 400, 500]
    assert rec.evaluations == Result.read(tmp_path / "straight").evaluations
    # metrics.jsonl: the first run's lines of the steps trained again are superseded; every step once, its loss
    # and evaluation those of the uninterrupted run
    figures = {"train/loss", "test/accuracy", "test/loss"}
    resumed_lines, straight_lines = (
        {step: {k: v for k, v in values.items() if k in figures} for step, values in read_metrics(d).items()}
        for d in (run_dir, tmp_path / "straight"))
    assert list(resumed_lines) == list(range(20, 501, 20)) and resumed_lines == straight_lines
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) > len(resumed_lines)  # lines superseded
