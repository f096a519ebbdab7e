import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pipeline.config import register_configs
from pipeline.launcher.local import RANK_HEADER

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GOLDEN = REPO / "tests" / "golden"  # files written by real runs, which the current readers must keep reading


@pytest.fixture
def compose_cfg():
    """Compose the real config from conf/ with the given overrides (what `launch` gets from Hydra)."""
    register_configs()

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


def launch(*args: str, cwd: Path, timeout: float = 300, slurm_conf: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m pipeline.launch ARGS` as a user would, in `cwd` (with another cluster's SLURM_CONF if given)."""
    # as from a login shell: no job's variables (SLURM_CONF, which names the cluster, stays)
    env = {k: v for k, v in os.environ.items() if k == "SLURM_CONF" or not k.startswith(("SLURM", "MASTER_"))}
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    return subprocess.run([sys.executable, "-m", "pipeline.launch", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def rank_pid(point_dir: Path, rank: int) -> int | None:
    """The pid of a running local-mode rank of the point, as the launcher's header line of the rank's log names it;
    None until the log names one, or once that process has gone."""
    for log in Path(point_dir, "logs").glob(f"node*-rank{rank}.log"):
        with open(log) as f:
            header = f.readline()
        if header.startswith(f"{RANK_HEADER} {rank} ") and header.endswith("\n"):
            proc = Path("/proc") / header.split()[-1]
            try:
                if _is_worker(proc) and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    return int(proc.name)
            except OSError:
                pass
    return None


def _is_worker(proc: Path) -> bool:
    return b"pipeline.worker" in (proc / "cmdline").read_bytes()


def start_launch(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m pipeline.launch ARGS` as a process of its own, to signal it mid-run (output on its pipes)."""
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith(("SLURM", "MASTER_"))}
    return subprocess.Popen([sys.executable, "-m", "pipeline.launch", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_step(point_dir: Path, step: int, launcher: subprocess.Popen, ranks: int,
                  timeout: float = 120) -> list[int]:
    """Wait until rank 0 has reported `step` (progress.json) and every rank's pid is known; returns the pids."""
    import json
    import time

    deadline = time.monotonic() + timeout
    progress = Path(point_dir) / "progress.json"
    while True:
        pids = [rank_pid(point_dir, r) for r in range(ranks)]
        if all(pids) and progress.is_file():
            try:
                if json.loads(progress.read_text())["step"] >= step:
                    return pids
            except ValueError:  # rewritten as we read it
                pass
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)


def live_in_group(pgid: int) -> list[int]:
    """The processes of process group `pgid` that still run (zombies, which run nothing, left out), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(group) == pgid and state != "Z":
            found.append(int(stat.parent.name))
    return found
