"""The Trainer built and stepped directly, in this process, without the CLI: a job of one rank (gloo, world size 1)
made from a composed config, its workload built by the job's own build step."""

import math

import pytest
import torch
import torch.distributed as dist

from pipeline.config import parse_run_config, to_plain
from pipeline.job.build import build_workload
from pipeline.job.checkpoint import Checkpoints
from pipeline.job.context import Job
from pipeline.job.env import DistEnv
from pipeline.job.observe import Reporter
from pipeline.job.trainer import Trainer
from pipeline.rundir import GitInfo, Point, utc_now

SMALL = ["dataset.train_size=1024", "dataset.test_size=256", "trainer.warmup_steps=2", "trainer.tensorboard=false",
         "trainer.log_every=1000"]


@pytest.fixture
def make_trainer(compose_cfg, tmp_path):
    """A Trainer of one rank for the given overrides, in a process group of its own."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def make(*overrides: str) -> Trainer:
        run = parse_run_config(compose_cfg(*SMALL, *overrides))
        point = Point(run_id="run", sweep_id="sweep", point=0, overrides=list(overrides), launch_mode="torchrun",
                      launched_at=utc_now(), launch_host="here", launch_argv=[], git=GitInfo(sha=None, dirty=None),
                      config=to_plain(run), sweep_dir=str(tmp_path))
        env = DistEnv(source="single", rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                      num_nodes=1, master_addr="127.0.0.1", master_port=0, node_name="here")
        job = Job(point=point, run=run, env=env, device=torch.device("cpu"), point_dir=tmp_path)
        work = build_workload(run, rank=0, mark=lambda name: None)
        return Trainer(job, work, Checkpoints(tmp_path, point.run_id, point.config), Reporter(job, tmp_path / "tb"))

    yield make
    dist.destroy_process_group()


def test_train_step_lowers_the_loss_of_the_seed_mlp(make_trainer):
    trainer = make_trainer()
    trainer.timer.start()
    steps = trainer.order.steps(0, trainer.batches)
    losses = [trainer.train_step(step, batch).item() for step, _, batch in (next(steps) for _ in range(12))]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # 12 steps: past one finite-check window
    assert trainer.timer.phases().shape == (12, 4)


def test_fit_returns_the_outcome_of_every_step_and_the_evaluation(make_trainer):
    trainer = make_trainer("trainer.max_steps=10")
    outcome = trainer.fit()
    assert (outcome.steps, outcome.start_step, outcome.diverged_at_step) == (10, 0, None)
    assert outcome.phases.shape == (10, 4) and (outcome.phases >= 0).all()
    assert outcome.evaluation.metric == "accuracy" and outcome.evaluation.samples == 256
    assert outcome.final_train_loss is not None and not outcome.missing
    setup = trainer.setup()
    assert (setup.precision, setup.loader.kind, setup.steps_per_epoch) == ("fp32", "memory", 16)


def test_a_loss_that_is_not_finite_ends_fit_as_diverged(make_trainer):
    trainer = make_trainer("optimizer.lr=1e30", "trainer.finite_check_every=2", "trainer.max_steps=12")
    outcome = trainer.fit()
    assert outcome.diverged_at_step is not None and outcome.steps <= 12 and outcome.evaluation is None
    assert "diverged" in outcome.missing["evaluation"] and outcome.final_train_loss is None
