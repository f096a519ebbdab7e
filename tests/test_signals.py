"""The launcher owns its ranks: real signals to a real launcher mid-training leave no process behind (checked by
pid: each rank and everything in its process group, DataLoader workers included, and the fork server the ranks
were forked from); a fork server killed mid-sweep leaves the sweep to ranks started on their own."""

import os
import signal
import time

import pytest

from pipeline.launcher.forkserver import ForkedRank
from pipeline.runlock import RunLock
from tests.conftest import fork_server_of, live_in_group, parent_of, start_launch, wait_for_step

pytestmark = pytest.mark.e2e

# (the nodes' health check, tests/test_health.py's subject, left out of these multi-node runs: 2 s each)
TRAIN = ["nodes=2", "trainer.epochs=500", "trainer.log_every=10", "dataset.train_size=2048", "dataset.test_size=256",
         "health.enabled=false"]


def assert_nothing_left(pids: list[int], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while any(live_in_group(pid) for pid in pids):
        assert time.monotonic() < deadline, {pid: live_in_group(pid) for pid in pids}
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_stops_every_rank_with_one_line_and_128_plus_signal(tmp_path, sig):
    run = tmp_path / "run"
    launcher = start_launch(*TRAIN, f"hydra.run.dir={run}", cwd=tmp_path)
    pids = wait_for_step(run, 10, launcher, ranks=2)
    server = fork_server_of(launcher.pid, pids)
    assert server and all(parent_of(pid) == launcher.pid for pid in pids)  # forked, and the launcher's children
    launcher.send_signal(sig)
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 128 + sig, err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("pipeline.launch:")]
    assert f"{sig.name} received: stopped the 2 rank process(es)" in line and all(str(p) in line for p in pids)
    assert_nothing_left([*pids, server], within_s=1)  # the launcher waited for them before it exited
    assert not (run / "result.json").exists()
    RunLock(run).release()  # and nothing holds the folder: no writer of it is left


def test_ranks_and_their_dataloader_workers_stop_when_the_launcher_is_killed(tmp_path):
    """SIGKILL cannot be caught: each rank and the fork server die by their parent-death signal, a rank's
    DataLoader worker by torch's watchdog. A sweep's ranks with a loader worker each."""
    sweep = tmp_path / "sweep"
    # persistent workers: a worker lives across epochs (others are made anew each epoch, and for an instant a rank
    # would have none)
    launcher = start_launch("-m", *TRAIN, "loader.kind=dataloader", "loader.num_workers=1",
                            "loader.persistent_workers=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    pids = wait_for_step(sweep / "0", 10, launcher, ranks=2)
    assert all(len(live_in_group(pid)) >= 2 for pid in pids)  # each rank and its loader worker
    server = fork_server_of(launcher.pid, pids)
    assert server
    launcher.kill()
    launcher.communicate(timeout=30)
    assert_nothing_left([*pids, server], within_s=15)  # torch's worker watchdog looks every 5 s
    RunLock(sweep / "0").release()


def test_a_sweep_whose_fork_server_is_killed_goes_on_with_ranks_started_alone(tmp_path):
    """SIGKILL to the fork server while the first point trains: that point is unharmed (its ranks are the
    launcher's children, not the server's), the next point's ranks start as processes of their own, with a
    warning that says so, and the sweep completes."""
    sweep = tmp_path / "sweep"
    launcher = start_launch("-m", "nodes=1,2", "trainer.epochs=50", "trainer.max_steps=200", "trainer.log_every=10",
                            "health.enabled=false", "probe.enabled=false", "dataset.train_size=2048",
                            "dataset.test_size=256", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    (first,) = wait_for_step(sweep / "0", 10, launcher, ranks=1)
    server = fork_server_of(launcher.pid, [first])
    assert server and parent_of(first) == launcher.pid
    os.kill(server, signal.SIGKILL)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err
    assert f"the fork server (pid {server}) stopped serving" in out and "each rank starts on its own" in out, out
    assert all((sweep / point / "result.json").is_file() for point in ("0", "1"))


def test_a_signal_to_a_forked_rank_that_another_thread_just_reaped_is_a_no_op():
    """The race behind a preempted run's "ProcessLookupError" (seen in CI): one thread waits on a rank in the kernel
    and reaps it; another, stopping the ranks, polls (None: the waiter holds the rank) and signals a pid that no
    longer exists. Popen ignores that (bpo-40550); a ForkedRank must too."""
    pid = os.posix_spawn("/bin/true", ["true"], os.environ)
    rank = ForkedRank(pid, stdout=None)
    with rank._waiting:  # the waiting thread, between its waitpid and setting returncode
        os.waitpid(pid, 0)
        rank.send_signal(signal.SIGTERM)
        assert rank.returncode is None
