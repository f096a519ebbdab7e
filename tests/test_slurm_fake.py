"""The Slurm logic on any machine: fake sbatch / squeue / sacct / scontrol on PATH (tests/fake_slurm), as
submitit's own tests fake them. Job arrays by allocation, the preflight once per allocation, status in one
squeue and one sacct call, resubmission per task with the launch's checks, the manifest under a lock, and the
sbatch scripts against golden files. The same paths through a real Slurm are in test_slurm.py."""

import errno
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.badnodes import add_bad_nodes
from pipeline.config import ConfigError, parse_run_config
from pipeline.containers import SOURCE_ROOT
from pipeline.launcher.manifest import add_submissions, read_manifest
from pipeline.launcher.slurm import render_sbatch
from pipeline.point import PlannedPoint
from pipeline.rundir import BadNodeEntry, Failure
from pipeline.slurm import expand_job_ids
from pipeline.workloads.datasets import cache_dir
from tests.conftest import GOLDEN, REPO
from tests.fake_slurm.fake_slurm import calls, install, set_state
from tests.records_factory import make_record, write_record

FAST = ["trainer.log_every=1000", "dataset.train_size=2048", "dataset.test_size=512"]


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """The fake Slurm's environment; `run(*args)` launches, `status(*args)` asks, `calls(name)` counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env |= install(tmp_path / "bin", tmp_path / "slurm-state.json", tmp_path / "slurm-calls")

    class Slurm:
        def run(self, *args, extra_env=None):
            return subprocess.run([sys.executable, "-m", "pipeline.launch", *args], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=300, env=env | (extra_env or {}))

        def start(self, *args):
            return subprocess.Popen([sys.executable, "-m", "pipeline.launch", *args], cwd=tmp_path, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

        def status(self, *args):
            return subprocess.run([sys.executable, "-m", "pipeline.status", *args], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=300, env=env)

        def calls(self, name=None):
            return calls(tmp_path / "slurm-calls", name)

        def submissions(self):
            return [c for c in self.calls("sbatch") if "--test-only" not in c]

        def script(self, job_id):
            return json.loads((tmp_path / "slurm-state.json").read_text())["jobs"][job_id]["script"]

    monkeypatch.setenv("FAKE_SLURM_STATE", str(tmp_path / "slurm-state.json"))  # for set_state in this process
    return Slurm()


def job_ids(sweep: Path) -> dict[int, list[str]]:
    return {p: [j.job_id for j in e.jobs] for p, e in read_manifest(sweep).points.items()}


def test_identical_allocations_go_as_one_job_array(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    r = slurm.run("-m", "trainer.seed=0,1,2", "nodes=1,2", "cluster=slurm", "cluster.array_parallelism=2",
                  f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    # 6 points, 2 allocations: 2 sbatch calls, 2 preflights, 1 scontrol (MaxArraySize)
    assert len(slurm.submissions()) == 2 and len(slurm.calls("sbatch")) == 4 and len(slurm.calls("scontrol")) == 1
    ids = job_ids(sweep)
    one_node = [p for p in range(6) if read_manifest(sweep).points[p].nodes == 1]
    arrays = {ids[p][0].split("_")[0] for p in one_node}
    assert len(arrays) == 1 and sorted(ids[p][0].split("_")[1] for p in one_node) == ["0", "1", "2"]
    entry = read_manifest(sweep).points[one_node[1]].jobs[0]
    assert (entry.array_job_id, entry.array_task_id) == (ids[one_node[1]][0].split("_")[0], 1)
    script = slurm.script(arrays.pop())
    assert "#SBATCH --array=0-2%2\n" in script and "#SBATCH --nodes=1\n" in script
    # each task's ranks log into their own point's folder, through SWEEP/.array-logs/<array>/<task>
    log_dir = re.search(r"--output=(\S+)/%a/node%n-rank%t.log", script).group(1)
    for task, point in enumerate(one_node):
        assert (Path(log_dir) / str(task)).resolve() == (sweep / str(point) / "logs").resolve()


def test_arrays_are_split_at_max_array_size(slurm, tmp_path):
    r = slurm.run("-m", "trainer.seed=range(5)", "cluster=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                  extra_env={"FAKE_SLURM_MAX_ARRAY": "2"})
    assert r.returncode == 0, r.stderr
    # the three submissions, made at once: their job ids in no particular order
    arrays = sorted(str(a and a.group(1)) for a in (re.search(r"--array=(\S+)", slurm.script(str(1000 + i)))
                                                    for i in range(3)))
    # 2 + 2 + 1: the last, a single point, a plain job
    assert arrays == ["0-1%2", "0-1%2", "None"] and len(slurm.submissions()) == 3
    assert "_" not in job_ids(tmp_path / "sweep")[4][0]


def test_single_points_go_as_plain_jobs_without_asking_the_array_limit(slurm, tmp_path):
    r = slurm.run("-m", "nodes=1,2,4", "cluster=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert r.returncode == 0, r.stderr
    # 3 allocations of a point each: no array, so no scontrol for MaxArraySize
    assert len(slurm.submissions()) == 3 and len(slurm.calls("sbatch")) == 6 and slurm.calls("scontrol") == []
    assert all("_" not in ids[0] for ids in job_ids(tmp_path / "sweep").values())


def test_a_rejected_allocation_submits_nothing_unless_allow_partial(slurm, tmp_path):
    r = slurm.run("-m", "trainer.seed=0,1", "nodes=1,8", "cluster=slurm", f"hydra.sweep.dir={tmp_path / 'a'}")
    assert r.returncode == 2 and "nothing was launched" in r.stderr and "Requested node configuration" in r.stderr
    assert slurm.submissions() == [] and len(slurm.calls("sbatch")) == 2  # one preflight per allocation
    r = slurm.run("-m", "nodes=1,8", "cluster=slurm", "allow_partial=true", f"hydra.sweep.dir={tmp_path / 'b'}")
    assert r.returncode == 0, r.stderr
    points = read_manifest(tmp_path / "b").points
    assert points[0].jobs and not points[1].jobs and "Requested node configuration" in points[1].skipped


def test_a_thousand_points_launch_in_two_sbatch_calls_and_show_in_one_table(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    r = slurm.run("-m", "trainer.seed=range(500)", "nodes=1,2", "cluster=slurm", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    assert len(slurm.submissions()) == 2 and len(read_manifest(sweep).points) == 1000
    ids = job_ids(sweep)
    set_state(ids[3][0], "RUNNING")
    set_state(ids[4][0], "PENDING", "RUNNING", "FAILED")
    write_record(sweep / "5", make_record(nodes=1, throughput=100))
    before = len(slurm.calls())
    s = slurm.status(str(sweep))
    assert s.returncode == 0, s.stderr
    # one squeue and one sacct call, whatever the sweep's size
    assert [c[0] for c in slurm.calls()[before:]] == ["squeue", "sacct"]
    rows = {int(line.split()[0]): line for line in s.stdout.splitlines() if line[:1].isdigit()}
    assert len(rows) == 1000
    assert "running" in rows[3] and "failed" in rows[4] and "completed" in rows[5] and "pending" in rows[6]


def test_failed_tasks_are_resubmitted_together_after_the_launch_checks(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    assert slurm.run("-m", "trainer.seed=range(4)", "cluster=slurm", f"hydra.sweep.dir={sweep}").returncode == 0
    ids = job_ids(sweep)
    for p in (1, 2, 3):
        set_state(ids[p][0], "RUNNING", "FAILED")
    # point 3's frozen config no longer passes the launch's checks: it is not resubmitted, and says why
    point3 = json.loads((sweep / "3" / "point.json").read_text())
    point3["config"]["cluster"]["sbatch_extra"] = {"array": "0-3"}
    (sweep / "3" / "point.json").write_text(json.dumps(point3))
    before = len(slurm.submissions())
    s = slurm.status(str(sweep), "--resubmit-failed")
    assert s.returncode == 0, s.stderr
    assert "point 3: not resubmitted" in s.stderr and "cluster.sbatch_extra.array is not allowed" in s.stderr
    new = slurm.submissions()[before:]
    assert len(new) == 1  # points 1 and 2: one allocation, one array
    after = job_ids(sweep)
    assert after[0] == ids[0] and after[3] == ids[3]
    assert [len(after[p]) for p in (1, 2)] == [2, 2] and {after[1][1].split("_")[0]} == {after[2][1].split("_")[0]}


def stopped_for(sweep: Path, point: int, job: str, node: str) -> None:
    """What a job's rank 0 leaves when its health check finds `node` bad under health.on_bad=exclude (the entry on
    the sweep's list, written as the job writes it), and the job's end as Slurm records it."""
    run_id = json.loads((sweep / str(point) / "point.json").read_text())["run_id"]
    add_bad_nodes(sweep, [BadNodeEntry(node=node, reason="links 0.06 x the median node's", job_id=job, run_id=run_id,
                                       point=point, at="2026-12-01T00:00:00", simulated=False)])
    set_state(job, "RUNNING", "FAILED")


def test_a_point_stopped_for_a_bad_node_is_resubmitted_without_it_a_bounded_number_of_times(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    r = slurm.run("-m", "nodes=2", "cluster=slurm", "health.on_bad=exclude", "health.max_resubmits=2",
                  f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    assert "--exclude" not in slurm.script(job_ids(sweep)[0][0])
    for turn, node in enumerate(("node3", "node4"), start=1):
        stopped_for(sweep, 0, job_ids(sweep)[0][-1], node)
        s = slurm.status(str(sweep))
        assert s.returncode == 0, s.stderr
        new, avoided = job_ids(sweep)[0][-1], ["node3", "node4"][:turn]
        assert (f"point 0: its job {job_ids(sweep)[0][-2]} stopped before training for a bad node; resubmitted "
                f"without {', '.join(avoided)} as job {new} ({turn} of 2 resubmissions, health.max_resubmits)"
                ) in s.stdout
        assert f"#SBATCH --exclude={','.join(avoided)}\n" in slurm.script(new)
        assert read_manifest(sweep).points[0].jobs[-1].left_out == avoided
        assert re.search(rf"^0 +2 +{new} +pending +resubmitted {turn}x without {', '.join(avoided)} \(bad node\)",
                         s.stdout, re.M), s.stdout
    # the third stop spends health.max_resubmits: not resubmitted, and said; --resubmit-failed would, but 2 nodes
    # of the 4 do not remain: Slurm refuses, and that is said too
    stopped_for(sweep, 0, job_ids(sweep)[0][-1], "node2")
    before = len(slurm.submissions())
    s = slurm.status(str(sweep))
    assert len(slurm.submissions()) == before and "resubmitted without" not in s.stdout
    assert re.search(r"^0 .* bad node +node2: links 0.06 x the median node's; stopped for bad nodes 3 times, "
                     r"health.max_resubmits=2 spent: not resubmitted", s.stdout, re.M), s.stdout
    assert "points without a record: 0" in s.stdout
    s = slurm.status(str(sweep), "--resubmit-failed")
    assert len(slurm.submissions()) == before and "point 0: not resubmitted, Slurm rejects it: Batch job submission " \
        "failed: Requested node configuration is not available (the sweep leaves out node2, node3, node4: " in s.stderr


def test_a_point_that_cannot_be_placed_without_its_bad_nodes_says_why(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    assert slurm.run("nodes=3", "cluster=slurm", "health.on_bad=exclude", f"hydra.run.dir={sweep}").returncode == 0
    run_id = json.loads((sweep / "point.json").read_text())["run_id"]
    add_bad_nodes(sweep, [BadNodeEntry(node=n, reason="compute 0.2 x the median", job_id=job_ids(sweep)[0][0],
                                       run_id=run_id, point=0, at="t", simulated=False) for n in ("node2", "node3")])
    set_state(job_ids(sweep)[0][0], "RUNNING", "FAILED")
    before = len(slurm.submissions())
    for _ in range(2):  # said once as it is found, then kept: not tried on every status
        s = slurm.status(str(sweep))
        assert s.returncode == 0 and len(slurm.submissions()) == before, s.stderr
    assert re.search(r"^0 .* bad node +node2: compute 0.2 x the median; node3: compute 0.2 x the median; not "
                     r"resubmitted: Slurm cannot place it: .*Requested node configuration is not available \(the "
                     r"sweep leaves out node2, node3: ", s.stdout, re.M), s.stdout


def test_new_launches_and_resubmissions_into_a_sweep_leave_out_its_bad_nodes(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    add_bad_nodes(sweep.mkdir() or sweep, [BadNodeEntry(node="node2", reason="r", job_id="1", run_id="x", point=9,
                                                        at="t", simulated=False),
                                           BadNodeEntry(node="local2", reason="r", job_id="local-1", run_id="y",
                                                        point=8, at="t", simulated=True)])
    r = slurm.run("-m", "trainer.seed=0,1", "cluster=slurm", "cluster.exclude=[node4]", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    assert "leaving out node2, node4" in r.stdout + r.stderr
    array = job_ids(sweep)[0][0].split("_")[0]
    assert "#SBATCH --exclude=node2,node4\n" in slurm.script(array)  # a simulated node never reaches Slurm
    set_state(job_ids(sweep)[1][0], "RUNNING", "FAILED")
    s = slurm.status(str(sweep), "--resubmit-failed")
    assert "point 1: resubmitted as job" in s.stdout
    assert "#SBATCH --exclude=node2,node4\n" in slurm.script(job_ids(sweep)[1][-1])


def _garbage(folder: Path, kind: str) -> None:
    """FOLDER/result.json as `kind` says: something that no reader may hang on, run out of memory on, or count."""
    good = make_record(nodes=2, throughput=100).to_json()
    path = folder / "result.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "huge sparse":
        with open(path, "wb") as f:
            f.truncate(1 << 40)  # a terabyte that takes no disk
    elif kind == "truncated":
        path.write_text(json.dumps(good)[:300])
    elif kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "nested 200,000 deep":
        path.write_text("[" * 200_000)  # a recursive parser's stack
    elif kind == "a folder":
        path.mkdir()
    else:
        edits = {"NaN": lambda r: r["ranks"][1]["step_times_s"].__setitem__(3, float("nan")),
                 "Infinity": lambda r: r["config"]["optimizer"].__setitem__("lr", float("inf")),
                 "nodes 0": lambda r: r.update(nodes=0), "negative time": lambda r: r.update(wall_time_s=-1.0),
                 "wrong world size": lambda r: r.update(world_size=3),
                 "diverged": lambda r: r.update(status="diverged", diverged_at_step=37, throughput_samples_per_s=None,
                                                steps=40),
                 "good": lambda r: None}
        edits[kind](good)
        path.write_text(json.dumps(good))


GARBAGE = {"good": None, "fifo": "not a regular file but a FIFO",
           "link to /dev/zero": "not a regular file but a character device", "huge sparse": "1099511627776 bytes",
           "truncated": "not valid JSON", "random bytes": "not valid JSON",
           "NaN": "ranks[1].step_times_s[3]: NaN is not a finite number",
           "Infinity": "config.optimizer.lr: Infinity is not a finite number", "nodes 0": "nodes: 0 is impossible",
           "negative time": "wall_time_s: -1.0 is negative", "wrong world size": "world_size: 3 is not nodes (2) x",
           "nested 200,000 deep": "not valid JSON", "a folder": "not a regular file but a folder",
           "diverged": "training diverged: a non-finite loss at step 37"}


def test_collect_and_status_survive_every_kind_of_broken_record(slurm, tmp_path):
    """One sweep whose points left every kind of broken record: collect and status finish (the subprocess
    timeouts are the hang guards), name each with its reason, count the good one alone, show the diverged one as
    diverged; --resubmit-failed resubmits the broken ones, and the diverged one only with --include-diverged."""
    sweep = tmp_path / "sweep"
    kinds = list(GARBAGE)
    assert slurm.run("-m", f"trainer.seed=range({len(kinds)})", "cluster=slurm",
                     f"hydra.sweep.dir={sweep}").returncode == 0
    for point, kind in enumerate(kinds):
        set_state(job_ids(sweep)[point][0], "RUNNING", "COMPLETED")
        _garbage(sweep / str(point), kind)
    c = subprocess.run([sys.executable, "-m", "pipeline.collect", str(sweep), "--out", str(tmp_path / "out"),
                        "--no-plots"], capture_output=True, text=True, timeout=60)
    assert c.returncode == 0 and "Traceback" not in c.stderr, c.stderr
    assert "1 runs in 1 groups, 1 diverged, 12 records skipped" in c.stdout
    for point, kind in enumerate(kinds[1:], start=1):
        (line,) = [x for x in c.stderr.splitlines() if f"/sweep/{point}/result.json" in x]
        assert GARBAGE[kind] in line, (kind, line)
    assert "## Diverged runs" in (tmp_path / "out/report.md").read_text()
    s = slurm.status(str(sweep))
    assert s.returncode == 0 and "Traceback" not in s.stderr, s.stderr
    rows = {int(line.split()[0]): line for line in s.stdout.splitlines() if line[:1].isdigit()}
    for point, kind in enumerate(kinds):
        state = {"good": "completed", "diverged": "diverged"}.get(kind, "bad record")
        assert f" {state} " in rows[point] and (GARBAGE[kind] or "") in rows[point], (kind, rows[point])
    before = len(slurm.submissions())
    s = slurm.status(str(sweep), "--resubmit-failed")
    assert s.returncode == 0, s.stderr
    resubmitted = {int(x.split()[1].rstrip(":")) for x in s.stdout.splitlines() if "resubmitted as job" in x}
    assert resubmitted == set(range(1, len(kinds) - 1)) and len(slurm.submissions()) == before + 1
    s = slurm.status(str(sweep), "--resubmit-failed", "--include-diverged")
    assert [x for x in s.stdout.splitlines() if "resubmitted" in x] == [
        f"point {len(kinds) - 1}: resubmitted as job {job_ids(sweep)[len(kinds) - 1][-1]}"]


@pytest.mark.e2e
def test_wait_true_exits_non_zero_naming_the_points_that_did_not_complete(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    launcher = slurm.start("-m", "trainer.seed=0,1", "cluster=slurm", "wait=true", f"hydra.sweep.dir={sweep}")
    deadline = time.monotonic() + 120
    while not ((sweep / "manifest.json").exists() and len(job_ids(sweep)) == 2):
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()
        time.sleep(0.1)
    _garbage(sweep / "0", "good")
    set_state(job_ids(sweep)[0][0], "RUNNING", "COMPLETED")
    set_state(job_ids(sweep)[1][0], "RUNNING", "FAILED")
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1 and "Traceback" not in err, err
    assert "1 of 2 point(s) did not complete: point 1: failed" in err and f"pipeline.status {sweep}" in err, err


def test_status_says_why_the_first_failed_rank_failed_in_its_own_words(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    assert slurm.run("-m", "trainer.seed=0,1", "cluster=slurm", f"hydra.sweep.dir={sweep}").returncode == 0
    set_state(job_ids(sweep)[1][0], "RUNNING", "FAILED")
    try:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from OSError(
            errno.ENOSPC, "No space left on device")
    except RuntimeError as e:
        Failure.of(e, rank=1, node_rank=1).write(sweep / "1")
    (sweep / "1/logs/node1-rank1.log").write_text("Traceback (most recent call last):\nRuntimeError: unexpected pos\n")
    s = slurm.status(str(sweep))
    assert s.returncode == 0, s.stderr
    assert (f"point 1: first failed rank's log {sweep / '1/logs/node1-rank1.log'} (rank 1: No space left on device: "
            "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos), last lines:") in s.stdout


@pytest.mark.parametrize("manifest", ["truncated", "random bytes", "fifo", "wrong type"])
def test_a_broken_manifest_is_one_line_and_exit_2(slurm, tmp_path, manifest):
    sweep = tmp_path / "sweep"
    assert slurm.run("-m", "trainer.seed=0,1", "cluster=slurm", f"hydra.sweep.dir={sweep}").returncode == 0
    path = sweep / "manifest.json"
    good = path.read_text()
    path.unlink()
    if manifest == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes({"truncated": good[:40].encode(), "random bytes": os.urandom(256),
                          "wrong type": good.replace('"nodes": 1', '"nodes": "one"').encode()}[manifest])
    s = subprocess.run([sys.executable, "-m", "pipeline.status", str(sweep)], capture_output=True, text=True,
                       timeout=60)
    assert s.returncode == 2 and s.stdout == "" and "Traceback" not in s.stderr
    (line,) = s.stderr.splitlines()
    assert line.startswith(f"pipeline.status: {path} cannot be read: "), line


def test_a_dry_run_needs_no_slurm_and_a_local_one_trains_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["PATH"] = str(Path(sys.executable).parent)
    r = subprocess.run([sys.executable, "-m", "pipeline.launch", "-m", "trainer.seed=0,1", "nodes=2", "cluster=slurm",
                        "dry_run=true", f"hydra.sweep.dir={tmp_path / 's'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (script,) = (tmp_path / "s").glob("array-*.sbatch")
    assert "#SBATCH --array=0-1%2\n" in script.read_text() and "#SBATCH --nodes=2\n" in script.read_text()
    r = subprocess.run([sys.executable, "-m", "pipeline.launch", "cluster=slurm", "dry_run=true", "nodes=2",
                        f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2\n" in (tmp_path / "one/job.sbatch").read_text()
    r = subprocess.run([sys.executable, "-m", "pipeline.launch", "nodes=2", "cluster.tasks_per_node=2", "dry_run=true",
                        f"hydra.run.dir={tmp_path / 'l'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dry run, nothing started" in r.stderr + r.stdout
    assert not (tmp_path / "l/result.json").exists() and not (tmp_path / "l/model.pt").exists()
    lines = (tmp_path / "l/dry_run.txt").read_text().splitlines()
    assert len(lines) == 5 and "SLURM_PROCID=3" in lines[4] and "-m pipeline.worker" in lines[4]


@pytest.mark.parametrize("key", ["array", "wrap", "chdir", "ntasks", "export", "a"])
def test_sbatch_extra_cannot_break_one_folder_per_point(compose_cfg, key):
    cfg = compose_cfg("cluster=slurm")
    cfg.cluster.sbatch_extra = {key: "1"}
    with pytest.raises(ConfigError, match="cluster.sbatch_extra"):
        parse_run_config(cfg)  # the cluster schema checks what reaches the sbatch script


@pytest.mark.parametrize("override", ["hydra.run.dir='out\nrm -rf x'", "hydra.run.dir='out\tx'"])
def test_a_control_character_in_a_folder_is_a_configuration_error(tmp_path, override):
    r = subprocess.run([sys.executable, "-m", "pipeline.launch", "cluster=slurm", "dry_run=true", override],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "configuration error: hydra.run.dir=" in r.stderr and "control character" in r.stderr
    assert "Traceback" not in r.stderr


def test_job_ids_of_pending_array_tasks_are_expanded():
    assert expand_job_ids("123_[4-6,9%2]") == ["123_4", "123_5", "123_6", "123_9"]
    assert expand_job_ids("123_7") == ["123_7"] and expand_job_ids("88") == ["88"]


def _add(sweep: str, writer: int) -> None:
    add_submissions(Path(sweep), [(writer * 100 + i, Path(sweep) / str(writer * 100 + i), [], 1, f"{writer}_{i}")
                                  for i in range(25)])


def test_concurrent_writers_lose_no_manifest_entry(tmp_path):
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pool.starmap(_add, [(str(tmp_path), w) for w in range(8) for _ in range(1)])
    with multiprocessing.get_context("fork").Pool(8) as pool:  # and again: each point's second submission
        pool.starmap(_add, [(str(tmp_path), w) for w in range(8)])
    points = read_manifest(tmp_path).points
    assert len(points) == 200 and all(len(e.jobs) == 2 for e in points.values())


# ------------------------------------------------------------------------------------------------- golden
GOLDEN_SBATCH = GOLDEN / "sbatch"


def rendered(compose_cfg, points: int, *overrides: str, avoid: tuple[str, ...] = ()) -> str:
    run = parse_run_config(compose_cfg("cluster=slurm", *overrides))
    group = [PlannedPoint(i, [], run, Path(f"/SWEEP/{i}")) for i in range(points)]
    text = render_sbatch(group, Path("/SWEEP"), "pipeline-sweep-0", avoid)
    text = re.sub(r"/SWEEP/\.array-logs/[0-9a-f]+/", "/SWEEP/.array-logs/ARRAY/", text)
    # this checkout's and this machine's paths: the launch's Python, the project's source, the datasets' cache
    return text.replace(sys.executable, "PYTHON").replace(SOURCE_ROOT, "SOURCE").replace(str(cache_dir()), "CACHE")


@pytest.mark.parametrize("name, points, overrides, avoid", [
    ("single", 1, ["nodes=2", "cluster.tasks_per_node=4", "cluster.gpus_per_node=4", "cluster.partition=gpu",
                   "cluster.account=proj", "cluster.time=120", "cluster.mem=64G", "cluster.setup=['module load cuda']",
                   "+cluster.sbatch_extra.mail-type=END"], ()),
    ("array", 3, ["nodes=1", "cluster.array_parallelism=2", "cluster.exclusive=true"], ()),
    # cluster.exclude and the sweep's bad-node list, together
    ("excluded", 1, ["nodes=3", "cluster.exclude=['gpu[01-02]',gpu17]", "health.on_bad=exclude"], ("gpu09",)),
    # the ranks in a container, per runtime (docs/containers.md): the batch script requeues, on the host
    ("pyxis", 1, ["nodes=2", "cluster.gpus_per_node=8", "cluster.container.runtime=pyxis",
                  "cluster.container.image='nvcr.io#nvidia/pytorch:24.01-py3'",
                  "cluster.container.mounts=[/lustre/data]", "cluster.container.workdir=/workspace",
                  "+cluster.container.env.NCCL_DEBUG=WARN"], ()),
    ("apptainer", 1, ["nodes=2", "cluster.gpus_per_node=4", "cluster.container.runtime=apptainer",
                      "cluster.container.image=/images/pytorch.sif", "cluster.container.options=[--writable-tmpfs]",
                      "cluster.container.mounts=['/scratch/data:/data']"], ()),
    ("charliecloud", 3, ["nodes=2", "cluster.container.runtime=charliecloud", "cluster.container.image=/images/torch",
                         "cluster.container.python=/opt/venv/bin/python"], ()),
])
def test_sbatch_scripts_match_the_golden_files(compose_cfg, name, points, overrides, avoid):
    """The golden files are checked in (tests/golden/sbatch); this test only reads them. After a deliberate change
    of the scripts, write them anew with `python -m tests.test_slurm_fake` and review the difference."""
    assert rendered(compose_cfg, points, *overrides, avoid=avoid) == (GOLDEN_SBATCH / f"{name}.sbatch").read_text()


if __name__ == "__main__":  # write the golden scripts anew (a deliberate change), then review `git diff`
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    GOLDEN_SBATCH.mkdir(parents=True, exist_ok=True)
    for params in test_sbatch_scripts_match_the_golden_files.pytestmark[0].args[1]:
        name, points, overrides, avoid = params

        def compose_cfg(*o):
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                return compose(config_name="config", overrides=list(o))
        (GOLDEN_SBATCH / f"{name}.sbatch").write_text(rendered(compose_cfg, points, *overrides, avoid=avoid))
