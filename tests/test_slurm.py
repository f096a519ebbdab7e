"""The Slurm path through a real Slurm: the test run's 4-node cluster (tests/conftest.py, slurm_cluster), each node
in a network namespace of its own."""

import contextlib
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
from pipeline.slurm import expand_hostlist
from pipeline.launcher.slurm import sbatch_parameters
from pipeline.rundir import Point, TrackedRuns
from tests.conftest import CLUSTER, CLUSTER_SUBNET, REPO, MlflowServer, launch, start_launch
from tests.streams import stream_env, user_folder

FAST = ["trainer.log_every=1000", "dataset.train_size=2048", "dataset.test_size=512"]


@contextlib.contextmanager
def slow_link(node: int, rate: str = "200mbit"):
    """A real slow link: tc's token bucket on both directions of netns node `node`'s interface, the host side of
    its veth (traffic into the node) and its eth0 (out of it). This kernel has no netem (CONFIG_NET_SCH_NETEM is
    not set: `tc qdisc add ... netem` says "Specified qdisc kind is unknown"), so latency cannot be added here."""
    sides = [[], ["nsenter", f"--net=/run/netns/{CLUSTER.bridge}-{CLUSTER.node(node)}"]]
    devices = [f"{CLUSTER.bridge}v{node}", "eth0"]
    try:
        for enter, dev in zip(sides, devices):
            subprocess.run([*enter, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb",
                            "latency", "100ms"], check=True)
        yield
    finally:
        for enter, dev in zip(sides, devices):
            subprocess.run([*enter, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)


@contextlib.contextmanager
def cpu_quota(node: int, share: float = 0.1):
    """A real slow node: netns node `node`'s slurmd moved into a cgroup v1 `cpu` cgroup with a CFS quota of `share`
    of one CPU, so the job steps it starts inherit it; moved back, and the cgroup removed, afterwards."""
    root = Path("/sys/fs/cgroup/cpu")
    if not (root / "cpu.cfs_quota_us").exists():
        pytest.skip("no cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    group = root / f"pipeline-tests-slow-{CLUSTER.node(node)}"
    group.mkdir(exist_ok=True)
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(share * 100000)))
        (group / "cgroup.procs").write_text((CLUSTER.folder / f"run/slurmd-{CLUSTER.node(node)}.pid").read_text())
        yield
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                (root / "cgroup.procs").write_text(pid)
            except OSError:  # gone meanwhile
                pass
        group.rmdir()


def sacct_nodes(job: str) -> list[str]:
    """The nodes a finished job ran on, as sacct says once it has settled (for about a second after a short job
    ends, it names only the first)."""
    for _ in range(50):
        out = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "NodeList,State"], capture_output=True,
                             text=True).stdout.strip().splitlines()
        if out and "," in out[-1] or out and "[" in out[-1]:
            nodelist = out[-1].split("|")[0]
            return expand_hostlist(nodelist)
        time.sleep(0.2)
    raise AssertionError(f"sacct gave no node list for job {job}: {out}")


def status(sweep, *args):
    return subprocess.run([sys.executable, "-m", "pipeline.status", str(sweep), *args], capture_output=True,
                          text=True, timeout=600)


def wait(sweep, with_progress=False):
    r = status(sweep, "--wait")
    assert r.returncode == 0, r.stderr
    return (r.stdout, r.stderr) if with_progress else r.stdout


def record(point_dir):
    return json.loads((point_dir / "result.json").read_text())


