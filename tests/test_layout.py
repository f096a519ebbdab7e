"""The layout keeps its promise: the login-node programs (launch, status, collect, track) import neither torch nor the
job side, in any of their modules and in a real launch."""

import ast
import pkgutil
import subprocess
import sys

import pytest

import pipeline.collector
import pipeline.launcher
import pipeline.tracking
from tests.conftest import REPO

# the built-in workloads' schemas (pipeline.workloads.models, .losses) are torch-free; their modules are not
HEAVY = ("sorted(m for m in sys.modules if m == 'torch' or "
         "m.startswith(('torch.', 'pipeline.job', 'pipeline.workloads.models.', 'pipeline.workloads.losses.')))")


def loaded_after(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint({HEAVY})"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_entry_points_and_every_login_side_module_import_neither_torch_nor_the_job_side():
    modules = ["pipeline.launch", "pipeline.status", "pipeline.collect", "pipeline.config", "pipeline.rundir",
               "pipeline.result", "pipeline.typed", "pipeline.point", "pipeline.runlock", "pipeline.targets",
               "pipeline.allreduce", "pipeline.definitions", "pipeline.worker", "pipeline.checks", "pipeline.slurm",
               "pipeline.cgroup", "pipeline.callables", "pipeline.workloads.registry", "pipeline.workloads.models",
               "pipeline.workloads.datasets", "pipeline.workloads.losses", "pipeline.workloads.optimizers",
               "hydra_plugins.pipeline_launcher.pipeline_launcher", "pipeline.track"]
    for package in (pipeline.launcher, pipeline.collector, pipeline.tracking):
        modules += [m.name for m in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")]
    assert len(modules) > 12
    assert loaded_after("\n".join(f"import {m}" for m in modules)) == "[]"


@pytest.mark.e2e
def test_a_real_launch_imports_neither_torch_nor_the_job_side(tmp_path):
    """The launcher process itself, through a whole local run (its ranks, other processes, do import torch)."""
    code = (f"import runpy\nsys.argv = ['pipeline.launch', 'trainer.max_steps=3', 'trainer.warmup_steps=1', "
            f"'dataset.train_size=512', 'dataset.test_size=64', 'hydra.run.dir={tmp_path / 'run'}']\n"
            "runpy.run_module('pipeline.launch', run_name='__main__')")
    assert loaded_after(code) == "[]"
    assert (tmp_path / "run/result.json").is_file()


def imported_modules(path) -> set[str]:
    """Every module a source file imports, at module level or inside a function (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            found.add(".".join(filter(None, [base, node.module])))
    return found


@pytest.mark.parametrize("side, other", [("launcher", "job"), ("job", "launcher")])
def test_the_launch_side_and_the_job_side_never_import_each_other(side, other):
    """Both talk through the run folder's files and the torch-free modules they share (pipeline.point, runlock,
    config, rundir, ...): neither imports the other, anywhere in its code."""
    files = sorted((REPO / "pipeline" / side).rglob("*.py"))
    assert len(files) > 5
    crossing = {f"{f.relative_to(REPO)} imports {m}" for f in files for m in imported_modules(f)
                if m == f"pipeline.{other}" or m.startswith(f"pipeline.{other}.")}
    assert not crossing
