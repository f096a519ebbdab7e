"""One run per folder: a folder in use is refused at once, a finished run is not replaced unless asked, and a
relaunch of the same command after a kill continues the run from its checkpoint to the weights of a run that was
never interrupted. Real launches, real signals."""

import json
import os
import signal

import pytest
import torch

from pipeline.runlock import RunLock
from tests.conftest import launch, start_launch, wait_for_step

pytestmark = pytest.mark.e2e

# (the nodes' health check, tests/test_health.py's subject, left out of these multi-node runs: 2 s each)
SMALL = ["trainer.log_every=10", "dataset.train_size=2048", "dataset.test_size=256", "health.enabled=false"]


def test_a_second_launch_into_a_folder_in_use_is_refused_and_the_first_keeps_its_run(tmp_path):
    run = tmp_path / "run"
    first = start_launch("nodes=2", "trainer.epochs=20", "trainer.max_steps=200", *SMALL, f"hydra.run.dir={run}",
                         cwd=tmp_path)
    pids = wait_for_step(run, 10, first, ranks=2)
    for pid in pids:  # held mid-run, however fast this machine trains, while the second launch tries
        os.kill(pid, signal.SIGSTOP)
    mine = json.loads((run / "point.json").read_text())
    second = launch("trainer.seed=1", "trainer.max_steps=20", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert f"hydra.run.dir={run} is in use by pid {first.pid} on " in second.stderr
    assert "Traceback" not in second.stderr and json.loads((run / "point.json").read_text()) == mine
    first.communicate(timeout=120)
    assert first.returncode == 0
    record = json.loads((run / "result.json").read_text())
    assert record["run_id"] == mine["run_id"] and "trainer.seed=1" not in record["overrides"]


def test_a_relaunch_after_a_kill_continues_to_the_same_weights_and_a_finished_run_is_kept(tmp_path):
    """Killed mid-run, the same command again continues the run from its checkpoint to the weights of a run never
    interrupted; then the folder holds a finished run, which a launch replaces only with overwrite=true (a dry
    run here: replacing is the launch's part, training nothing)."""
    common = ["nodes=2", "trainer.epochs=40", "trainer.max_steps=300", "trainer.checkpoint_every=40",
              "model.dropout=0.1", *SMALL]
    assert launch(*common, f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path).returncode == 0
    run = tmp_path / "run"
    killed = start_launch(*common, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for_step(run, 130, killed, ranks=2)
    killed.send_signal(signal.SIGTERM)
    killed.communicate(timeout=30)
    assert killed.returncode == 128 + signal.SIGTERM and not (run / "result.json").exists()
    RunLock(run).release()  # nothing holds the folder any more
    stray = run / ".checkpoint.pt.interrupted.tmp"  # what a kill in the middle of a checkpoint's write leaves
    stray.write_bytes(b"\0" * 4096)
    again = launch(*common, f"hydra.run.dir={run}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "continues its run" in again.stdout + again.stderr and not stray.exists()
    record = json.loads((run / "result.json").read_text())
    assert record["resumed_from_step"] >= 120 and record["steps"] == 300
    straight, resumed = (torch.load(d / "model.pt", weights_only=True) for d in (tmp_path / "straight", run))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    finished = (run / "result.json").read_bytes()
    refused = launch(*common, f"hydra.run.dir={run}", cwd=tmp_path)
    assert refused.returncode == 2 and f"hydra.run.dir={run} holds a finished run's record" in refused.stderr
    assert "overwrite=true" in refused.stderr and (run / "result.json").read_bytes() == finished
    replaced = launch(*common, "overwrite=true", "dry_run=true", f"hydra.run.dir={run}", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert not any((run / name).exists() for name in ("result.json", "model.pt", "checkpoint.pt", "checkpoint.prev.pt"))
    assert json.loads((run / "point.json").read_text())["run_id"] != json.loads(finished)["run_id"]
