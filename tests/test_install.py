"""The project as a user installs it: a wheel (not an editable checkout) in a fresh virtual environment gives
working launch, status and collect commands, with the configs inside the installed package."""

import os
import shutil
import subprocess
import sys
import venv

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.install


def test_the_wheel_installs_and_launches_from_an_empty_folder(tmp_path):
    # built from a copy: setuptools writes build/ into the tree it builds
    source = shutil.copytree(REPO, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "outputs", "multirun"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("pipeline-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv/bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("SLURM")}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # --no-compile: pip's byte-compiling of torch's every module (13 s of the test's 20 s of installing) is not
    # what this test is about; the few modules the commands import compile as they are imported
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    # this torch first (on CPU machines a plain `torch` requirement would pull a multi-GB CUDA build), then the wheel
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, env=env, timeout=900)
    subprocess.run([*pip, str(wheel)], check=True, env=env, timeout=900)
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run([str(bin_dir / "python"), "-c", "import pipeline.conf; print(pipeline.conf.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "venv/lib")), where
    r = subprocess.run([str(bin_dir / "pipeline-launch"), "-m", "nodes=1,2", "trainer.max_steps=8",
                        "dataset.train_size=1024", "dataset.test_size=128", "hydra.sweep.dir=sweep"], cwd=empty,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (empty / "sweep/0/result.json").is_file() and (empty / "sweep/1/result.json").is_file()
    c = subprocess.run([str(bin_dir / "pipeline-collect"), "sweep", "--out", "collect", "--no-plots"], cwd=empty,
                       env=env, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0 and "2 runs in 1 groups" in c.stdout, c.stderr
    s = subprocess.run([str(bin_dir / "pipeline-status"), "sweep"], cwd=empty, env=env, capture_output=True,
                       text=True, timeout=60)
    assert s.returncode == 2 and "no manifest" in s.stderr  # a local sweep has no Slurm jobs to follow
