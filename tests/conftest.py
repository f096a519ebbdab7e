"""What every test file shares: the tiers the suite runs in, the one local Slurm cluster a test run brings up, the
composed config, and the helpers that launch the pipeline as a user would and watch its processes."""

import collections
import contextlib
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pipeline.config import register_configs
from pipeline.launcher.local import RANK_HEADER

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GOLDEN = REPO / "tests" / "golden"  # files written by real runs, which the current readers must keep reading

# ----------------------------------------------------------------------------------------------------- tiers
# `make test-fast` runs the tests of none of these tiers (pyproject.toml names them): no process of the pipeline, no
# cluster, no GPU. A test is marked where it says so (a module's pytestmark, a decorator) and where it can be told:
# one that uses the Slurm cluster needs Slurm, and Slurm, a benchmark, the wheel's install or a shared run start
# processes too (e2e). Run on its own (no xdist worker beside it), a test of the fast tier slower than FAST_LIMIT_S
# fails, saying so: it is to be made faster, or marked.
SLOW_TIERS = ("e2e", "slurm", "gpu", "bench", "install")
FAST_LIMIT_S = 5.0
SETUP_S = pytest.StashKey[float]()  # a test's fixtures' set-up time, which counts with its own
RUN_FIXTURES = {"profiled_run"}  # runs of the pipeline that several tests read
# the groups that took longest under `make test` (2026-12-06: 260 s down to 40 s), longest first: the Slurm tests,
# which also wait on Slurm while the other workers run; an out-of-date list costs balance, never a test
LONGEST = ("slurm", "test_ecosystem.py", "test_benchmarks.py", "test_tracking.py", "test_streams.py",
           "test_local_runs.py", "test_sharding.py", "test_workloads.py", "test_launch_errors.py",
           "test_speed_paths.py", "test_install.py")
# Three workers' ranks share the two cores: an OpenMP thread that spins while waiting for work (libgomp's default)
# takes the core from a rank of another worker that has some. Passive waiting changes no result, only who waits.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group marks given here
def pytest_collection_modifyitems(config, items):
    groups = {}
    for item in items:
        if "slurm_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.slurm)
        shared = RUN_FIXTURES & set(item.fixturenames)
        if shared or any(item.get_closest_marker(tier) for tier in ("slurm", "bench", "install")):
            item.add_marker(pytest.mark.e2e)
        # `make test` runs the suite on three xdist workers (--dist loadgroup): a file's tests on one worker, so that
        # its module's fixtures are made once; the Slurm tests on one (they share the cluster); the readers of a
        # shared run on one
        groups[item] = "slurm" if item.get_closest_marker("slurm") else min(shared) if shared else item.path.name
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    if getattr(config.option, "loadgroup", False):
        # xdist hands the groups out in this order (--no-loadscope-reorder), each to the worker free first: the
        # longest first, so that the short ones even out the end. LONGEST, then by how many tests start processes
        e2e = collections.Counter(groups[i] for i in items if i.get_closest_marker("e2e"))
        rank = {g: n for n, g in enumerate(LONGEST)}
        items.sort(key=lambda i: (rank.get(groups[i], len(LONGEST)), -e2e[groups[i]], groups[i]))


def pytest_xdist_node_collection_finished(node, ids):
    """On the controller: the ids a worker collected carry their group (xdist's loadgroup puts it there), or the
    groups above are lost without a word, and each file's fixtures made on every worker."""
    if node.config.getoption("dist") == "loadgroup" and ids and "@" not in ids[0]:
        pytest.exit("--dist loadgroup did not group the tests (no @group in their ids): this pytest and pytest-xdist "
                    "do not work together (pytest-dev/pytest-xdist#1386); install the versions pyproject.toml's dev "
                    "extra names", returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "setup":
        item.stash[SETUP_S] = report.duration
    elif report.when == "call" and report.passed and not os.environ.get("PYTEST_XDIST_WORKER") and \
            not any(item.get_closest_marker(t) for t in SLOW_TIERS):
        took = item.stash.get(SETUP_S, 0.0) + report.duration
        if took > FAST_LIMIT_S:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} took {took:.1f} s, and a test of the fast tier (none of the markers "
                               f"{', '.join(SLOW_TIERS)}) takes at most {FAST_LIMIT_S:.0f} s: make it faster, or mark "
                               "it (e2e when it starts processes of the pipeline)")


# ------------------------------------------------------------------------------------------- shared runs
PROFILED = ["nodes=2", "trainer.epochs=2", "trainer.max_steps=20", "trainer.log_every=5", "trainer.warmup_steps=3",
            "profiler.enabled=true", "profiler.steps=4", "dataset.train_size=2048", "dataset.test_size=512"]


@pytest.fixture(scope="session")
def profiled_run(tmp_path_factory) -> Path:
    """One real 2-node local run (a rank each), profiled over 4 steps after a warm-up of 3, TensorBoard on, that the
    tests of its TensorBoard scalars, its traces (ours and Holistic Trace Analysis's reading), its fabric probe and
    a worker started with the wrong world all read: its folder, which they must not change."""
    out = tmp_path_factory.mktemp("profiled") / "run"
    r = launch(*PROFILED, f"hydra.run.dir={out}", cwd=out.parent)
    assert r.returncode == 0, r.stderr
    return out


