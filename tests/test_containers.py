"""The ranks in the cluster's container image (docs/containers.md): a real Charliecloud image, built here from
Debian's packages (slurm/container-image.sh: a minbase root filesystem holding the libraries the host's Python
needs, that Python and this project's venv bound in at their own paths, so that one venv serves host and image),
run in local debug mode and on the real local Slurm, where a preempted point resumes bitwise with its requeue
issued by the batch script on the host; pyxis's script through a fake srun that records what it is given; and the
preflight's refusals. The golden scripts of the three runtimes are in test_slurm_fake.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import parse_run_config
from pipeline.containers import SOURCE_ROOT, preflight
from pipeline.checks import ConfigError
from pipeline.launcher.slurm import render_sbatch
from pipeline.point import PlannedPoint
from pipeline.slurm import would_accept
from tests.conftest import REPO, launch, start_launch
from tests.fake_slurm.fake_slurm import calls, install
from tests.test_slurm import FAST, preempt_at, record, wait

SMALL = ["dataset.train_size=2048", "dataset.test_size=256", "trainer.tensorboard=false"]
# built only inside the image: its stamp file is there, not on the host, and ch-run says it runs
IN_IMAGE = '''
import os

from pipeline.workloads.models.mlp import MLP


class Net(MLP):
    def __init__(self, input_shape, num_classes, hidden=32, dropout=0.0):
        if not os.path.exists("/.pipeline-image") or "CH_RUNNING" not in os.environ:
            raise RuntimeError("not in the Charliecloud image")
        super().__init__(input_shape, num_classes, hidden, dropout)
'''


@pytest.fixture(scope="session")
def charliecloud_image() -> Path:
    """The image directory, built once per machine (a minute; then cached: slurm/container-image.sh)."""
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (apt-get, debootstrap)")
    r = subprocess.run(["bash", str(REPO / "slurm/container-image.sh")], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


def in_image(image: Path, folder: Path) -> list[str]:
    """A point in the image: the venv's Python (bound in with its interpreter's top folder), and the model above,
    whose module is in the launch's folder: the ranks start there, as a job outside a container does."""
    (folder / "inimage.py").write_text(IN_IMAGE)
    interpreter = f"/{Path(sys.base_prefix).parts[1]}"  # e.g. /root, for /root/.pyenv/versions/3.11.7
    return ["cluster.container.runtime=charliecloud", f"cluster.container.image={image}",
            f"cluster.container.python={sys.executable}", f"cluster.container.mounts=[{interpreter}]",
            "~model", "+model._target_=inimage.Net"]


