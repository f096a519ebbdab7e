"""Every launch error through the real CLI: bad input (Hydra's own errors too) is one line naming the key and
exit 2, before anything is written; a failed run is one message and exit 1; and the message says what happened
to a rank: out of disk, stopped, killed by a signal (the OOM killer, in a real memory cgroup)."""

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import launch, live_in_group, start_launch, wait_for_step

SMALL = ["dataset.train_size=2048", "dataset.test_size=256", "trainer.tensorboard=false"]


# a user's module, in the launch's folder (on sys.path as `python -m` puts it there)
USER_MODULE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width: int, depth: int = 2):
        super().__init__()
        self.layer = nn.Linear(width, depth)


class Wrapped(Net):
    pass


class NotAModel:
    def __init__(self, width=1):
        self.width = width


def make_net(width=8):
    net = Net(width)  # built, and not returned


def rows(root, size=10):
    return [(torch.zeros(2), 0)] * size
"""


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout and "Error executing job" not in r.stderr + r.stdout
    (line,) = [x for x in r.stderr.splitlines() if x.strip()]
    assert line.startswith("pipeline.launch: configuration error: "), line
    return line


@pytest.mark.parametrize("overrides, said", [
    (["trainer.batch_size=abc"], "trainer.batch_size=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["nodes=1.5"], "nodes=1.5: Value '1.5' of type 'float' could not be converted to Integer"),
    (["model=foo"], "model=foo is not an option of model; choose one of: cnn, gpt2_small, gpt_tiny, mlp, resnet18"),
    (["+experiment=nope"], "experiment=nope is not an option of experiment; choose one of: cifar10_cnn, "
     "gpt_fsdp_strong, gpt_fsdp_weak, gpt_hsdp_strong, gpt_strong"),
    (["trainer.batchsize=3"], "trainer.batchsize is not a key of the config; did you mean trainer.batch_size?"),
    (["nodes=[1,2"], "nodes=[1,2: no viable alternative at input"),
    (["cluster.timeout_s=99999999999999"], "cluster.timeout_s=99999999999999 is not allowed; it must be <= 2147483"),
    (["trainer.max_steps=5"], "trainer.warmup_steps=5 leaves no step to time: the run takes 5 step(s) "
                              "(trainer.max_steps=5)"),
    (["trainer.warmup_steps=40", "dataset.train_size=2048", "nodes=2"],
     "the run takes 16 step(s) (trainer.epochs=1 x 16 steps per epoch)"),
    (["nodes=2", "profiler.enabled=true", "profiler.ranks=[7]"], "profiler.ranks=[7] is not allowed: this run has "
                                                                 "ranks 0 to 1"),
    (["dataset.separation=inf"], "dataset.separation=inf is not allowed; it must be a finite number"),
    (["optimizer.momentum=nan"], "optimizer.momentum=nan is not allowed; it must be a finite number"),
    (["optimizer.weight_decay=inf"], "optimizer.weight_decay=inf is not allowed; it must be a finite number"),
    (["scheduler=cosine", "scheduler.eta_min=-1"], "scheduler.eta_min=-1.0 is not allowed; it must be >= 0.0"),
    # once refused only by the ranks, both blamed on trainer.warmup_steps
    (["scheduler=warmup_cosine", "scheduler.then.eta_min=-0.1"], "scheduler.then.eta_min=-0.1 is not allowed: a "
                                                                 "learning rate's floor must be >= 0"),
    (["scheduler=warmup_cosine", "trainer.max_steps=50"], "scheduler.warmup_steps=100 is not shorter than the run, "
                                                          "which takes 50 step(s) (trainer.max_steps=50)"),
    pytest.param(["trainer.device=cuda"], "trainer.device=cuda: this machine has no NVIDIA GPU (no /dev/nvidia0)",
                 marks=pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd"),
                                          reason="this machine has a GPU")),
    (["cluster=slurm", "trainer.device=cuda"], "trainer.device=cuda with cluster.gpus_per_node=0: the job would ask "
                                               "Slurm for no GPU"),
    (["loss.label_smoothing=5"], "loss.label_smoothing=5.0 is not allowed; it must be in [0, 1]"),
    (["dataset=mnist", "dataset.train_size=10"], "dataset.train_size is not a key of the dataset chosen here"),
    (["parallel=hsdp", "nodes=2", "cluster.tasks_per_node=3", "parallel.replicate=3"],
     "parallel.replicate=3 makes shard groups of 2 ranks, which do not divide cluster.tasks_per_node=3"),
    (["trainer.scaling=strong", "trainer.global_batch_size=96", "nodes=2", "trainer.grad_accum_steps=5"],
     "trainer.grad_accum_steps=5 does not divide the 48 samples each rank takes per step"),
    (["health.on_bad=skip"], "health.on_bad='skip' is not allowed; choose one of: warn, exclude, fail"),
    (["hydra.job.name='a\nb'"], "hydra.job.name='a\\nb' is not allowed: a newline or other control character"),
    (["evaluate.holdout=1.5"], "evaluate.holdout=1.5 is not allowed; it must be in [0, 1)"),
    (["evaluate.split=''"], "evaluate.split='' is not allowed; name the held-out split"),
    (["health.answer_s=0.000001"], "health.answer_s=1e-06 is not allowed; it must be >= 1.0"),
    # a target's definition, read from its source (once found by the ranks only): torch's own, and the user's below
    (["optimizer._target_=torch.optim.Adamm"], "optimizer._target_=torch.optim.Adamm: torch.optim ("),
    (["optimizer._target_=torch.optim.Adamm"], "has no Adamm; did you mean torch.optim.Adam or"),
    (["~loss", "+loss._target_=torch.nn.CrossEntropyLoss", "+loss.smoothing=0.1"],
     "loss.smoothing=0.1: torch.nn.CrossEntropyLoss takes no argument 'smoothing' ("),
    (["scheduler=warmup_cosine", "+scheduler.then.eta_mn=0"], "did you mean scheduler.then.eta_min?"),
    (["~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.OneCycleLR"],
     "scheduler._target_=torch.optim.lr_scheduler.OneCycleLR needs max_lr ("),
    (["~model", "+model._target_=torch.optim.SGD"], "model._target_=torch.optim.SGD is a class that does not derive "
                                                    "from torch.nn.Module"),
    (["~model", "+model._target_=os.system"], "model._target_=os.system is in Python's standard library (os)"),
    (["~model", "+model._target_=mynets.Nett"], "model._target_=mynets.Nett: mynets ("),
    (["~model", "+model._target_=mynets.Nett"], "has no Nett; did you mean mynets.Net?"),
    (["~model", "+model._target_=mynets.Net"], "model._target_=mynets.Net needs width ("),
    (["~model", "+model._target_=mynets.Wrapped", "+model.widht=4"],
     "model.widht=4: mynets.Wrapped takes no argument 'widht' ("),
    (["~model", "+model._target_=mynets.NotAModel"], "model._target_=mynets.NotAModel is a class that does not "
                                                     "derive from torch.nn.Module"),
    (["~model", "+model._target_=mynets.make_net"], "model._target_=mynets.make_net returns nothing ("),
    (["~dataset", "+dataset._target_=mynets.rows"], "dataset._target_=mynets.rows needs root ("),
    (["~model", "+model._target_=broken.Net"], "model._target_=broken.Net: its module broken ("),
])
def test_bad_input_is_one_line_naming_the_key_and_exit_2(tmp_path, overrides, said):
    (tmp_path / "mynets.py").write_text(USER_MODULE)
    (tmp_path / "broken.py").write_text("import a_module_that_does_not_exist  # noqa: F401\n\n\nclass Net:\n"
                                        "    pass\n")
    r = launch(*overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert said in one_error_line(r)
    assert not (tmp_path / "run" / "point.json").exists()  # Hydra may have made the folder: nothing of a run


def test_an_empty_run_folder_and_a_fifo_in_a_dataset_root_are_refused(tmp_path):
    """hydra.run.dir='' would run in the launch's own folder; a FIFO named *.py in byte_text's root would block the
    rank reading it forever (the timeout is the hang guard)."""
    for args in (["-m", "hydra.sweep.dir=''", "trainer.seed=1,2"], ["hydra.run.dir=''"]):
        r = subprocess.run([sys.executable, "-m", "pipeline.launch", *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and "='' is not allowed: an empty folder is the one the launch runs in" in r.stderr
    assert not list(tmp_path.glob("*.json"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text/a.py").write_text("x = 1\n" * 1000)
    os.mkfifo(tmp_path / "text/b.py")
    r = launch("dataset=byte_text", "model=gpt_tiny", f"dataset.root={tmp_path / 'text'}",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=60)
    assert f"{tmp_path / 'text/b.py'} is a FIFO, not a file" in one_error_line(r)


def test_in_a_sweep_every_bad_point_is_named_once(tmp_path):
    r = launch("-m", "model=mlp,foo", "trainer.batch_size=64,x", f"hydra.sweep.dir={tmp_path / 'sweep'}",
               cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "3 of 4 sweep points cannot run" in r.stderr
    assert r.stderr.count("model=foo is not an option of model") == 2
    assert "point #1 (model=mlp trainer.batch_size=x): trainer.batch_size=x: Value 'x'" in r.stderr


def test_a_yaml_error_in_a_users_config_names_its_file_and_line_and_the_trace_is_there_when_asked(tmp_path):
    (tmp_path / "conf/experiment").mkdir(parents=True)
    bad = tmp_path / "conf/experiment/bad.yaml"
    bad.write_text("# @package _global_\ntrainer:\n  epochs: [1\n  max_steps: 3\n")
    args = ["+experiment=bad", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.run.dir={tmp_path / 'run'}"]
    line = one_error_line(launch(*args, cwd=tmp_path))
    assert f"{bad}, line 4, column 12: not valid YAML (while parsing a flow sequence; expected ',' or ']'" in line
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    full = subprocess.run([sys.executable, "-m", "pipeline.launch", *args], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=120)
    assert full.returncode == 2 and "Traceback (most recent call last)" in full.stderr
    assert full.stderr.rstrip().splitlines()[-1] == line


@pytest.fixture(params=["read-only mount", "immutable folder"])
def unwritable(request, tmp_path):
    """A folder that even root cannot write: a read-only tmpfs, or one with the immutable attribute."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs or setting the immutable attribute needs root")
    up, down = ((["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], ["umount", str(folder)])
                if request.param == "read-only mount" else
                (["chattr", "+i", str(folder)], ["chattr", "-i", str(folder)]))
    if subprocess.run(up, capture_output=True).returncode != 0:
        pytest.skip(f"cannot make a {request.param} here ({' '.join(up)} failed)")
    yield folder, "Read-only file system" if request.param == "read-only mount" else "Operation not permitted"
    subprocess.run(down, check=True)


@pytest.mark.parametrize("sweep", [False, True])
def test_an_unwritable_run_folder_is_a_configuration_error(tmp_path, unwritable, sweep):
    folder, reason = unwritable
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    r = launch(*(["-m"] if sweep else []), "trainer.max_steps=10", f"{key}={folder / 'run'}", cwd=tmp_path)
    assert f"{folder / 'run'} cannot be written ({reason})" in one_error_line(r)


@pytest.mark.e2e
def test_a_failed_run_is_one_message_and_exit_1(tmp_path):
    """A rank that fails (a constructor that raises: known only by running it): its error in one line with its
    log's path, no Hydra "Error executing job", no traceback on screen; the traceback is in the rank's log."""
    (tmp_path / "boom.py").write_text("from torch import nn\n\n\nclass Net(nn.Module):\n"
                                      "    def __init__(self, width: int = 4):\n        super().__init__()\n"
                                      "        raise ValueError(f'no net of width {width}')\n")
    r = launch("~model", "+model._target_=boom.Net", "trainer.max_steps=10", *SMALL,
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 1
    assert "Error executing job" not in r.stderr + r.stdout and "Traceback" not in r.stderr + r.stdout
    launcher_lines = [x for x in r.stderr.splitlines() if x.startswith("pipeline.launch:")]
    log = tmp_path / "run/logs/node0-rank0.log"
    assert launcher_lines == [f"pipeline.launch: rank 0 (simulated node 0) failed first: exit code 1 (BuildError: "
                              "model._target_=boom.Net could not be built on rank 0: ValueError: no net of width 4); "
                              f"its log: {log}"], r.stderr
    assert log.read_text().count("Traceback (most recent call last)") >= 1 and "raise ValueError" in log.read_text()


@pytest.mark.e2e
def test_a_checkpoint_of_another_model_or_unreadable_is_refused_by_the_ranks_naming_resume_from(tmp_path):
    """A checkpoint copied without its run's point.json (which the launch compares): the ranks compare its
    parameters' names and shapes with the model's, and say the first differences in one line; one whose checksum
    fails is an error, never a silent start from step 0."""
    import torch

    from pipeline.job.checkpoint import _save_with_checksum
    from pipeline.workloads.models.mlp import MLP

    model = MLP(input_shape=[784], num_classes=10, hidden=8, dropout=0.0)
    state = {"model": model.state_dict(), "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
             "step": 3, "segments": [], "scheduler": None, "streams": None, "run_id": "x", "config_sha256": "y"}
    with open(tmp_path / "other.pt", "wb") as f:
        _save_with_checksum(state, f)
    r = launch(f"trainer.resume_from={tmp_path / 'other.pt'}", "trainer.max_steps=10", *SMALL,
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("pipeline.launch:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr and (
        f"(ResumeError: trainer.resume_from={tmp_path / 'other.pt'} is a checkpoint of another model: 3 of another "
        "shape (net.1.weight: 8x784 there, 128x784 here; net.1.bias: 8 there, 128 here;") in line, r.stderr
    damaged = bytearray((tmp_path / "other.pt").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # in a tensor's bytes: the archive still reads at launch, the checksum fails
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    r = launch(f"trainer.resume_from={tmp_path / 'damaged.pt'}", "trainer.max_steps=10", *SMALL,
               f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert r.returncode == 1 and f"(ResumeError: trainer.resume_from={tmp_path / 'damaged.pt'} could not be read " \
        "(CorruptCheckpoint: " in r.stderr, r.stderr


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A real small disk: a tmpfs of `size` mounted on `folder` (root needed: skipped, saying why, without)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    with tmpfs(tmp_path / "small", "600k") as folder:
        yield folder


@pytest.mark.e2e
def test_weights_that_cannot_be_written_make_the_run_incomplete_not_completed(tmp_path):
    """Full at the final save (300 KB: the point, the logs and the record fit; the weights, 400 KB, do not): the
    record says incomplete and why, the exit status is 1, and the message says "No space left on device"."""
    with tmpfs(tmp_path / "tiny", "300k") as folder:
        run = folder / "run"
        r = launch("trainer.max_steps=30", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        (line,) = [x for x in r.stderr.splitlines() if x.startswith("pipeline.launch:")]
        assert "model.pt could not be written: No space left on device" in line, line
        rec = json.loads((run / "result.json").read_text())
        assert rec["status"] == "incomplete" and rec["missing"]["weights"].startswith("No space left on device")
        assert not (run / "model.pt").exists() and not list(run.glob(".*.tmp"))


@pytest.mark.e2e
def test_a_full_disk_is_said_as_such(tmp_path, small_tmpfs):
    """600 KB: the point and the logs fit, the first checkpoint (the weights and their momentum, 820 KB) does not;
    torch.save says "unexpected pos", the launcher "No space left on device"."""
    run = small_tmpfs / "run"
    r = launch("trainer.max_steps=30", "trainer.checkpoint_every=10", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 1
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("pipeline.launch:")]
    assert "rank 0 (simulated node 0) failed first: exit code 1 (No space left on device" in line, line
    assert not list(run.glob(".*.tmp"))  # the interrupted write left nothing to block the next run


@pytest.mark.e2e
def test_a_stopped_rank_is_named_as_the_one_that_did_not_arrive(tmp_path):
    run = tmp_path / "run"
    launcher = start_launch("nodes=2", "trainer.epochs=500", "trainer.log_every=10", "cluster.timeout_s=5", *SMALL,
                            f"hydra.run.dir={run}", cwd=tmp_path)
    pids = wait_for_step(run, 10, launcher, ranks=2)
    os.kill(pids[1], signal.SIGSTOP)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1 and "Traceback" not in err.split("--- its last")[0]
    assert f"rank 1 (simulated node 1, pid {pids[1]}) is stopped (SIGSTOP or Ctrl-Z): it did not arrive" in err
    # and rank 0 said it too, from the heartbeats it saw in the store (as it would on Slurm)
    assert "rank 0 (simulated node 0) failed first: exit code 1 (rank(s) 1 stopped answering (no heartbeat)" in err
    assert not any(live_in_group(pid) for pid in pids)  # the stopped one too


@pytest.mark.e2e
def test_a_stopped_rank_is_named_within_cluster_stopped_s_and_the_run_goes_on_when_resumed(tmp_path):
    """With the default cluster.timeout_s (300 s) a stopped rank once went unsaid for five minutes: the launcher
    names it within cluster.stopped_s, and a SIGCONT lets the run finish as if nothing happened."""
    run = tmp_path / "run"
    launcher = start_launch("nodes=2", "trainer.epochs=20", "trainer.log_every=10", "cluster.stopped_s=2", *SMALL,
                            f"hydra.run.dir={run}", cwd=tmp_path)
    pids = wait_for_step(run, 10, launcher, ranks=2)
    os.kill(pids[1], signal.SIGSTOP)
    said = f"rank 1 (simulated node 1, pid {pids[1]}) has been stopped (SIGSTOP or Ctrl-Z) for"
    deadline, seen = time.monotonic() + 30, ""
    while said not in seen:
        assert time.monotonic() < deadline, seen
        time.sleep(0.5)
        seen = (run / "launch.log").read_text()
    os.kill(pids[1], signal.SIGCONT)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0 and said in out + err and "cluster.timeout_s=300 s" in out + err, out + err
    assert json.loads((run / "result.json").read_text())["status"] == "completed"


@pytest.mark.e2e
def test_a_silent_rank_is_named_with_its_state_and_ends_the_run_within_cluster_silent_s(tmp_path):
    """Every launch mode (the heartbeat through the store, not the local launcher's view of the processes): rank 1
    stopped, rank 0 sees its beat stand still for cluster.silent_s, names it with its process state, and ends the
    run, minutes before the collectives' timeout; no rank process is left."""
    run = tmp_path / "run"
    launcher = start_launch("nodes=2", "trainer.epochs=50", "trainer.log_every=10", "cluster.silent_s=4", *SMALL,
                            f"hydra.run.dir={run}", cwd=tmp_path)
    pids = wait_for_step(run, 10, launcher, ranks=2)
    os.kill(pids[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    out, err = launcher.communicate(timeout=120)
    assert time.monotonic() - stopped_at < 30, "named long after cluster.silent_s"
    said = err.split("--- its last")[0]
    assert launcher.returncode == 1 and "rank 0 (simulated node 0) failed first: exit code 1 (rank 1 (process " \
        f"{pids[1]} on " in said and "silent for 4 s: stopped (SIGSTOP, a debugger, Ctrl-Z); no heartbeat for " \
        "cluster.silent_s=4 s: rank 0 ends the run now" in said, out + err
    assert "Traceback" not in said and not any(live_in_group(pid) for pid in pids), pids


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["immutable", "read-only"])
def test_a_folder_that_stops_taking_files_mid_run_is_said_with_the_os_reason(tmp_path, how):
    """The run folder stops taking files mid-run: made immutable with its logs (chattr +i: no new file, while the
    open logs still take lines), or remounted read-only (a bind mount of it onto itself, made read-only once the
    logs are open: they were opened through the mount beneath, so they still take lines, and the kernel allows the
    remount; a plain read-only remount is refused while files are open for writing). Rank 0's next file fails,
    and so does its failure record. What the user sees is the run's own error with the OS's reason, never the
    failure writer's traceback; the rank's log says that the record could not be written either."""
    run = tmp_path / "run"
    launcher = start_launch("nodes=2", "trainer.epochs=50", "trainer.log_every=10", *SMALL, f"hydra.run.dir={run}",
                            cwd=tmp_path)
    pids = wait_for_step(run, 10, launcher, ranks=2)
    up, down, said = {
        "immutable": ([["chattr", "+i", str(run / "logs"), str(run)]], [["chattr", "-i", str(run), str(run / "logs")]],
                      "PermissionError: [Errno 1] Operation not permitted: "),
        "read-only": ([["mount", "--bind", str(run), str(run)], ["mount", "-o", "remount,bind,ro", str(run)]],
                      [["umount", str(run)]], "OSError: [Errno 30] Read-only file system: "),
    }[how]
    done = []
    for command in up:
        if subprocess.run(command, capture_output=True).returncode != 0:
            launcher.kill()
            for undo in down[:len(done)]:
                subprocess.run(undo)
            pytest.skip(f"{' '.join(command)} is not possible here")
        done.append(command)
    try:
        _, err = launcher.communicate(timeout=120)
    finally:
        for command in down:
            subprocess.run(command, check=True)
    (line,) = [x for x in err.splitlines() if x.startswith("pipeline.launch:")]
    assert launcher.returncode == 1 and f"rank 0 (simulated node 0) failed first: exit code 1 ({said}" in line and \
        ".tmp'" in line, err
    assert "failure" not in line and not any(live_in_group(pid) for pid in pids)
    assert f"its failure record could not be written either ({said.split(':')[0]}" in \
        (run / "logs" / "node0-rank0.log").read_text()


@pytest.mark.e2e
def test_a_rank_killed_by_the_oom_killer_is_said_to_be(tmp_path, memory_cgroup):
    """A 159M-parameter MLP (its weights, gradients and momentum: 1.9 GB) in a 1.5 GB cgroup: the kernel's OOM
    killer kills the rank with SIGKILL, and the launcher says so, with the rank's memory."""
    args = ["model.hidden=200000", "trainer.max_steps=20", *SMALL, f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run(["sh", "-c", f'echo $$ > {memory_cgroup / "cgroup.procs"} && exec "$@"', "sh", sys.executable,
                        "-m", "pipeline.launch", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("pipeline.launch:")]
    assert ("rank 0 (simulated node 0) failed first: killed by SIGKILL (out of memory? the kernel's OOM killer ran "
            "in this launch's cgroup; its memory: ") in line and " GiB at its peak" in line, line
