"""The local launcher's waiting, on real processes (no torch): a run ends when its ranks end, never hangs."""

import logging
import subprocess
import sys
import time

from pipeline.launcher import local
from pipeline.launcher.local import Rank, _stop, _wait_all


def _rank(rank: int, code: str, tmp_path) -> Rank:
    return Rank(rank, rank, tmp_path / f"rank{rank}.log", subprocess.Popen([sys.executable, "-c", code]))


def test_a_rank_stuck_after_rank_0_finished_is_stopped_not_waited_for(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(local, "LEAVE_S", 0.5)
    ranks = [_rank(0, "pass", tmp_path), _rank(1, "import time; time.sleep(120)", tmp_path)]
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert _wait_all(ranks) is None
    _stop(ranks)
    assert time.monotonic() - t0 < 30 and ranks[1].proc.returncode is not None
    assert "rank(s) [1] still running" in caplog.text


def test_the_first_rank_to_fail_is_returned_and_a_slow_clean_one_waited_for(tmp_path):
    ranks = [_rank(0, "import time; time.sleep(1)", tmp_path), _rank(1, "raise SystemExit(3)", tmp_path)]
    assert _wait_all(ranks) is ranks[1]
    _stop(ranks)
    ranks = [_rank(0, "pass", tmp_path), _rank(1, "import time; time.sleep(1)", tmp_path)]
    assert _wait_all(ranks) is None and ranks[1].proc.returncode == 0  # within LEAVE_S: waited for


def test_the_fork_server_starts_early_only_for_a_command_line_that_means_local_runs(monkeypatch):
    """A login node's launch to Slurm must not import torch: the server starts before the composition only where
    nothing on the command line can make a point run elsewhere (or not run: a dry run)."""
    started = []
    monkeypatch.setattr(local.forkserver, "start_early", lambda: started.append(True))
    for argv in (["nodes=2"], ["-m", "nodes=1,2,4"], ["cluster=local", "trainer.max_steps=5"]):
        local.prestart(argv)
        assert started.pop(), argv
    for argv in (["cluster=slurm"], ["-m", "cluster=local,slurm"], ["dry_run=true"], ["+experiment=scaling"],
                 ["--config-name", "mine"], ["hydra.searchpath=[file:///x]"], ["-cd", "elsewhere"]):
        local.prestart(argv)
        assert not started, argv