@pytest.mark.e2e
def test_a_point_runs_in_the_image_in_local_debug_mode(charliecloud_image, tmp_path):
    """Two simulated nodes whose ranks start through ch-run (the model is built only in the image); the launch's
    preflight ran the image's Python first."""
    r = launch("nodes=2", "trainer.max_steps=20", *SMALL, *in_image(charliecloud_image, tmp_path),
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert record(tmp_path / "run")["status"] == "completed"
    assert f"imports torch and this project's source, bound in from {SOURCE_ROOT}" in r.stderr + r.stdout
    # a model whose package is the image's alone passes the launch's own checks, and the preflight imports it in
    # the image, before any rank starts
    r = launch("nodes=2", *SMALL, *in_image(charliecloud_image, tmp_path)[:-1], "+model._target_=inimageonly.Net",
               f"hydra.run.dir={tmp_path / 'missing'}", cwd=tmp_path)
    assert r.returncode == 2 and "and the run's targets (inimageonly.Net): " in r.stderr, r.stderr
    assert "ModuleNotFoundError: No module named 'inimageonly'" in r.stderr, r.stderr
    # the same model outside the image fails: the check above is not vacuous
    (tmp_path / "inimage.py").write_text(IN_IMAGE)
    r = launch("trainer.max_steps=20", *SMALL, "~model", "+model._target_=inimage.Net",
               f"hydra.run.dir={tmp_path / 'host'}", cwd=tmp_path)
    assert r.returncode == 1 and "not in the Charliecloud image" in r.stderr


@pytest.mark.slurm
def test_a_preempted_point_in_the_image_resumes_bitwise(slurm_cluster, charliecloud_image, tmp_path):
    """A 2-node point in the image on the real local Slurm, USR2 mid-training: rank 0 checkpoints and exits to be
    continued (no scontrol in an image), the batch script requeues the job from the host, and the job resumes to
    the weights of the same run uninterrupted (in local debug mode, in the same image)."""
    args = ["nodes=2", "trainer.epochs=40", "trainer.log_every=50", *FAST[1:], *in_image(charliecloud_image, tmp_path)]
    run_dir = tmp_path / "slurm"
    log0 = preempt_at(args, run_dir, "step 100/")
    uninterrupted = start_launch(*args, f"hydra.run.dir={tmp_path / 'local'}", cwd=tmp_path)
    out = wait(run_dir)
    assert "completed" in out and "requeued 1x" in out, out
    said = log0.read_text()
    assert "checkpoint saved; the job's batch script requeues it (in a charliecloud container)" in said
    assert said.count("training 640 steps") == 2  # appended to across the requeue
    rec = record(run_dir)
    assert rec["restart_count"] == 1 and 100 <= rec["resumed_from_step"] < rec["steps"] == 640
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err
    resumed, straight = (torch.load(d / "model.pt", weights_only=True) for d in (run_dir, tmp_path / "local"))
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


@pytest.mark.slurm
def test_each_runtimes_script_passes_slurms_own_check(slurm_cluster, compose_cfg, tmp_path):
    """The #SBATCH lines of each runtime's script, as the real local Slurm reads them (`sbatch --test-only`): the
    runtime's own options are srun's or the command's, which sbatch does not read."""
    for runtime, image in (("pyxis", "'nvcr.io#nvidia/pytorch:24.01-py3'"), ("apptainer", "/images/pytorch.sif"),
                           ("charliecloud", "/images/pytorch")):
        run = parse_run_config(compose_cfg("cluster=slurm", "nodes=2", f"cluster.container.runtime={runtime}",
                                           f"cluster.container.image={image}"))
        script = render_sbatch([PlannedPoint(0, [], run, tmp_path / runtime)], tmp_path, f"pipeline-{runtime}-0")
        assert would_accept(script) is None, (runtime, would_accept(script))


def pyxis_script(compose_cfg, tmp_path: Path) -> Path:
    run = parse_run_config(compose_cfg("cluster=slurm", "nodes=2", "cluster.container.runtime=pyxis",
                                       "cluster.container.image='nvcr.io#nvidia/pytorch:24.01-py3'",
                                       "cluster.container.mounts=['/data sets:/data']".replace(" ", "_")))
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch([PlannedPoint(0, [], run, tmp_path / "0")], tmp_path, "pipeline-x-0"))
    return script


