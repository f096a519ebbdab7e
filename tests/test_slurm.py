"""The Slurm path through a real Slurm: slurm/local-cluster.sh brings up 4 nodes once per test run."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, parse_run_config
from pipeline.launcher.slurm import sbatch_parameters
from tests.conftest import REPO, launch

SLURM_DIR = "/tmp/pipeline-slurm-tests"
FAST = ["trainer.log_every=1000", "dataset.train_size=2048", "dataset.test_size=512"]


def local_cluster(folder: str, ports: int, *flags: str, **env_extra: str):
    """slurm/local-cluster.sh up with its own folder and ports (so it can run beside one started by hand);
    yields its SLURM_CONF, then takes it down."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (it starts munged, slurmctld and slurmd)")
    env = {**os.environ, "PIPELINE_SLURM_DIR": folder, "PIPELINE_SLURM_CTLD_PORT": str(ports),
           "PIPELINE_SLURM_DBD_PORT": str(ports + 2), "PIPELINE_SLURM_DB_PORT": str(ports + 26000),
           "PIPELINE_SLURM_BASE_PORT": str(ports + 10000), **env_extra}
    subprocess.run(["bash", str(REPO / "slurm/local-cluster.sh"), "up", *flags], env=env, check=True, timeout=600)
    # safe as root: secrets readable by root alone, a password of its own, no world-writable folder
    dbd = Path(folder) / "etc/slurmdbd.conf"
    assert dbd.stat().st_mode & 0o777 == 0o600 and "StoragePass=slurmpw" not in dbd.read_text()
    assert not any(p.stat().st_mode & 0o002 for p in Path(folder).rglob("*") if p.is_dir() and not p.is_symlink())
    yield f"{folder}/etc/slurm.conf"
    subprocess.run(["bash", str(REPO / "slurm/local-cluster.sh"), "down"], env=env, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster():
    for conf in local_cluster(SLURM_DIR, 6927, "--nodes", "4"):
        os.environ["SLURM_CONF"] = conf
        yield


@pytest.fixture(scope="session")
def netns_cluster():
    """2 nodes, each in a network namespace with its own address (in 10.232.0.0/24) and hostname."""
    yield from local_cluster("/tmp/pipeline-slurm-netns-tests", 6947, "--nodes", "2", "--netns",
                             PIPELINE_SLURM_SUBNET="10.232.0", PIPELINE_SLURM_BRIDGE="plslurmt0",
                             PIPELINE_SLURM_NODE_PREFIX="nsnode")


def status(sweep, *args, slurm_conf=None):
    env = {**os.environ, **({"SLURM_CONF": slurm_conf} if slurm_conf else {})}
    return subprocess.run([sys.executable, "-m", "pipeline.status", str(sweep), *args], capture_output=True,
                          text=True, timeout=600, env=env)


def wait(sweep, with_progress=False):
    r = status(sweep, "--wait")
    assert r.returncode == 0, r.stderr
    return (r.stdout, r.stderr) if with_progress else r.stdout


def record(point_dir):
    return json.loads((point_dir / "result.json").read_text())


def jobs_in_queue():
    return subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout.split()


# ------------------------------------------------------------------------------------------- pure pieces
def test_sbatch_parameters_come_from_the_config(compose_cfg):
    run = parse_run_config(compose_cfg(
        "cluster=slurm", "nodes=4", "cluster.tasks_per_node=8", "cluster.gpus_per_node=8", "cluster.partition=gpu",
        "cluster.account=proj", "cluster.qos=high", "cluster.time=120", "cluster.cpus_per_task=6",
        "cluster.mem=400G", "cluster.constraint='a100&ib'", "cluster.exclusive=true",
        "cluster.setup=['module load cuda']", "+cluster.sbatch_extra.mail-type=END",
        "trainer.warmup_steps=1"))  # 32 ranks take the default data in 4 steps
    p = sbatch_parameters(run, "job", Path("/x"))
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["cpus_per_task"]) == (4, 8, 8, 6)
    assert (p["partition"], p["account"], p["qos"], p["time"], p["mem"]) == ("gpu", "proj", "high", 120, "400G")
    assert (p["constraint"], p["exclusive"], p["setup"]) == ("a100&ib", True, ["module load cuda"])
    assert p["additional_parameters"] == {"requeue": True, "mail-type": "END"}
    assert p["srun_args"][0] == "--kill-on-bad-exit=1" and p["srun_args"][-1] == "--output=/x/node%n-rank%t.log"
    bare = sbatch_parameters(parse_run_config(compose_cfg("cluster=slurm")), "job", Path("/x"))
    assert not {"partition", "account", "qos", "mem", "gpus_per_node", "exclusive"} & bare.keys()


