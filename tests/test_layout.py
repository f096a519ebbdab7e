"""The layout keeps its promise: the login-node programs (launch, status, collect) import neither torch nor the
job side, in any of their modules and in a real launch."""

import pkgutil
import subprocess
import sys

import pytest

import pipeline.collector
import pipeline.launcher
from tests.conftest import REPO

HEAVY = ("sorted(m for m in sys.modules if m == 'torch' or "
         "m.startswith(('torch.', 'pipeline.job', 'pipeline.workloads.models')))")


def loaded_after(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint({HEAVY})"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_entry_points_and_every_login_side_module_import_neither_torch_nor_the_job_side():
    modules = ["pipeline.launch", "pipeline.status", "pipeline.collect", "pipeline.config", "pipeline.rundir",
               "pipeline.workloads.datasets", "hydra_plugins.pipeline_launcher.pipeline_launcher"]
    for package in (pipeline.launcher, pipeline.collector):
        modules += [m.name for m in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")]
    assert len(modules) > 12
    assert loaded_after("\n".join(f"import {m}" for m in modules)) == "[]"


@pytest.mark.slow
def test_a_real_launch_imports_neither_torch_nor_the_job_side(tmp_path):
    """The launcher process itself, through a whole local run (its ranks, other processes, do import torch)."""
    code = (f"import runpy\nsys.argv = ['pipeline.launch', 'trainer.max_steps=3', 'trainer.warmup_steps=1', "
            f"'dataset.train_size=512', 'dataset.test_size=64', 'hydra.run.dir={tmp_path / 'run'}']\n"
            "runpy.run_module('pipeline.launch', run_name='__main__')")
    assert loaded_after(code) == "[]"
    assert (tmp_path / "run/result.json").is_file()