def test_pyxis_gets_its_options_from_srun_and_the_host_requeues(compose_cfg, tmp_path):
    """The pyxis script run by bash with a fake srun (it records its arguments; exit 75, its ranks stopped to be
    continued, rank 0's mark left in the point's logs) and a fake scontrol: the plugin's options reach srun as
    single arguments, the image's Python gets the container's variables, and the host requeues the job (the mark
    of this job and restart only) and ends with the step's status."""
    env = {**os.environ, **install(tmp_path / "bin", tmp_path / "state.json", tmp_path / "calls.jsonl"),
           "FAKE_SRUN_EXIT": "75", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}
    script = pyxis_script(compose_cfg, tmp_path)
    (tmp_path / "0" / "logs").mkdir(parents=True)
    (tmp_path / "0" / "logs" / ".requeue-77-0").touch()  # an earlier run's: not this one's
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 75 and calls(tmp_path / "calls.jsonl", "scontrol") == [], r.stderr
    (tmp_path / "0" / "logs" / ".requeue-77-1").touch()
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 75 and not (tmp_path / "0" / "logs" / ".requeue-77-1").exists(), r.stderr
    srun = calls(tmp_path / "calls.jsonl", "srun")[-1]
    assert "--container-image=nvcr.io#nvidia/pytorch:24.01-py3" in srun and "--container-name=" in " ".join(srun)
    mounts = next(a for a in srun if a.startswith("--container-mounts="))
    assert mounts.startswith("--container-mounts=/data_sets:/data,") and f"{SOURCE_ROOT}:{SOURCE_ROOT}" in mounts
    command = srun[srun.index("env"):]
    assert command[1:3] == ["PIPELINE_CONTAINER=pyxis", f"PYTHONPATH={SOURCE_ROOT}"] and "python3" in command
    assert calls(tmp_path / "calls.jsonl", "scontrol") == [["scontrol", "requeue", "77"]]


def test_the_preflight_refuses_what_would_fail_on_the_nodes(compose_cfg, tmp_path, monkeypatch):
    def check(*overrides: str) -> str:
        with pytest.raises(ConfigError) as e:
            preflight(parse_run_config(compose_cfg(*overrides)))
        return str(e.value)

    charliecloud = ["cluster.container.runtime=charliecloud"]
    assert "does not exist here" in check(*charliecloud, f"cluster.container.image={tmp_path / 'none'}")
    (tmp_path / "empty").mkdir()
    assert "is a folder but no image (no bin/ in it)" in check(*charliecloud,
                                                              f"cluster.container.image={tmp_path}/empty")
    assert "pyxis runs through srun's plugin: local debug mode cannot use it" in check(
        "cluster.container.runtime=pyxis", "cluster.container.image=ubuntu")
    (tmp_path / "a.sif").write_bytes(b"\0")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no apptainer, and a srun without the plugin
    install(tmp_path / "bin", tmp_path / "state.json", tmp_path / "calls.jsonl")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    if not any(Path(d, "apptainer").exists() for d in ("/usr/bin", "/bin")):
        assert "`apptainer` is not on this machine's PATH" in check(
            "cluster.container.runtime=apptainer", f"cluster.container.image={tmp_path / 'a.sif'}")
    assert "this cluster's srun has no --container-image" in check(
        "cluster=slurm", "cluster.container.runtime=pyxis", "cluster.container.image=ubuntu")
    monkeypatch.setenv("FAKE_SRUN_PYXIS", "1")
    from pipeline import containers
    containers._check_runtime.cache_clear()
    preflight(parse_run_config(compose_cfg("cluster=slurm", "cluster.container.runtime=pyxis",
                                           "cluster.container.image=ubuntu")))  # a reference pyxis pulls


def test_a_target_this_machine_lacks_is_the_images_to_import(compose_cfg):
    """With a container, a target whose package the login node lacks is left to the preflight, which imports it in
    the image; without one it is refused here."""
    args = ["~model", "+model._target_=onlyinimage.models.Net"]
    image = ["cluster.container.runtime=apptainer", "cluster.container.image=/i.sif"]
    assert parse_run_config(compose_cfg(*args, *image)).model["_target_"] == "onlyinimage.models.Net"
    with pytest.raises(ConfigError, match="'onlyinimage' is not installed"):
        parse_run_config(compose_cfg(*args))