@pytest.mark.parametrize("key, value", [
    ("partition", "debug\ntouch /tmp/pwned"), ("partition", "a;b"), ("account", "$(id)"), ("qos", "x y"),
    ("constraint", "a100`id`"), ("mem", "lots"),
])
def test_values_that_could_inject_shell_are_refused(compose_cfg, key, value):
    cfg = compose_cfg("cluster=slurm")
    cfg.cluster[key] = value
    with pytest.raises(ConfigError, match=f"cluster.{key}"):
        parse_run_config(cfg)  # the cluster schema checks what reaches the sbatch script


@pytest.mark.parametrize("extra", [{"output": "/tmp/x"}, {"Bad Key": "1"}, {"comment": "a\nb"}])
def test_sbatch_extra_is_checked(compose_cfg, extra):
    cfg = compose_cfg("cluster=slurm")
    cfg.cluster.sbatch_extra = extra
    with pytest.raises(ConfigError, match="cluster.sbatch_extra"):
        parse_run_config(cfg)  # the cluster schema checks what reaches the sbatch script


# ------------------------------------------------------------------------------------ the real cluster


@pytest.mark.slurm
def test_sweep_submits_one_job_per_point_and_returns(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    t0 = time.monotonic()
    r = launch("-m", "nodes=1,2", "cluster=slurm", "trainer.max_steps=20", *FAST, f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 30  # returns once submitted, without waiting for the jobs
    assert len(re.findall(r"submitted as Slurm job \d+", r.stdout)) == 2
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert sorted(manifest["points"]) == ["0", "1"]
    assert all(len(p["jobs"]) == 1 and p["jobs"][0]["submitted_at"] for p in manifest["points"].values())
    out = wait(sweep)
    assert out.count("completed") == 2 and "points without a record: none" in out
    one, two = record(sweep / "0"), record(sweep / "1")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["launch_mode"], two["provenance"]["slurm"]["simulated"]) == ("slurm", False)
    # the two ranks of the 2-node job ran on different Slurm nodes
    assert len({r["node_name"] for r in two["ranks"]}) == 2
    assert two["provenance"]["slurm"]["job_id"] == manifest["points"]["1"]["jobs"][0]["job_id"]
    assert len({r["parameters_sha256"] for r in two["ranks"]}) == 1


@pytest.mark.slurm
def test_each_point_takes_its_own_launch_options(slurm_cluster, tmp_path):
    """-m cluster=local,slurm: point 0 trains here, point 1 is submitted, and wait=true waits for that job."""
    sweep = tmp_path / "sweep"
    r = launch("-m", "cluster=local,slurm", "wait=true", "trainer.max_steps=5", "trainer.warmup_steps=1", *FAST,
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    local, slurm = record(sweep / "0"), record(sweep / "1")
    assert (local["launch_mode"], slurm["launch_mode"]) == ("local", "slurm")
    assert local["provenance"]["slurm"]["simulated"] and not slurm["provenance"]["slurm"]["simulated"]
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert list(manifest["points"]) == ["1"]  # the manifest lists Slurm's jobs
    assert "1 point(s) submitted" in r.stdout + r.stderr


@pytest.mark.slurm
def test_a_sweep_goes_as_one_array_and_a_preempted_task_resumes_alone(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    r = launch("-m", "trainer.seed=0,1", "cluster=slurm", "trainer.epochs=60", "trainer.log_every=50", *FAST[1:],
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((sweep / "manifest.json").read_text())
    jobs = [manifest["points"][p]["jobs"][0] for p in ("0", "1")]
    assert jobs[0]["array_job_id"] == jobs[1]["array_job_id"] and [j["array_task_id"] for j in jobs] == [0, 1]
    log1 = sweep / "1" / "logs" / "node0-rank0.log"  # the task's ranks log into its own point's folder
    deadline = time.monotonic() + 120
    while not (log1.is_file() and "step 100/" in log1.read_text()):
        assert time.monotonic() < deadline, "task 1 did not start training"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", jobs[1]["job_id"]], check=True)
    out = wait(sweep)
    lines = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert "completed" in lines["0"] and "completed" in lines["1"] and "requeued 1x" in lines["1"]
    one, two = record(sweep / "0"), record(sweep / "1")
    assert (one["restart_count"], two["restart_count"]) == (0, 1) and two["resumed_from_step"] >= 100
    assert two["provenance"]["slurm"]["job_id"] == jobs[1]["job_id"]


@pytest.mark.slurm
def test_static_template_through_plain_sbatch(slurm_cluster, tmp_path):
    env = {**os.environ, "PIPELINE_PYTHON": sys.executable, "PIPELINE_RUN_DIR": str(tmp_path / "run")}
    r = subprocess.run(["sbatch", "--parsable", "--wait", "--nodes=2", "--ntasks-per-node=1",
                        f"--output={tmp_path}/slurm-%j.out", str(REPO / "slurm/ddp.sbatch"),
                        "trainer.max_steps=15", *FAST], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr + (tmp_path / f"slurm-{r.stdout.strip()}.out").read_text()
    rec = record(tmp_path / "run")
    assert (rec["world_size"], rec["steps"]) == (2, 15)
    nodes = [x["node_name"] for x in rec["ranks"]]
    assert len(set(nodes)) == 2
    # per-rank logs named as in local debug mode: node index in the job, global rank
    assert sorted(p.name for p in (tmp_path / "run/logs").iterdir()) == ["node0-rank0.log", "node1-rank1.log"]


@pytest.mark.slurm
def test_preempted_job_resumes_to_the_same_parameters(slurm_cluster, tmp_path):
    """USR2 (what Slurm sends before preemption or the time limit) mid-training: rank 0 checkpoints, submitit
    requeues, the job resumes; its final weights equal an uninterrupted run's."""
    args = ["nodes=2", "trainer.epochs=80", "trainer.log_every=50", *FAST[1:]]
    run_dir = tmp_path / "slurm"
    r = launch(*args, "cluster=slurm", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = json.loads((run_dir / "manifest.json").read_text())["points"]["0"]["jobs"][0]["job_id"]
    log0 = run_dir / "logs" / "node0-rank0.log"
    deadline = time.monotonic() + 120
    while not (log0.is_file() and "step 100/" in log0.read_text()):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out, progress = wait(run_dir, with_progress=True)
    assert "completed" in out and "requeued 1x" in out
    # progress while it ran, as plain lines (stderr is not a terminal here): counts, then the running point's step
    assert re.search(r"^\[\d\d:\d\d:\d\d\] slurm: 1 (running|requeued|pending)", progress, re.M)
    assert re.search(r"point 0: .*step \d+/1280, \d+ samples/s, ETA \d+ s", progress)
    # the rank's log, appended to across the requeue
    assert log0.read_text().count("training 1280 steps") == 2
    rec = record(run_dir)
    # 80 epochs of 2048 samples / 2 ranks / 64 per batch
    assert rec["restart_count"] == 1 and 100 <= rec["resumed_from_step"] < rec["steps"] == 80 * 16
    assert rec["earlier_segments"][0]["start_step"] == 0
    assert rec["timed_steps"] == rec["steps"] - rec["resumed_from_step"] - rec["warmup_steps"]
    # the same run, never interrupted (local debug mode: same world size, same seeds, same worker)
    r = launch(*args, f"hydra.run.dir={tmp_path / 'local'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    resumed, straight = (torch.load(d / "model.pt", weights_only=True) for d in (run_dir, tmp_path / "local"))
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


@pytest.mark.slurm
def test_status_lists_a_failed_point_and_resubmits_only_it(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    # an optimizer class its module lacks passes the launch checks (which find the module without importing torch)
    # and fails in the job
    r = launch("-m", "cluster=slurm", "optimizer._target_=torch.optim.SGD,torch.optim.NoSuchOptimizer",
               "trainer.max_steps=5", "trainer.warmup_steps=1", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = wait(sweep)
    lines = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert "completed" in lines["0"] and "failed" in lines["1"]
    assert "points without a record: 1" in out
    # status points to the rank that failed first and shows its last lines
    assert "point 1: first failed rank's log" in out and "torch.optim.NoSuchOptimizer could not be imported" in out
    r = status(sweep, "--resubmit-failed")
    assert r.returncode == 0 and re.search(r"point 1: resubmitted as job \d+", r.stdout)
    assert "point 0: resubmitted" not in r.stdout
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert len(manifest["points"]["0"]["jobs"]) == 1 and len(manifest["points"]["1"]["jobs"]) == 2
    wait(sweep)


@pytest.mark.slurm
def test_rejected_allocation_submits_nothing(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    before = jobs_in_queue()
    r = launch("-m", "cluster=slurm", "nodes=1,8", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 2
    assert "point #1 (cluster=slurm nodes=8)" in r.stderr and "nothing was launched" in r.stderr
    assert jobs_in_queue() == before and not (sweep / "manifest.json").exists()
    # allow_partial=true: the point Slurm accepts goes, the other is reported and kept in the manifest
    r = launch("-m", "cluster=slurm", "nodes=1,8", "allow_partial=true", "trainer.max_steps=5",
               "trainer.warmup_steps=1", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipping point #1" in r.stdout + r.stderr
    out = wait(sweep)
    assert re.search(r"^0 .*completed", out, re.M) and re.search(r"^1 .*never started", out, re.M)


@pytest.mark.slurm
def test_dry_run_writes_the_scripts_and_submits_nothing(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    before = jobs_in_queue()
    r = launch("-m", "cluster=slurm", "nodes=1,2", "dry_run=true", "cluster.time=30",
               "cluster.setup=['echo ready']", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert jobs_in_queue() == before
    for point, nodes in (("0", 1), ("1", 2)):
        script = (sweep / point / "job.sbatch").read_text()
        assert f"#SBATCH --nodes={nodes}\n" in script and "#SBATCH --time=30\n" in script
        assert "#SBATCH --signal=USR2@90" in script and "#SBATCH --requeue" in script
        assert "\necho ready\n" in script and "srun" in script and "--kill-on-bad-exit=1" in script
        # what Slurm makes of it
        t = subprocess.run(["sbatch", "--test-only", str(sweep / point / "job.sbatch")], capture_output=True,
                           text=True)
        assert t.returncode == 0, t.stderr


@pytest.mark.slurm
def test_nodes_in_their_own_network_namespaces(netns_cluster, tmp_path):
    """--netns: each node has its own address and hostname; the ranks rendezvous over the bridge."""
    r = launch("nodes=2", "cluster=slurm", "trainer.max_steps=10", *FAST, "wait=true",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, slurm_conf=netns_cluster)
    assert r.returncode == 0, r.stderr
    rec = record(tmp_path / "run")
    assert [(x["node_name"], x["hostname"]) for x in rec["ranks"]] == [("nsnode1", "nsnode1"), ("nsnode2", "nsnode2")]
    assert rec["provenance"]["hostnames"] == ["nsnode1", "nsnode2"] and not rec["oversubscribed"]
    assert all(x["processes_on_host"] == 1 for x in rec["ranks"])
