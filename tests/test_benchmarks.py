"""Every benchmark runs, on tiny sizes, and prints its figures (smoke runs: the figures themselves are measured by
running the benchmarks as README's Performance section says, never asserted here)."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def bench(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=REPO, text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("flags, first, rows", [([], "pipeline", ("mlp", "loader", "resnet", "gpt")),
                                               (["--aa", "--workload", "mlp"], "hand-written", ("mlp",))])
def test_overhead(flags, first, rows):
    out = bench("benchmarks/overhead.py", "--steps", "22", "--repeats", "1", *flags)
    for row in rows:
        assert re.search(rf"^{row} +median ratio {first} / hand-written: \d+\.\d{{3}}", out, re.M), out


def test_step_costs():
    out = bench("benchmarks/step_costs.py", "--steps", "60", "--repeats", "1")
    assert re.search(r"all additions: [+-]\d+\.\d us/step", out) and out.count("us/step") == 9, out


def test_startup():
    out = bench("benchmarks/startup.py", "--repeats", "1")
    assert re.search(r"launch -> first training step\s+median\s+\d+\.\d+ s", out), out


def test_probe_cost():
    out = bench("benchmarks/probe_cost.py", "--repeats", "1", "--ranks", "2")
    assert re.search(r"2 gloo ranks .*probe \d+\.\d\d s median", out) and "busbw" in out, out


def test_collect_speed():
    out = bench("benchmarks/collect_speed.py", "--records", "100")
    assert "process start to exit" in out, out


SEED_ROW = re.compile(r"^  (\S.*?)\s{2,}(\d+)\s+(\d+\.\d\d)$", flags=re.M)


def test_gpu_throughput_runs_its_rows_on_a_cpu():
    """The seed rows, and the large-model rows on ResNet-50 at 32 px (gpt2_small takes the same path with another
    model)."""
    out = bench("benchmarks/gpu_throughput.py", "--device", "cpu", "--models", "cnn", "--steps", "4", "--warmup", "2",
                "--batch", "32", "--train-size", "1024", "--large", "resnet50", "--large-steps", "4",
                "--large-batch", "2", "--image-size", "32", "--no-compile")
    rows = SEED_ROW.findall(out)
    assert len(rows) == 7 and all(int(rate) > 0 for _, rate, _ in rows), out  # naive + 6 cumulative options
    assert re.search(r"^  pipeline / hand-written: \d+\.\d{3}$", out, flags=re.M), out
