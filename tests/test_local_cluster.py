"""slurm/local-cluster.sh is safe as root: it refuses a folder that is not its own, and stops only the daemons it
started. (Bringing a cluster up, which needs root, is exercised by every test in test_slurm.py.)"""

import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "slurm/local-cluster.sh"


def cluster(command: str, folder, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIPELINE_SLURM_DIR": str(folder)}
    return subprocess.run(["bash", str(SCRIPT), command, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("folder", ["/", "/tmp", "/usr/local", os.path.expanduser("~"), "/etc/slurm"])
def test_up_refuses_a_system_or_home_folder(folder):
    r = cluster("up", folder)
    assert r.returncode == 2 and "refusing PIPELINE_SLURM_DIR" in r.stderr, r.stderr


def test_up_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    r = cluster("up", tmp_path)
    assert r.returncode == 2 and "did not make" in r.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_down_stops_only_its_own_daemons(tmp_path):
    """A pid file naming a process called munged that this cluster did not start (a forged or stale file):
    left running."""
    impostor = tmp_path / "munged"
    shutil.copy("/bin/sleep", impostor)
    proc = subprocess.Popen([str(impostor), "60"])
    try:
        lab = tmp_path / "lab"
        (lab / "run").mkdir(parents=True)
        (lab / ".pipeline-local-cluster").touch()
        (lab / "run/munged.pid").write_text(str(proc.pid))
        r = cluster("down", lab)
        assert r.returncode == 0, r.stderr
        time.sleep(0.2)
        assert proc.poll() is None and f"not stopping pid {proc.pid}" in r.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