def preempt_at(args, run_dir, logged: str, within_s: float = 180):
    """Submit one point to Slurm and, once its rank 0 has logged `logged`, send the job USR2 (what Slurm sends
    before preemption or the time limit); rank 0's log."""
    r = launch(*args, "cluster=slurm", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr
    job = json.loads((run_dir / "manifest.json").read_text())["points"]["0"]["jobs"][0]["job_id"]
    log0 = run_dir / "logs" / "node0-rank0.log"
    deadline = time.monotonic() + within_s
    while not (log0.is_file() and logged in log0.read_text()):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    return log0


@pytest.fixture(scope="module")
def slurm_mlflow(slurm_cluster, tmp_path_factory):
    """A real MLflow server on the cluster's bridge address (the host's side of it), which its nodes reach."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), host=f"{CLUSTER_SUBNET}.1").start()
    yield server
    server.stop()


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
def test_preempted_job_resumes_to_the_same_parameters(slurm_cluster, slurm_mlflow, tmp_path):
    """USR2 (what Slurm sends before preemption or the time limit) mid-training: rank 0 checkpoints, submitit
    requeues, the job resumes; its final weights equal an uninterrupted run's, and its MLflow run is one."""
    args = ["nodes=2", "trainer.epochs=80", "trainer.log_every=50", *FAST[1:]]
    run_dir = tmp_path / "slurm"
    # the job logs to MLflow too (a server on the cluster's bridge, which the nodes reach): tracking is a launch
    # option, so the uninterrupted run below is the same run
    tracked = ["tracking=[mlflow]", f"tracking.mlflow.uri={slurm_mlflow.uri}"]
    log0 = preempt_at([*args, *tracked], run_dir, "step 100/")
    # meanwhile, the same run never interrupted (local debug mode: same world size, same seeds, same worker)
    uninterrupted = start_launch(*args, f"hydra.run.dir={tmp_path / 'local'}", cwd=tmp_path)
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
    _, said = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, said
    resumed, straight = (torch.load(d / "model.pt", weights_only=True) for d in (run_dir, tmp_path / "local"))
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    # one MLflow run across the requeue: every reported step once, the restart on it, ended as the record
    client, point = slurm_mlflow.client(), Point.read(run_dir)
    run_id = TrackedRuns.read(run_dir).runs["mlflow"].run_id
    experiment = client.get_experiment_by_name("pipeline").experiment_id
    assert [r.info.run_id for r in client.search_runs(
        [experiment], filter_string=f"tags.`pipeline/run_id` = '{point.run_id}'")] == [run_id]
    curve = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert curve == sorted(set(curve)) == [*range(50, 1280, 50), 1280]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pipeline/restarts"] == "1"
    assert run.data.tags["pipeline/status"] == "completed"
    assert run.data.tags["slurm.job_id"] == rec["provenance"]["slurm"]["job_id"]
    assert TrackedRuns.read(run_dir).runs["mlflow"].starts == 2


@pytest.mark.slurm
def test_a_preempted_fsdp_job_resumes_to_the_same_parameters(slurm_cluster, tmp_path):
    """The same through Slurm for a sharded run: on USR2 every rank saves its shards (DCP) at the next finite check,
    submitit requeues, the job resumes from checkpoint.dcp on its new allocation and ends at the weights of an
    uninterrupted run, bitwise."""
    args = ["nodes=2", "parallel=fsdp", "model=gpt_tiny", "dataset=synthetic_tokens", "dataset.train_size=1024",
            "dataset.test_size=64", "trainer.scaling=strong", "trainer.global_batch_size=32", "trainer.epochs=10",
            "trainer.max_steps=200", "trainer.warmup_steps=2", "trainer.log_every=25", "trainer.finite_check_every=5",
            "trainer.tensorboard=false", "probe.enabled=false"]
    run_dir = tmp_path / "slurm"
    preempt_at(args, run_dir, "step 50/")
    uninterrupted = start_launch(*args, f"hydra.run.dir={tmp_path / 'local'}", cwd=tmp_path)  # never interrupted
    out = wait(run_dir)
    assert "completed" in out and "requeued 1x" in out
    rec = record(run_dir)
    assert rec["parallel"]["kind"] == "fsdp" and rec["restart_count"] == 1
    assert 50 <= rec["resumed_from_step"] < rec["steps"] == 200
    assert (run_dir / "checkpoint.dcp" / "checksums.json").is_file()
    _, said = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, said
    resumed, straight = (torch.load(d / "model.pt", weights_only=True) for d in (run_dir, tmp_path / "local"))
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


@pytest.mark.slurm
def test_a_preempted_stream_resumes_to_the_same_samples_and_parameters(slurm_cluster, tmp_path, monkeypatch):
    """A Hugging Face stream (json shards, 2 ranks x 2 DataLoader workers): USR2 mid-epoch, both ranks save their
    positions with the checkpoint, submitit requeues, and the job takes the uninterrupted run's samples in its order
    (the ids the model saw) to its weights, bitwise."""
    user = user_folder(tmp_path / "user")
    args = ["nodes=2", "model=noting", "model.delay_s=0.02", "dataset=hf_stream", "io.input_key=x",
            "io.target_key=label", "trainer.batch_size=5", "loader.num_workers=2", "trainer.epochs=3",
            "trainer.max_steps=1000", "trainer.warmup_steps=1", "trainer.log_every=10", "trainer.finite_check_every=2",
            "trainer.tensorboard=false", "probe.enabled=false", f"hydra.searchpath=[file://{user / 'conf'}]"]
    runs = {}
    for name in ("slurm", "local"):
        runs[name] = tmp_path / name
        for key, value in stream_env(user, tmp_path / f"notes-{name}").items():
            monkeypatch.setenv(key, value)  # sbatch passes the launch's environment on, as it does by default
        if name == "slurm":
            preempt_at(args, runs[name], "step 50/")
        else:
            uninterrupted = start_launch(*args, f"hydra.run.dir={runs[name]}", cwd=tmp_path)
    out = wait(runs["slurm"])
    assert "completed" in out and "requeued 1x" in out
    rec = record(runs["slurm"])
    assert rec["restart_count"] == 1 and 50 <= rec["resumed_from_step"] < rec["steps"] == 3 * 40
    assert rec["loader"]["kind"] == "stream" and rec["steps_per_epoch"] == 40
    _, said = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, said
    for rank in (0, 1):
        said = [(tmp_path / f"notes-{name}" / f"rank-{rank}.txt").read_text() for name in runs]
        assert said[0] == said[1] and said[0].count("\n") == 3 * 40, rank
    resumed, straight = (torch.load(d / "model.pt", weights_only=True) for d in runs.values())
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


@pytest.mark.slurm
def test_status_lists_a_failed_point_and_resubmits_only_it(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    # an optimizer of the user's whose constructor raises passes the launch's checks (its source is read, not run)
    # and fails in the job, which starts in the launch's folder, where its module is
    (tmp_path / "myopt.py").write_text("import torch\n\n\nclass Broken(torch.optim.SGD):\n    def __init__(self, "
                                       "params, lr=0.1, momentum=0.0, weight_decay=0.0, nesterov=False):\n"
                                       "        raise ValueError('this optimizer refuses to start')\n")
    r = launch("-m", "cluster=slurm", "optimizer._target_=torch.optim.SGD,myopt.Broken",
               "trainer.max_steps=5", "trainer.warmup_steps=1", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = wait(sweep)
    lines = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert "completed" in lines["0"] and "failed" in lines["1"]
    assert "points without a record: 1" in out
    # status points to the rank that failed first and shows its last lines
    assert "point 1: first failed rank's log" in out and "myopt.Broken could not be built on rank" in out, out
    # from the launch's folder, as the job starts where it is submitted from (its module is there)
    r = subprocess.run([sys.executable, "-m", "pipeline.status", str(sweep), "--resubmit-failed"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and re.search(r"point 1: resubmitted as job \d+", r.stdout), r.stderr
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
    assert set(jobs_in_queue()) <= set(before) and not (sweep / "manifest.json").exists()
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
    assert set(jobs_in_queue()) <= set(before)  # nothing new (an earlier test's job may end meanwhile)
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
def test_nodes_in_their_own_network_namespaces(slurm_cluster, tmp_path):
    """--netns: each node has its own address and hostname; the ranks rendezvous over the bridge."""
    r = launch("nodes=2", "cluster=slurm", "trainer.max_steps=10", *FAST, "wait=true",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = record(tmp_path / "run")
    assert [(x["node_name"], x["hostname"]) for x in rec["ranks"]] == [("nsnode1", "nsnode1"), ("nsnode2", "nsnode2")]
    assert rec["provenance"]["hostnames"] == ["nsnode1", "nsnode2"] and not rec["oversubscribed"]
    # one machine: the ranks share its cores (by its boot id; by hostname each would take them all)
    assert len({x["machine"] for x in rec["ranks"]}) == 1 and all(x["processes_on_host"] == 2 for x in rec["ranks"])
    assert all(x["threads"] == (os.cpu_count() or 1) // 2 or x["threads"] == 1 for x in rec["ranks"])
    assert rec["health"]["mode"] == "serial" and rec["health"]["machines"] == 1


@pytest.mark.slurm
@pytest.mark.alone  # every other node must measure clean: no test beside it
def test_a_slow_link_is_flagged_and_the_point_resubmitted_without_its_node(slurm_cluster, tmp_path):
    """nsnode3's interface at 200 Mbit/s (tc tbf, both ways): its links, and only its, are slow. A 3-node job
    (nsnode1-3) finds it in its health check, stops before training (exit 3) and puts it on the sweep's list; with
    nobody watching (the launch returned at once; no `status` until the record exists), the job's batch script
    resubmits the point with --exclude, and the new job runs on nsnode1, 2 and 4 (sacct) and says so in its
    record."""
    run = tmp_path / "run"
    with slow_link(3):
        r = launch("nodes=3", "cluster=slurm", "health.on_bad=exclude", "trainer.max_steps=6",
                   "trainer.warmup_steps=1", *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 240
        while not (run / "result.json").exists():
            assert time.monotonic() < deadline, "no record: the point was not resubmitted by its job"
            time.sleep(1)
    first, second = [j["job_id"] for j in json.loads((run / "manifest.json").read_text())["points"]["0"]["jobs"]]
    assert f"pipeline.launcher.heal: point 0: its job {first} stopped before training for a bad node; resubmitted " \
           f"without nsnode3 as job {second} (1 of 2 resubmissions, health.max_resubmits)" in \
           (run / "submitit" / f"{first}_0_log.out").read_text()
    while jobs_in_queue():  # the record is written before the job ends
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert sacct_nodes(first) == ["nsnode1", "nsnode2", "nsnode3"]
    assert sacct_nodes(second) == ["nsnode1", "nsnode2", "nsnode4"]
    (entry,) = json.loads((run / "bad-nodes.json").read_text())["entries"]
    assert (entry["node"], entry["job_id"], entry["simulated"]) == ("nsnode3", first, False)
    assert entry["reason"].startswith("links 0.") and "x the median node's" in entry["reason"]
    rec = record(run)
    assert [x["node_name"] for x in rec["ranks"]] == ["nsnode1", "nsnode2", "nsnode4"]
    health = rec["health"]
    assert health["left_out"] == ["nsnode3"] and health["bad"] == []
    assert [(e["node"], e["job_id"]) for e in health["earlier"]] == [("nsnode3", first)]
    s = status(run)
    assert re.search(rf"^0 +3 +{second} +completed +resubmitted 1x without nsnode3 \(bad node\)", s.stdout, re.M), \
        s.stdout


@pytest.mark.slurm
@pytest.mark.alone  # every other node must measure clean: no test beside it
def test_a_cpu_throttled_node_and_a_node_whose_check_raises_are_named_in_status(slurm_cluster, tmp_path):
    """A 4-node job: nsnode2's slurmd runs under a 10% CPU quota (a cgroup), so its job step does; nsnode4's rank
    raises in its GEMM (a fault injected through sitecustomize, on that node only). Under health.on_bad=fail the
    job stops before training, and status names both nodes, each with its cause. (At 20% the quota's node measured
    0.39 x the median here, with other engineers' load giving the clean nodes half a core each: 10% leaves room.)"""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('SLURMD_NODENAME') == 'nsnode4':\n"
        "    import pipeline.job.health.measure as h\n"
        "    def failing_gemm(device, seconds):\n"
        "        raise RuntimeError('injected failure in the GEMM')\n"
        "    h.gemm = failing_gemm\n")
    run = tmp_path / "run"
    with cpu_quota(2), pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", f"{inject}:{os.environ.get('PYTHONPATH', '')}")  # sbatch passes it to the job
        r = launch("nodes=4", "cluster=slurm", "health.on_bad=fail", *FAST, "wait=true", f"hydra.run.dir={run}",
                   cwd=tmp_path)
    assert r.returncode == 1 and "1 of 1 point(s) did not complete: point 0: failed" in r.stderr, r.stderr
    s = status(run)
    assert re.search(r"^0 +4 +\d+ +failed", s.stdout, re.M), s.stdout
    said = re.search(r"first failed rank's log .* \(rank \d+: BadNodesFound: health check: (.*)\), last lines",
                     s.stdout)
    assert said, s.stdout
    flags = dict(part.split(": ", 1) for part in said.group(1).removesuffix(
        " (health.on_bad=fail: stopping before training)").split("; ") if part.startswith("nsnode"))
    assert set(flags) == {"nsnode2", "nsnode4"}, said.group(1)
    assert re.match(r"compute 0\.\d+ x the median .*: a CPU quota \(its cgroup throttled \d+ times, CPU share "
                    r"0\.[01]\d\)", flags["nsnode2"]), flags["nsnode2"]
    assert flags["nsnode4"] == "its check failed: RuntimeError: injected failure in the GEMM"
    assert not (run / "result.json").exists()


@pytest.mark.slurm
@pytest.mark.alone  # a measurement against its forecast: no test beside it
def test_the_forecast_on_a_shaped_fabric_holds_its_measurement(slurm_cluster, tmp_path):
    """Every link at 1 Gbit/s (tc tbf), a comm-bound MLP (3.3 MB of gradient), 1 and 2 nodes twice: the probe model's
    prediction at 2 nodes has an interval, and the measurement is inside it; the held-out forecast says why there
    is none (no multi-rank node count below 2). What holds on this loaded 2-core machine: 3 and 4 nodes put 3 and 4
    ranks on its 2 cores (oversubscribed, kept apart), and the error itself moved from +7% to +33% between sweeps
    with the outside load (docs/performance.md)."""
    sweep = tmp_path / "sweep"
    with contextlib.ExitStack() as shaped:
        for node in range(1, 5):
            shaped.enter_context(slow_link(node, "1gbit"))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMP_NUM_THREADS", "1")
            r = launch("-m", "nodes=1,2", "trainer.seed=0,1", "cluster=slurm", "cluster.array_parallelism=1",
                       "model.hidden=1024", "trainer.max_steps=30", *FAST, "wait=true", f"hydra.sweep.dir={sweep}",
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    c = subprocess.run([sys.executable, "-m", "pipeline.collect", str(sweep), "--out", str(tmp_path / "out"),
                        "--no-plots"], capture_output=True, text=True, timeout=120)
    assert c.returncode == 0 and "4 runs in 1 groups" in c.stdout, c.stdout + c.stderr
    (analysis,) = json.loads((tmp_path / "out/scaling.json").read_text())["analyses"]
    probes = {p["nodes"]: p for p in analysis["probes"]["predictions"]}
    two = probes[2]
    assert two["measured"] is not None and two["low"] <= two["measured"] <= two["high"], analysis["probes"]
    assert two["kappa"] == 1.0 and "the work from the baseline" in two["source"]
    assert analysis["probes"]["held_out"] is None and "no fabric probes" in analysis["probes"]["held_out_missing"]
    print(f"probe model at 2 nodes: {two['predicted']:.1%} ({two['low']:.1%} to {two['high']:.1%}) against "
          f"{two['measured']:.1%} measured")