@pytest.mark.parametrize("overrides, said", [
    (["cluster.container.runtime=docker", "cluster.container.image=/i"],
     "cluster.container.runtime='docker' is not allowed; choose one of: charliecloud, apptainer, pyxis"),
    (["cluster.container.image=/i"], "cluster.container.image='/i' needs cluster.container.runtime"),
    (["cluster.container.runtime=charliecloud"], "cluster.container.runtime is set but cluster.container.image is "
                                                  "not"),
    (["cluster.container.runtime=charliecloud", "cluster.container.image='/i $(touch x)'"],
     "cluster.container.image='/i $(touch x)' is not allowed"),
    (["cluster.container.runtime=charliecloud", "cluster.container.image=/i", "cluster.container.mounts=[data]"],
     "both paths must be absolute"),
    (["cluster.container.runtime=charliecloud", "cluster.container.image=/i", "cluster.container.mounts=['/d:/']"],
     "a mount onto / would hide the image"),
    (["cluster.container.runtime=charliecloud", "cluster.container.image=/i", "cluster.container.workdir=rel"],
     "cluster.container.workdir='rel' is not allowed: give an absolute path"),
    (["cluster.container.runtime=pyxis", "cluster.container.image=u",
      "cluster.container.options=['--container-workdir=/x']"],
     "the pipeline sets where the ranks run and what they see"),
    (["cluster.container.runtime=apptainer", "cluster.container.image=/i.sif", "cluster.container.options=[';rm']"],
     "give the runtime's own options (starting with -)"),
    (["cluster.container.runtime=apptainer", "cluster.container.image=/i.sif", "+cluster.container.env.A-B=a"],
     "cluster.container.env: 'A-B' is not allowed"),
    # Apptainer's --bind and --env, and pyxis's --container-mounts, are lists split at commas
    (["cluster.container.runtime=apptainer", "cluster.container.image=/i.sif", "+cluster.container.env.HCA='a,b'"],
     "(the runtimes take lists of them split at commas)"),
    (["cluster.container.runtime=pyxis", "cluster.container.image=u", "cluster.container.mounts=['/a,/b']"],
     "cluster.container.mounts: '/a,/b' is not allowed"),
    (["search=optuna", "cluster.container.runtime=charliecloud", "cluster.container.image=/i"],
     "a search's trials do not run in a container yet"),
])
def test_bad_container_values_are_refused_naming_the_key(compose_cfg, overrides, said):
    with pytest.raises(ConfigError, match=None) as e:
        parse_run_config(compose_cfg(*overrides))
    assert said in str(e.value)


def test_a_dry_run_writes_the_script_of_each_runtime(tmp_path):
    """`dry_run=true` with a container: the exact script, the image checked (a reference passes), nothing run."""
    for runtime, image in (("pyxis", "'nvcr.io#nvidia/pytorch:24.01-py3'"), ("apptainer", "docker://pytorch/pytorch")):
        r = launch("cluster=slurm", "dry_run=true", f"cluster.container.runtime={runtime}",
                   f"cluster.container.image={image}", f"hydra.run.dir={tmp_path / runtime}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        script = (tmp_path / runtime / "job.sbatch").read_text()
        assert ("--container-image=" if runtime == "pyxis" else "apptainer exec") in script
        assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert json.loads((tmp_path / "pyxis" / "point.json").read_text())["config"]["cluster"]["container"][
        "runtime"] == "pyxis"


def test_charliecloud_binds_through_folders_the_image_has_but_never_over_its_software(tmp_path):
    """A read-only image directory cannot take a mount point: /tmp/x/y is bound through the image's /tmp, the
    host's root never, and a folder under /opt (where an image keeps its Python) is refused, naming what to make."""
    from types import SimpleNamespace

    from pipeline.containers import binds

    image = tmp_path / "image"
    for folder in ("bin", "tmp", "opt/conda", "work"):
        (image / folder).mkdir(parents=True)
    c = SimpleNamespace(runtime="charliecloud", image=str(image), mounts=[])
    assert binds(c, ["/tmp/a/b", "/work/main", "/tmp/c"]) == [("/tmp", "/tmp"), ("/work", "/work")]
    with pytest.raises(ConfigError, match="binding the host's /opt over the image's would hide the image's own "
                                          "software"):
        binds(c, ["/opt/data/imagenet"])
    with pytest.raises(ConfigError, match="has no folder of /srv/data to bind it onto"):
        binds(c, ["/srv/data"])