# --------------------------------------------------------------------------------------------- the cluster
@dataclass(frozen=True)
class LocalCluster:
    """The test run's Slurm: slurm/local-cluster.sh's 4 nodes, each in a network namespace of its own (its own
    address in 10.232.0.0/24 and its own hostname, NODE1..4), on this one machine."""

    folder: Path
    bridge: str
    prefix: str

    @property
    def conf(self) -> str:
        return str(self.folder / "etc/slurm.conf")

    def node(self, i: int) -> str:
        return f"{self.prefix}{i}"


CLUSTER = LocalCluster(Path("/tmp/pipeline-slurm-tests"), bridge="plslurmt0", prefix="nsnode")
CLUSTER_PORTS = 6947  # its own ports (and folder), so that it can run beside a cluster started by hand
CLUSTER_SUBNET = "10.232.0"  # its nodes' addresses; the host is .1 on its bridge


@pytest.fixture(scope="session")
def slurm_cluster():
    """Brought up once per test run (root needed: it starts munged, MariaDB, slurmctld and slurmd; skipped, saying
    why, otherwise), SLURM_CONF set for the test process and what it starts; taken down at the end."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (it starts munged, slurmctld and slurmd)")
    ports = CLUSTER_PORTS
    env = {**os.environ, "PIPELINE_SLURM_DIR": str(CLUSTER.folder), "PIPELINE_SLURM_CTLD_PORT": str(ports),
           "PIPELINE_SLURM_DBD_PORT": str(ports + 2), "PIPELINE_SLURM_DB_PORT": str(ports + 26000),
           "PIPELINE_SLURM_BASE_PORT": str(ports + 10000), "PIPELINE_SLURM_SUBNET": CLUSTER_SUBNET,
           "PIPELINE_SLURM_BRIDGE": CLUSTER.bridge, "PIPELINE_SLURM_NODE_PREFIX": CLUSTER.prefix}
    script = str(REPO / "slurm/local-cluster.sh")
    subprocess.run(["bash", script, "up", "--nodes", "4", "--netns"], env=env, check=True, timeout=600)
    # safe as root: secrets readable by root alone, a password of its own, no world-writable folder
    dbd = CLUSTER.folder / "etc/slurmdbd.conf"
    assert dbd.stat().st_mode & 0o777 == 0o600 and "StoragePass=slurmpw" not in dbd.read_text()
    assert not any(p.stat().st_mode & 0o002 for p in CLUSTER.folder.rglob("*") if p.is_dir() and not p.is_symlink())
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = CLUSTER.conf
    yield CLUSTER
    subprocess.run(["bash", script, "down"], env=env, timeout=120)
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


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


def launch(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m pipeline.launch ARGS` as a user would, in `cwd`."""
    # as from a login shell: no job's variables (SLURM_CONF, which names the cluster, stays)
    env = {k: v for k, v in os.environ.items() if k == "SLURM_CONF" or not k.startswith(("SLURM", "MASTER_"))}
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


def fork_server_of(launcher_pid: int, ranks: list[int]) -> int | None:
    """The pid of a local launcher's fork server (pipeline/launcher/forkserver.py), from /proc; None if none runs.
    The ranks it forked (their pids given) are the launcher's children too, with the server's command line."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            args = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == launcher_pid and b"--fork-server" in args and int(stat.parent.name) not in ranks:
            return int(stat.parent.name)
    return None


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


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


# ---------------------------------------------------------------------------------------- a real MLflow server
@dataclass
class MlflowServer:
    """`mlflow server` with a SQLite backend store and a local artifact root, in a process group of its own, on a
    port of `host` (an address of this machine's: loopback, or the test cluster's bridge)."""

    folder: Path
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 90) -> "MlflowServer":
        import socket
        import time
        import urllib.request

        if not self.port:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.folder / 'mlflow.db'}", "--default-artifact-root", str(self.folder / "artifacts"),
             "--host", self.host, "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"mlflow server not up in {timeout} s"
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM to its process group (the server and its workers), then a check by pid that none is left."""
        import signal
        import time

        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while live_in_group(pgid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.1)
        assert not live_in_group(pgid)
        self.proc = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture
def memory_cgroup():
    """A memory cgroup of 1.5 GB (v1 or v2) under this process's own, to run a launch in; skipped where none can
    be made."""
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup needs root")
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [x.split(":", 2)[2] for x in lines if ":memory:" in x]
    base = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/") if v1 else \
        Path("/sys/fs/cgroup") / [x.split(":", 2)[2] for x in lines if x.startswith("0::")][0].lstrip("/")
    group = base / f"pipeline-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(1500 * 2**20))
        if not v1:
            (group / "memory.swap.max").write_text("0")
    except OSError as e:
        if group.exists():
            group.rmdir()
        pytest.skip(f"cannot make a memory cgroup here: {e}")
    yield group
    group.rmdir()
