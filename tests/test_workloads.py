"""Workloads as users bring them: their own model, dataset and optimizer through `_target_`, the DataLoader path
and its exact resume, the language model, torchrun with no launch, and every bad input named."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from pipeline.config import parse_run_config
from pipeline.launcher.local import run_local
from pipeline.result import Result
from pipeline.rundir import Point
from tests.conftest import launch, rank_pid

pytestmark = pytest.mark.e2e

FAST = ["trainer.log_every=1000", "dataset.train_size=1024", "dataset.test_size=256"]

USER_CODE = '''
import math

import torch
from torch.utils.data import Dataset


class Net(torch.nn.Module):
    """Asks the pipeline for the class count only; its width is its own argument."""

    def __init__(self, num_classes, width=32):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)


class Pairs(Dataset):
    """Map-style, no arrays(): it trains through the DataLoader. The label is the sign pattern of two features."""

    num_classes = 4

    def __init__(self, size, split="train"):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.x = torch.randn(size, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long() * 2 + (self.x[:, 1] > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Lars(torch.optim.SGD):
    """Layer-wise adaptive rate scaling (You et al. 2017): each tensor's step scaled by ||w|| / ||grad||."""

    def __init__(self, params, lr, trust=0.02, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.trust = trust

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.norm() > 0 and p.grad.norm() > 0:
                    p.grad.mul_(self.trust * p.norm() / p.grad.norm())
        return super().step(closure)
'''


@pytest.fixture
def user_package(tmp_path):
    """A package and a config folder of the user's own, outside the repository."""
    (tmp_path / "code/mypkg").mkdir(parents=True)
    (tmp_path / "code/mypkg/__init__.py").write_text("")
    (tmp_path / "code/mypkg/parts.py").write_text(USER_CODE)
    conf = tmp_path / "myconf"
    for group, text in {"model/mynet": "_target_: mypkg.parts.Net\nwidth: 64\n",
                        "dataset/pairs": "_target_: mypkg.parts.Pairs\nsize: 2048\n",
                        "optimizer/lars": "_target_: mypkg.parts.Lars\n_partial_: true\nlr: 0.5\nmomentum: 0.9\n",
                        "experiment/mine": textwrap.dedent("""\
                            # @package _global_
                            defaults:
                              - override /model: mynet
                              - override /dataset: pairs
                              - override /optimizer: lars
                            trainer:
                              epochs: 3
                              batch_size: 32
                            loader:
                              num_workers: 1
                            """)}.items():
        (conf / group).parent.mkdir(parents=True, exist_ok=True)
        (conf / f"{group}.yaml").write_text(text)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'code'}:{os.environ.get('PYTHONPATH', '')}"}
    return tmp_path, conf, env


def run_launch(args, cwd, env, timeout=180):
    return subprocess.run([sys.executable, "-m", "pipeline.launch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_your_model_dataset_and_optimizer_from_your_own_package(user_package):
    tmp_path, conf, env = user_package
    out = tmp_path / "run"
    r = run_launch([f"hydra.searchpath=[file://{conf}]", "+experiment=mine", "nodes=2", "trainer.log_every=1000",
                    f"hydra.run.dir={out}"], tmp_path, env)
    assert r.returncode == 0, r.stderr + r.stdout
    rec = Result.read(out)
    assert (rec.model, rec.dataset, rec.world_size) == ("net", "pairs", 2)
    assert rec.config["optimizer"]["_target_"] == "mypkg.parts.Lars" and rec.config["model"]["width"] == 64
    assert rec.loader.kind == "dataloader" and rec.loader.num_workers == 1
    assert rec.evaluation.metric == "accuracy" and rec.evaluation.samples == 2048
    assert rec.test_accuracy > 0.8, rec.test_accuracy  # 3 epochs of a 4-way sign pattern
    assert len({x.parameters_sha256 for x in rec.ranks}) == 1
    assert rec.model_parameters == 8 * 64 + 64 + 64 * 4 + 4  # 8 -> width 64 -> 4 classes, from the dataset


def test_dataloader_and_memory_take_the_same_batches_and_resume_exactly(tmp_path):
    """The same run three times: from memory, uninterrupted; through the DataLoader (2 workers), preempted by
    USR2 on every rank mid-run and resumed from its checkpoint; all end with identical weights."""
    common = ["nodes=2", "trainer.epochs=40", "trainer.max_steps=600", "trainer.log_every=20", "model.dropout=0.1",
              "dataset.train_size=2048", "dataset.test_size=256", "scheduler=cosine",
              "health.enabled=false"]  # the nodes' health check is tests/test_health.py's
    memory = tmp_path / "memory"
    r = launch(*common, "loader.kind=memory", f"hydra.run.dir={memory}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    loader = tmp_path / "loader"
    args = [*common, "loader.kind=dataloader", "loader.num_workers=2", "loader.persistent_workers=true",
            f"hydra.run.dir={loader}"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.launch", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    progress = loader / "progress.json"
    while not (progress.is_file() and json.loads(progress.read_text())["step"] >= 100):
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not get going"
        time.sleep(0.05)
    for rank in (0, 1):  # as Slurm signals every task before preemption
        os.kill(rank_pid(loader, rank), signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "rank 0 (simulated node 0) failed first: exit code 75" in out, out
    checkpoint = torch.load(loader / "checkpoint.pt", weights_only=True)
    assert 100 <= checkpoint["step"] < 600 and not (loader / "result.json").exists()
    # the same point folder started again, as a requeued job is
    run_local(loader, parse_run_config(Point.read(loader).config), job_id="local-resumed", position="resumed")
    rec = Result.read(loader)
    assert rec.resumed_from_step == checkpoint["step"] and rec.loader.kind == "dataloader"
    weights = [torch.load(d / "model.pt", weights_only=True) for d in (memory, loader)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_the_tiny_gpt_learns_a_synthetic_language(tmp_path):
    """ln(256) = 5.5 nats before training; the language's floor is ln(4) = 1.4. One epoch, a few seconds."""
    out = tmp_path / "run"
    r = launch("model=gpt_tiny", "dataset=synthetic_tokens", "optimizer=adamw", "optimizer.lr=0.003",
               "trainer.log_every=1000", f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = Result.read(out)
    assert rec.evaluation.metric == "perplexity" and rec.evaluation.loss < 2.0, rec.evaluation
    assert rec.evaluation.value == pytest.approx(np.exp(rec.evaluation.loss))
    assert (rec.test_accuracy, rec.tokens_per_sample, rec.model) == (None, 64, "gpt")
    assert rec.utilisation.flops_per_sample > 6 * 64 * (2 * 4 * 128 * 128 * 3)  # at least 6 x tokens x block weights


def test_torchrun_trains_from_overrides_with_no_launch(tmp_path):
    """torchrun --nproc-per-node=2 -m pipeline.worker OVERRIDES: one composition (rank 0's), one folder,
    torchrun's own store; the user's OMP_NUM_THREADS is each rank's thread count."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")} | {"OMP_NUM_THREADS": "2"}
    t = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "pipeline.worker",
                        "trainer.max_steps=6", *FAST, f"hydra.run.dir={out}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert t.returncode == 0, t.stderr[-3000:]
    rec = Result.read(out)
    assert (rec.world_size, rec.steps, rec.launch_mode, rec.provenance.slurm) == (2, 6, "torchrun", None)
    assert [x.host.threads for x in rec.ranks] == [2, 2] and len({x.parameters_sha256 for x in rec.ranks}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # one folder, no Hydra folders of the ranks'
    assert Point.read(out).overrides[:2] == ["nodes=1", "cluster.tasks_per_node=2"]
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "pipeline.worker",
                          "trainer.epochs=0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert bad.returncode != 0 and "configuration error: trainer.epochs=0 is not allowed" in bad.stderr


BAD_CODE = '''
import numpy as np
import torch


class Singles(torch.utils.data.Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, i):
        return torch.zeros(8)
'''


@pytest.mark.parametrize("overrides, said", [
    # a group's own config replaced on the command line: ~group, then +group._target_ and its arguments
    (["~dataset", "+dataset._target_=badpkg.Singles"],
     ["rank 0: dataset._target_=badpkg.Singles (train split): item 0 is a Tensor, not an (input, target) pair"]),
    (["~loss", "+loss._target_=torch.nn.MSELoss"],
     ["rank 0: model._target_=pipeline.workloads.models.MLP and loss._target_=torch.nn.MSELoss could not train",
      "targets (2,) torch.int64"]),
    (["model=gpt_tiny", "dataset=token_file", "dataset.root=tokens", "dataset.vocab_size=256"],
     ["rank 0: dataset._target_=pipeline.workloads.datasets.TokenFile (train split)", "holds token 299",
      "outside dataset.vocab_size=256"]),
    (["~model", "+model._target_=torch.nn.Linear"],
     ["model._target_=torch.nn.Linear needs in_features, out_features", "set model.in_features"]),
])
def test_bad_input_stops_the_job_naming_the_key_and_the_rank(tmp_path, overrides, said):
    (tmp_path / "badpkg").mkdir()
    (tmp_path / "badpkg/__init__.py").write_text(BAD_CODE)
    (tmp_path / "tokens").mkdir()
    (np.arange(2000) % 300).astype(np.uint16).tofile(tmp_path / "tokens/train.bin")
    (np.arange(200) % 300).astype(np.uint16).tofile(tmp_path / "tokens/val.bin")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    r = run_launch([*overrides, "trainer.max_steps=3", "trainer.warmup_steps=1", f"hydra.run.dir={tmp_path / 'run'}"],
                   tmp_path, env)
    assert r.returncode != 0
    for text in said:
        assert text in r.stderr, r.stderr[-3000:]


def test_more_loader_workers_than_cpus_is_warned(tmp_path):
    r = launch("loader.kind=dataloader", f"loader.num_workers={(os.cpu_count() or 1) + 1}", "trainer.max_steps=3",
               "trainer.warmup_steps=1", *FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "is more than the" in (tmp_path / "run/logs/node0-rank0.log").read_text()
